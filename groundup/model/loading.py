"""Loading any model directory the pipeline writes: a checkpoint (``model.io``) or a LoRA adapter on top of
its base (``model.lora``). It sits above both, so neither imports the other.

An adapter records its base's path and registered version. When the path is gone, the base is found
through the model registry, which this library does not know: the orchestration layer hands in a lookup
(``use_registry(tracking.model_directory)``; tasks and the CLI do), or a caller passes ``registry=``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from groundup.model.gpt import GPTModel, decoding_layout
from groundup.model.io import load_checkpoint
from groundup.model.lora import ADAPTER_CONFIG, load_adapted_model

RegistryLookup = Callable[[str], Path]  # a registered version ("name/3", "name@alias") -> its local directory

_registry: RegistryLookup | None = None


def use_registry(lookup: RegistryLookup | None) -> None:
    """Where adapters find a base checkpoint that exists only in the model registry (None: nowhere)."""
    global _registry
    _registry = lookup


def load_model(
    path: str | Path, device: str | torch.device = "cpu", *, registry: RegistryLookup | None = None
) -> GPTModel:
    """Any model directory the pipeline writes: a checkpoint, or a LoRA adapter dir (``adapter.json``)
    whose base checkpoint it names. The one entry point for ``groundup generate`` and the response stage.

    On a CPU where it pays (:func:`layout_pays`) the weights are laid out for one-token steps
    (:func:`decoding_layout`: the same function, faster decoding); elsewhere they stay as stored."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        model = load_adapted_model(path, device, registry=registry or _registry)
    else:
        model = load_checkpoint(path, device)
    return decoding_layout(model) if layout_pays(device) else model


def layout_pays(device: str | torch.device) -> bool:
    """Whether :func:`decoding_layout` is worth its one-time copy (0.3-0.6 s for a 124M model) on ``device``.

    Measured with ``bench.peers`` on two CPUs: on one with AVX2 only, the laid-out weights decoded 1.11-1.32x
    faster than as stored; on one with AVX-512, whose wider units read a matrix along either side at
    nearly the same speed, at 0.94-1.08x (no consistent difference). Nothing was measured on GPUs or on
    other CPUs, so they keep the weights as stored, which costs nothing."""
    return torch.device(device).type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX2"
