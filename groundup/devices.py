"""Where a stage runs: the one place that checks an accelerator, a device count, a precision or a
quantization against this machine.

Every stage (pretraining, both finetuning engines, responses, the judge, ``groundup generate``) asks
here, so an absent GPU is refused before any work starts, always as a :class:`DeviceError` whose message
names the setting (``train.runtime.accelerator='cuda': ...``) and the fix.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from groundup.errors import DeviceError

# Tried in this order by ``auto``; the CPU is always there.
GPU_KINDS = ("cuda", "mps")


def available(accelerator: str) -> int:
    """How many devices of a kind this process can see (CPU "devices" are processes: unlimited)."""
    if accelerator == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    return sys.maxsize


def resolve_accelerator(requested: str = "auto", *, setting: str = "accelerator", devices: int = 1) -> str:
    """``cpu``, ``cuda`` or ``mps`` for ``requested`` (``auto``: the first GPU kind present, else the CPU);
    a requested kind that is absent, or fewer devices than ``devices``, is a :class:`DeviceError`."""
    accelerator = requested
    if accelerator == "auto":
        accelerator = next((kind for kind in GPU_KINDS if available(kind)), "cpu")
    count = available(accelerator)
    if count == 0:
        built = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", no CUDA")
        raise DeviceError(
            f"{setting}={requested!r}: no {accelerator} device is available here ({built})",
            fix=f"use {setting}=auto or cpu",
        )
    if devices > count:
        raise DeviceError(f"{setting}={requested!r}: {devices} devices requested, only {count} {accelerator} visible")
    return accelerator


def torch_device(requested: str = "auto", *, setting: str = "accelerator") -> torch.device:
    """The :class:`torch.device` of one process on ``requested`` (see :func:`resolve_accelerator`)."""
    return torch.device(resolve_accelerator(requested, setting=setting))


def training_precision(accelerator: str) -> str:
    """The default training precision: CPUs have no fast bf16 matmuls; GPUs with bf16 train ~2x faster in
    it without loss scaling."""
    if accelerator == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def check_quantization(
    quantize: str | None,
    accelerator: str,
    *,
    setting: str = "quantize",
    precision: str | None = None,
    world_size: int = 1,
) -> None:
    """bitsandbytes quantization runs on one CUDA GPU with a "-true" precision; say so before loading
    gigabytes of weights."""
    if quantize is None:
        return
    if accelerator != "cuda":
        raise DeviceError(
            f"{setting}={quantize!r} (bitsandbytes) needs a CUDA GPU, but the accelerator is {accelerator!r}",
            fix=f"remove {setting} or run on CUDA",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DeviceError(f"{setting}={quantize!r} needs the bitsandbytes package", fix="pip install bitsandbytes")
    if precision and "mixed" in precision:
        raise DeviceError(f"{setting}={quantize!r} cannot be combined with precision {precision!r}")
    if world_size > 1:
        raise DeviceError(f"{setting}={quantize!r} works with one device only (devices=1 and num_nodes=1)")
