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

from groundup.model.gpt import GPTModel, decoding_layout, few_rows_through_onednn
from groundup.model.io import load_checkpoint
from groundup.model.lora import ADAPTER_CONFIG, load_adapted_model

# Past the measured CPU's 260 MiB L3 cache: a model this large reads its weights from memory every step.
ONEDNN_MIN_MODEL_BYTES = 256 * 2**20

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

    On a CPU, where each was measured to pay, the weights are laid out for one-token steps
    (:func:`layout_pays`, :func:`decoding_layout`) or products of a few rows by a large model's large
    matrices go through oneDNN (:func:`onednn_pays`, :func:`few_rows_through_onednn`): the same function,
    faster decoding. Elsewhere the model is as stored."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        model = load_adapted_model(path, device, registry=registry or _registry)
    else:
        model = load_checkpoint(path, device)
    if layout_pays(device):
        decoding_layout(model)
    if onednn_pays(model, device):
        few_rows_through_onednn(model)
    return model


def layout_pays(device: str | torch.device) -> bool:
    """Whether :func:`decoding_layout` is worth its one-time copy (0.3-0.6 s for a 124M model) on ``device``.

    Measured with ``bench.peers`` on two CPUs: on one with AVX2 only, the laid-out weights decoded 1.11-1.32x
    faster than as stored; on one with AVX-512, whose wider units read a matrix along either side at
    nearly the same speed, at 0.94-1.08x (no consistent difference). Nothing was measured on GPUs or on
    other CPUs, so they keep the weights as stored, which costs nothing."""
    return torch.device(device).type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX2"


def onednn_pays(model: GPTModel, device: str | torch.device) -> bool:
    """Whether :func:`few_rows_through_onednn` speeds up decoding ``model`` on ``device``: on the AVX-512 CPU
    where it was measured (``bench.peers``' ``row_products`` and batch rows, the responses stage), for a
    model of at least 256 MB of weights. MKL's slowdown on a few rows comes from reading the weights
    again and again; a smaller model fits in the caches (260 MiB of L3 on that CPU), and gpt-mini (110 MB)
    decoded no faster at two threads (0.77-0.94x). Other CPUs, whose MKL may not slow down on a few rows,
    keep ``nn.Linear``, as do GPUs (no oneDNN)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head once
    return (
        torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
        and weight_bytes >= ONEDNN_MIN_MODEL_BYTES
    )
