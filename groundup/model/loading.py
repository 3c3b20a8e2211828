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

    On a CPU the weights are laid out for one-token steps (:func:`decoding_layout`: the same function, faster
    decoding); on a GPU, where that was not measured, they stay as stored."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        model = load_adapted_model(path, device, registry=registry or _registry)
    else:
        model = load_checkpoint(path, device)
    return decoding_layout(model) if torch.device(device).type == "cpu" else model
