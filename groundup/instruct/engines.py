"""Finetuning engines: one interface, one registry, one typed base model.

An engine LoRA-finetunes a base model on instruction data. Everything around it is shared: the finetune
flow splits the data and hands over the base, the one ``finetune`` task tracks the run (parameters,
datasets, metrics, the registered model and its lineage) from the engine's :class:`FinetuneOutcome`.

Adding a third engine is one module with a class that has the :class:`FinetuneEngine` methods, plus one
line in :data:`ENGINES` (``"name": "package.module:Class"``); ``finetune.engine=name`` then selects it.

``finetune.base`` is parsed once, here, into a :class:`FinetuneBase`: a GPT-2 size (``gpt2-124M``: the
weights stage fetches it), ``pretrained`` (the model the pipeline pretrained), a checkpoint directory, or a
Hugging Face hub id (``org/name``). Which kinds an engine takes is its ``accepts``.

This module imports nothing heavy: the settings validate ``finetune.engine`` against :data:`ENGINES`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from groundup.errors import SettingsError

# name -> "module:class". One line per engine; the module is imported when the engine is first used.
ENGINES: dict[str, str] = {
    "groundup": "groundup.instruct.groundup_engine:GroundupEngine",
    "litgpt": "groundup.instruct.litgpt_engine:LitGPTEngine",
}

# ``finetune.base`` naming the pipeline's own pretrained model (no GPT-2 weights needed, e.g. offline).
PRETRAINED_BASE = "pretrained"
GPT2_SIZE_NAMES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

BaseKind = Literal["gpt2", "pretrained", "directory", "hub"]


@dataclass(frozen=True)
class FinetuneBase:
    """What ``finetune.base`` names: its ``kind`` and its ``value`` as written."""

    kind: BaseKind
    value: str

    @property
    def size(self) -> str | None:
        """The GPT-2 size (``124M``) of a ``gpt2`` base."""
        return gpt2_size(self.value) if self.kind == "gpt2" else None

    @property
    def from_stage(self) -> str | None:
        """The pipeline stage whose checkpoint this base is (``fetch_gpt2_weights``, ``pretrain``), if any."""
        return {"gpt2": "fetch_gpt2_weights", "pretrained": "pretrain"}.get(self.kind)


def gpt2_size(text: str) -> str | None:
    """``gpt2-124M`` / ``gpt2-small`` / ``124M`` → ``124M``; None when ``text`` names no GPT-2 size."""
    name = text.strip().lower()
    for size, preset in GPT2_SIZE_NAMES.items():
        if name in (size.lower(), f"gpt2-{size}".lower(), preset):
            return size
    return None


def parse_base(text: str) -> FinetuneBase:
    """The one reading of ``finetune.base``. An existing path is a directory even when it looks like a hub
    id; a size name is GPT-2 even if a directory of that name exists nowhere."""
    if text == PRETRAINED_BASE:
        return FinetuneBase("pretrained", text)
    if gpt2_size(text):
        return FinetuneBase("gpt2", text)
    if HUB_ID.match(text) and not Path(text).exists():
        return FinetuneBase("hub", text)
    return FinetuneBase("directory", text)


@dataclass
class FinetuneOutcome:
    """What an engine's training produced, in the terms the task tracks and registers."""

    model_dir: Path  # the directory registered as the finetuned model
    out_dir: Path  # everything the run wrote
    val_file: Path  # the held-out validation entries
    n_train: int
    n_val: int
    final_metrics: dict[str, float]
    loss_plot: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)  # engine-specific run parameters
    metric_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # logged after training
    evals: list[Any] = field(default_factory=list)  # groundup.train.state.EvalPoint: logged if on_eval missed them
    records: dict[str, Any] = field(default_factory=dict)  # JSON-able records kept with the run, by file name
    artifacts: list[Path] = field(default_factory=list)  # extra files to keep with the run
    model_type: str = "groundup"  # the registry's flavour of the model directory
    summary: str = ""  # markdown: what the engine adds to the run's summary
    extra: dict[str, str] = field(default_factory=dict)  # engine-specific outputs returned to the caller


@dataclass(frozen=True)
class FinetuneJob:
    """One finetuning run as an engine gets it: locations and settings, nothing in memory."""

    base_dir: Path  # the base checkpoint
    train_path: Path  # the training entries (JSON); ``val_fraction`` of them held out with ``seed``
    config: Any  # the finetune settings
    out_dir: Path  # where the run writes (resumes from) its files
    val_fraction: float
    seed: int
    base_model_ref: str | None = None  # the base's registered version, for the lineage


@dataclass
class TrainCallbacks:
    """What the task wants to hear while an engine trains (all optional)."""

    on_eval: Callable[[Any], None] | None = None  # a groundup.train.state.EvalPoint, as evaluated
    on_progress: Callable[[int, int], None] | None = None  # (steps done, steps in total)
    on_line: Callable[[str], None] | None = None  # a line of a subprocess's output
    # (steps done): a resumable checkpoint is complete in ``job.out_dir`` (an engine that resumes says so)
    on_checkpoint: Callable[[int], None] | None = None


class FinetuneEngine(Protocol):
    """The interface every finetuning engine has."""

    name: str
    stage: str  # the name of its MLflow stage run, which the lineage shows
    accepts: tuple[BaseKind, ...]  # the kinds of ``finetune.base`` it can finetune

    def check(self, config: Any) -> None:
        """Refuse settings (accelerator included) this engine cannot run, before any work starts."""

    def prepare_base(self, base: FinetuneBase, output_root: Path, *, hf_token: str | None, on_line: Any) -> Path:
        """The local checkpoint directory of a ``directory`` or ``hub`` base (downloads go under
        ``output_root``)."""

    def train(self, job: FinetuneJob, callbacks: TrainCallbacks) -> FinetuneOutcome:
        """LoRA-finetune ``job.base_dir`` on ``job.train_path``."""


def get_engine(name: str) -> FinetuneEngine:
    """The registered engine ``name``."""
    try:
        module_name, _, class_name = ENGINES[name].partition(":")
    except KeyError:
        raise SettingsError(
            f"finetune.engine={name!r} is not a finetuning engine", fix=f"choose one of {', '.join(ENGINES)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)()


def check_base(engine: FinetuneEngine, base: FinetuneBase) -> None:
    """An engine asked to finetune a kind of base it does not take is a settings error."""
    if base.kind not in engine.accepts:
        kinds = {"gpt2": "a GPT-2 size", "pretrained": f"{PRETRAINED_BASE!r}", "directory": "a directory",
                 "hub": "a hub id"}  # fmt: skip
        raise SettingsError(
            f"finetune.base={base.value!r} is {kinds[base.kind]}, which engine {engine.name!r} cannot finetune",
            fix=f"use {' or '.join(kinds[k] for k in engine.accepts)}, or another finetune.engine",
        )


def checked_engine(config: Any) -> FinetuneEngine:
    """The engine of ``config.engine`` (finetune settings), after refusing what it cannot run: an unknown
    engine, a base of a kind it does not take, settings it rejects, an absent accelerator. Flows call it
    before any stage starts."""
    engine = get_engine(config.engine)
    check_base(engine, parse_base(config.base))
    engine.check(config)
    return engine
