"""LoRA (low-rank adaptation) for our GPT, coded from scratch.

A frozen linear layer ``W`` learns an update ``ΔW = B @ A * alpha / r`` through two small matrices,
``A`` (r × in) and ``B`` (out × r). ``B`` starts at zero, so right after wrapping the model computes
exactly what the base model computes; only ``A`` and ``B`` receive gradients.

On disk an adapter is a directory with ``adapter.safetensors`` (only the LoRA tensors, a few MB) and
``adapter.json`` (the LoRA settings, the wrapped layers and the base checkpoint it belongs to: path,
weights digest and registered model version if any). ``groundup.model.io.load_model`` recognises such a
directory and calls :func:`load_adapted_model`; :func:`merge_lora` folds the update into the base weights
for a plain checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from groundup.files import atomic_path, sha256_file, write_json
from groundup.model.gpt import GPTModel
from groundup.model.io import WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FORMAT = "groundup-lora"


class LoRALinear(nn.Module):
    """``base(x) + dropout(x) @ Aᵀ @ Bᵀ * alpha / r`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        # The same initialisation nn.Linear gives its own weight (and LoRA's reference code uses).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update added to its weight (in place; the layer is returned)."""
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which layers get adapters and their rank, scale and dropout. Any object with these attributes will do
    (the pipeline passes its ``finetune.lora`` settings); :meth:`of` makes one of it."""

    r: int
    alpha: float
    dropout: float
    query: bool
    key: bool
    value: bool
    projection: bool
    mlp: bool
    head: bool

    @classmethod
    def of(cls, settings: Any) -> LoRASpec:
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Wrapping, freezing, merging
# ---------------------------------------------------------------------------------------------------------


def lora_targets(model: GPTModel, lora: LoRASpec) -> list[str]:
    """Names of the linear layers the LoRA settings select, in module order."""
    names: list[str] = []
    attention = {"W_query": lora.query, "W_key": lora.key, "W_value": lora.value, "out_proj": lora.projection}
    for i in range(len(model.trf_blocks)):
        names += [f"trf_blocks.{i}.att.{layer}" for layer, chosen in attention.items() if chosen]
        if lora.mlp:
            names += [f"trf_blocks.{i}.ff.layers.0", f"trf_blocks.{i}.ff.layers.2"]
    if lora.head:
        names.append("out_head")
    return names


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: GPTModel, lora: LoRASpec, targets: list[str] | None = None) -> GPTModel:
    """Wrap the selected linear layers in :class:`LoRALinear` (in place) and freeze everything else.

    ``targets`` overrides the selection by module names (used when loading a saved adapter).
    """
    names = lora_targets(model, lora) if targets is None else targets
    if not names:
        raise ValueError(
            "LoRA settings select no layer: enable at least one of query, key, value, projection, mlp, head"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"LoRA target {name!r} is not a module of this model") from None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is a {type(layer).__name__}, not an nn.Linear")
        _replace(model, name, LoRALinear(layer, lora.r, lora.alpha, lora.dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (``<layer>.lora_A`` / ``<layer>.lora_B``)."""
    return {
        f"{name}.{key}": tensor
        for name, layer in lora_layers(model).items()
        for key, tensor in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
    }


def merge_lora(model: GPTModel) -> GPTModel:
    """Fold every LoRA update into its base weight and put plain ``nn.Linear`` layers back (in place).

    A LoRA-adapted head that shares its weight with the token embedding would drag the embedding along,
    so it is untied first (and the config says so).
    """
    head = model.out_head
    if isinstance(head, LoRALinear) and head.base.weight is model.tok_emb.weight:
        head.base.weight = nn.Parameter(head.base.weight.detach().clone())
        model.cfg = dataclasses.replace(model.cfg, tie_weights=False)
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merged())
    return model


# ---------------------------------------------------------------------------------------------------------
# Adapters on disk
# ---------------------------------------------------------------------------------------------------------


def base_reference(base_dir: str | Path, model_ref: str | None = None) -> dict[str, Any]:
    """What an adapter records about its base checkpoint: where it is, what its weights are, its version."""
    base_dir = Path(base_dir).resolve()
    weights = base_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{base_dir}: not a checkpoint directory (missing {WEIGHTS_FILE})")
    return {"path": str(base_dir), "weights_sha256": sha256_file(weights), "model_ref": model_ref}


def save_adapter(
    model: GPTModel,
    directory: str | Path,
    lora: LoRASpec,
    base: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` (each atomically); ``base`` from :func:`base_reference`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA layers; call apply_lora first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT})
    write_json(
        directory / ADAPTER_CONFIG,
        {
            "format": ADAPTER_FORMAT,
            "lora": LoRASpec.of(lora).to_dict(),
            "targets": list(lora_layers(model)),
            "base": base,
            "model": model.cfg.to_dict(),
            **(metadata or {}),
        },
    )
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{Path(directory)}: not a LoRA adapter directory (missing {ADAPTER_CONFIG})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    missing = [key for key in ("format", "lora", "targets", "base") if key not in data]
    if data.get("format") != ADAPTER_FORMAT or missing:
        raise CheckpointError(
            f"{path}: not a {ADAPTER_FORMAT} adapter config (missing {missing or 'format'})"
        )
    return data


