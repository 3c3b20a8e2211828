"""Resumable training state on disk.

A training run owns one directory::

    run.json                  what the run trains (a digest of its settings and inputs), checked on resume
    latest.json               the newest complete step checkpoint (replaced atomically)
    steps/step-000050/        weights + config.json (what the run's saver writes),
                              trainer_state.pt (optimizer, LR scheduler, RNG), progress.json
    final/                    the finished model: weights + config.json + progress.json

A step checkpoint is written into a temporary directory and renamed into place, then ``latest.json`` is
switched to it, then older ones are deleted: a process killed at any point leaves the previous checkpoint
intact and pointed to. ``final/`` appears the same way (one rename), so its presence means "finished".
``trainer_state.pt`` holds only tensors and plain containers and is read with ``weights_only=True``.

Two runs of the same content-addressed directory (a scheduled run overlapping a manual one) take turns:
:meth:`RunDirectory.exclusive` holds a lock file for the whole training, so the second one waits and then
finds ``final/`` there. A ``final/`` published by a process that held no lock is reused, never a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from groundup.files import publish_rename, write_json
from groundup.model.io import CheckpointError

RUN_FILE = "run.json"
LATEST_FILE = "latest.json"
PROGRESS_FILE = "progress.json"
TRAINER_STATE_FILE = "trainer_state.pt"
STEPS_DIR = "steps"
FINAL_DIR = "final"
LOCK_FILE = ".lock"


@dataclass
class EvalPoint:
    """Losses measured every ``eval_freq`` steps (the workshop's ``train_losses``/``val_losses``)."""

    step: int
    epoch: float  # fractional: 1.5 is half-way through the second epoch
    tokens_seen: int
    train_loss: float
    val_loss: float
    lr: float

    @property
    def epoch_number(self) -> int:
        """The 1-based epoch the evaluation falls in; at 4.0, the end of the fourth epoch, that is 4, not 5."""
        return max(1, math.ceil(self.epoch))


@dataclass
class Progress:
    """Where training stands; together with the weights and trainer state, all a resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # micro-batches of that epoch already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0  # time spent training, summed over resumes
    evals: list[EvalPoint] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"epoch": int, "step": int, "text": str}
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        data = dict(data)
        data["evals"] = [EvalPoint(**point) for point in data.get("evals", [])]
        return cls(**data)


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested dicts."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [d for k in sorted({*stored, *wanted}) for d in _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix.rstrip('.')}: {stored!r} -> {wanted!r}"]


def read_progress(directory: Path) -> Progress:
    path = directory / PROGRESS_FILE
    try:
        return Progress.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable training progress ({exc})") from None


class RunDirectory:
    """The checkpoints of one training run (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this run directory against other processes (blocking until they release it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def claim(self, identity: Mapping[str, Any]) -> None:
        """Record what this run trains, or check that an existing run trains the same thing."""
        path = self.root / RUN_FILE
        wanted = json.loads(json.dumps(identity, default=str))
        if not path.is_file():
            write_json(path, wanted)
            return
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: unreadable run description ({exc})") from None
        changes = _differences(stored, wanted)
        if changes:
            raise CheckpointError(
                f"{self.root} holds checkpoints of another run ({'; '.join(changes[:8])}); "
                "use another directory or delete it to start over"
            )

    def is_finished(self) -> bool:
        return (self.final / PROGRESS_FILE).is_file()

    def latest(self) -> Path | None:
        """The newest complete step checkpoint, or None for a fresh run."""
        pointer = self.root / LATEST_FILE
        if not pointer.is_file():
            return None
        try:
            directory = self.root / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{pointer}: unreadable checkpoint pointer ({exc})") from None
        if not directory.is_dir():
            raise CheckpointError(f"{pointer} points to {directory}, which does not exist")
        return directory

    def save_step(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write a step checkpoint with ``write(tmp_dir)``, publish it, and drop the older ones."""
        steps = self.root / STEPS_DIR
        steps.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=steps))
        try:
            write(tmp)
            target = steps / name
            if target.exists():  # left by a run killed after the rename but before latest.json moved on
                shutil.rmtree(target, ignore_errors=True)
            if not publish_rename(tmp, target):  # written meanwhile by an unlocked run of the same content
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_json(self.root / LATEST_FILE, {"checkpoint": f"{STEPS_DIR}/{name}", "step": step})
        for old in steps.iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def save_final(self, write: Callable[[Path], None]) -> Path:
        """Write the finished model with ``write(tmp_dir)`` and rename it to ``final/``; step checkpoints
        (optimizer state, several times the model's size) are then deleted. A ``final/`` another run of the
        same directory published first is kept: both trained the same thing."""
        tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=self.root))
        try:
            write(tmp)
            publish_rename(tmp, self.final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.root / STEPS_DIR, ignore_errors=True)
        (self.root / LATEST_FILE).unlink(missing_ok=True)
        return self.final


def write_progress(directory: Path, progress: Progress) -> None:
    write_json(directory / PROGRESS_FILE, progress.to_dict())


def rng_state() -> dict[str, Any]:
    """The random generators training draws from (dropout; sampling without a seed)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(directory: Path, optimizer, scheduler, progress: Progress) -> None:
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
        directory / TRAINER_STATE_FILE,
    )
    write_progress(directory, progress)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing trainer state") from None
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError … for a damaged file
        raise CheckpointError(
            f"{path}: corrupted trainer state ({type(exc).__name__}: {exc}); delete {directory.parent.parent} "
            "to start this run over"
        ) from None
