"""Model checkpoints on disk: a directory with ``model.safetensors`` and ``config.json``.

This is the format every stage exchanges (pretraining output, converted GPT-2 weights, the base of our
own LoRA finetuning), and what ``groundup generate`` loads. Resumable training state (optimizer, step,
RNG) lives beside it in ``groundup.train``; it is not needed to use a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from groundup.errors import ModelError
from groundup.files import atomic_path, write_json
from groundup.model.gpt import GPTConfig, GPTModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ModelError):
    """A checkpoint that is missing, corrupted or does not fit the expected configuration."""


def save_checkpoint(model: GPTModel, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write weights and config (each atomically); tied weights are stored once (as ``out_head.weight``).

    Tensors are written row-major whatever their strides (:func:`~groundup.model.gpt.decoding_layout`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.cfg.tie_weights:
        del state["tok_emb.weight"]  # the same tensor as the head
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "groundup-gpt"})
    write_json(directory / CONFIG_FILE, {"model": model.cfg.to_dict(), **(metadata or {})})
    return directory


def read_config(directory: str | Path) -> GPTConfig:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: missing {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return GPTConfig.from_dict(data["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a groundup model config ({exc})") from None


def read_metadata(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))


def tokenizer_name(directory: str | Path) -> str:
    """The tokenizer a model was trained with: pretraining records it in config.json; GPT-2's BPE otherwise
    (converted GPT-2 weights, LoRA adapter dirs)."""
    path = Path(directory) / CONFIG_FILE
    return read_metadata(directory).get("tokenizer", "gpt2") if path.is_file() else "gpt2"


def load_state(directory: str | Path, model: GPTModel) -> GPTModel:
    """Load weights into ``model``; every missing, unexpected or misshapen tensor is named in the error.

    A model built on the meta device (no storage yet) gets the file's tensors assigned instead of copied."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(directory)}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupted or unreadable safetensors file ({exc})") from None
    if model.cfg.tie_weights:
        # safetensors stores a shared tensor under one of its names; either one fills both.
        shared = state.get("tok_emb.weight", state.get("out_head.weight"))
        if shared is not None:
            state["tok_emb.weight"] = state["out_head.weight"] = shared
    expected = model.state_dict()
    problems = []
    for name, tensor in expected.items():
        if name not in state:
            problems.append(f"missing tensor {name}")
        elif state[name].shape != tensor.shape:
            problems.append(f"tensor {name}: checkpoint {tuple(state[name].shape)} vs model {tuple(tensor.shape)}")
    problems += [f"unexpected tensor {name}" for name in state if name not in expected]
    if problems:
        raise CheckpointError(f"{path} does not fit the model config: " + "; ".join(problems[:10]))
    on_meta = model.tok_emb.weight.is_meta
    model.load_state_dict(state, strict=False, assign=on_meta)
    if on_meta and model.cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters: share one again
    return model


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    expected: GPTConfig | None = None,
) -> GPTModel:
    """Build the model a checkpoint directory describes and load its weights (in eval mode).

    The model is built on the meta device and the file's tensors are assigned to it: no random
    initialisation that the weights would overwrite (2.5 s for 124M), no second copy in memory."""
    cfg = read_config(directory)
    if expected is not None and expected != cfg:
        diff = {k: (v, getattr(expected, k)) for k, v in cfg.to_dict().items() if getattr(expected, k) != v}
        raise CheckpointError(f"{directory}: checkpoint config differs from the expected one: {diff}")
    with torch.device("meta"):
        model = GPTModel(cfg)
    model = load_state(directory, model)
    return model.to(device).eval()