def load_adapter(model: GPTModel, directory: str | Path) -> GPTModel:
    """Wrap ``model`` as the adapter says and load its LoRA tensors (every mismatch named in the error)."""
    config = read_adapter_config(directory)
    apply_lora(model, LoRASpec(**config["lora"]), targets=config["targets"])
    return load_lora_weights(model, directory)


def load_lora_weights(model: GPTModel, directory: str | Path) -> GPTModel:
    """Copy an adapter's tensors into the LoRA layers ``model`` already has (resuming a LoRA run)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: missing, corrupted or unreadable ({exc})") from None
    expected = lora_state_dict(model)
    problems = [f"missing tensor {k}" for k in expected if k not in state]
    problems += [f"unexpected tensor {k}" for k in state if k not in expected]
    problems += [
        f"tensor {k}: adapter {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit its base model: " + "; ".join(problems[:10]))
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])
    return model


def resolve_base(base: dict[str, Any], registry: Callable[[str], Path] | None = None) -> Path:
    """The base checkpoint directory of an adapter: its recorded path, else its registered model version
    (looked up with ``registry``, ``model.loading``'s registry lookup).

    The weights must have the recorded digest: an adapter applied to other weights is silently wrong.
    """
    path = Path(base.get("path") or "")
    ref = base.get("model_ref")
    if not (path / WEIGHTS_FILE).is_file():
        if not ref:
            raise CheckpointError(
                f"adapter base checkpoint {str(path)!r} does not exist and no registered "
                "model version is recorded to fetch it from"
            )
        if registry is None:
            raise CheckpointError(
                f"adapter base checkpoint {str(path)!r} does not exist; its registered version {ref!r} can be "
                "fetched only where the model registry is configured"
            )
        path = registry(ref)
    digest = sha256_file(path / WEIGHTS_FILE)
    if base.get("weights_sha256") and digest != base["weights_sha256"]:
        raise CheckpointError(
            f"adapter base {path}: weights sha256 {digest[:12]}… differs from the recorded "
            f"{base['weights_sha256'][:12]}… (the adapter was trained on other weights)"
        )
    return path


def load_adapted_model(
    adapter_dir: str | Path,
    device: str | torch.device = "cpu",
    merge: bool = True,
    registry: Callable[[str], Path] | None = None,
) -> GPTModel:
    """Base checkpoint + adapter → a model in eval mode; merged (plain layers, no LoRA overhead) by default.
    ``registry`` finds a base that exists only as a registered version (see ``model.loading``)."""
    config = read_adapter_config(adapter_dir)
    model = load_checkpoint(resolve_base(config["base"], registry), device="cpu")
    load_adapter(model, adapter_dir)
    if merge:
        merge_lora(model)
    return model.to(device).eval()


def export_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A plain checkpoint (``model.safetensors`` + ``config.json``) with the adapter folded in."""
    config = read_adapter_config(adapter_dir)
    model = load_adapted_model(adapter_dir, merge=True)
    origin = {"adapter": str(Path(adapter_dir).resolve()), "base": config["base"]}
    return save_checkpoint(model, out_dir, metadata={"merged_from": origin})
