"""The training loop, on Lightning Fabric: the workshop's ``train_model_simple`` made resumable and fast.

What it adds to the workshop's loop, and why:

- Fabric places the model and batches on the configured accelerator, runs mixed precision and, with more
  than one device, DDP. A requested accelerator that is absent is an error before anything is loaded.
- Only parameters with ``requires_grad`` are optimized (AdamW), so the same loop finetunes LoRA adapters.
- Optional linear warmup + cosine decay to ``min_lr``, gradient clipping and accumulation.
- Batches come in an order fixed by ``(seed, epoch)`` and a checkpoint records how many batches of the
  epoch were consumed, so a resumed run continues with exactly the batches, learning rates and random
  numbers an uninterrupted run would have used.
- Every ``eval_freq`` steps train and validation loss over ``eval_iter`` batches (the workshop's
  schedule: after the first step, then every ``eval_freq``); a sample after every epoch; hooks let the
  caller log these (MLflow, Prefect) without this module knowing about either.
- What a checkpoint holds is pluggable (:class:`ModelSaver`): the whole GPT by default, only the adapter
  for LoRA.

Fabric launches multi-device runs by re-executing ``sys.argv``, which must not be a Prefect flow or a test
runner: runs with more than one device go through :func:`groundup.train.launch.run_launched`, as do CPU
runs started off the main thread (:func:`needs_own_process`), with their hooks called back in the parent.

Over 350 lines on purpose: the loop, its batch order and its checkpoint/resume logic depend on each other's
details (which batch of which epoch, which random state), and read best side by side.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler

from groundup import devices
from groundup.config import RuntimeConfig, TrainConfig
from groundup.errors import SettingsError
from groundup.model.io import CheckpointError, load_state, read_config, save_checkpoint
from groundup.train import cpu_memory
from groundup.train.launch import is_launched, send_event
from groundup.train.state import (
    EvalPoint,
    Progress,
    RunDirectory,
    load_trainer_state,
    read_progress,
    save_trainer_state,
    set_rng_state,
    write_progress,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TrainingError(SettingsError):
    """Settings or data a training run cannot start with; raised before any work is done."""


# ---------------------------------------------------------------------------------------------------------
# Where training runs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    accelerator: str  # cpu | cuda | mps, never auto
    devices: int
    num_nodes: int
    precision: str
    compile: bool

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def needs_own_process(config: RuntimeConfig, runtime: Runtime) -> bool:
    """Whether a run has to be started in a process of its own (:func:`groundup.train.launch.run_launched`):
    with more than one device, because Fabric starts the other ranks by re-running the command; and on a
    CPU keeping freed memory (``keep_freed_memory``) when called off the main thread, because glibc serves
    a thread's blocks over 64 MB by mmap whatever ``mallopt`` says (:mod:`groundup.train.cpu_memory`)."""
    if is_launched():
        return False
    return runtime.world_size > 1 or (keeps_freed_memory(config, runtime) and not cpu_memory.on_main_thread())


def keeps_freed_memory(config: RuntimeConfig, runtime: Runtime) -> bool:
    """Whether the run keeps freed memory while it trains: on a CPU with glibc, ``keep_freed_memory`` set."""
    return runtime.accelerator == "cpu" and config.keep_freed_memory and cpu_memory.supported()


def resolve_runtime(config: RuntimeConfig, setting: str = "train.runtime") -> Runtime:
    """Turn ``auto`` into a concrete accelerator and precision; an absent accelerator is a DeviceError."""
    accelerator = devices.resolve_accelerator(
        config.accelerator, setting=f"{setting}.accelerator", devices=config.devices
    )
    precision = config.precision or devices.training_precision(accelerator)
    return Runtime(accelerator, config.devices, config.num_nodes, precision, config.compile)


def _make_fabric(runtime: Runtime):
    # Imported here: Lightning is slow to import and reads MLflow's environment when it is.
    from lightning.fabric import Fabric

    try:
        return Fabric(
            accelerator=runtime.accelerator,
            devices=runtime.devices,
            num_nodes=runtime.num_nodes,
            precision=runtime.precision,
            strategy="ddp" if runtime.world_size > 1 else "auto",
        )
    except ValueError as exc:
        raise TrainingError(f"runtime settings rejected by Lightning Fabric: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# Pluggable parts
# ---------------------------------------------------------------------------------------------------------


class ModelSaver(Protocol):
    """What a checkpoint stores of the model, and how it is put back."""

    def save(self, model: nn.Module, directory: Path, metadata: Mapping[str, Any]) -> None: ...

    def load(self, model: nn.Module, directory: Path) -> None: ...


class GPTSaver:
    """The whole GPT as a groundup checkpoint (``model.safetensors`` + ``config.json``)."""

    def save(self, model: nn.Module, directory: Path, metadata: Mapping[str, Any]) -> None:
        save_checkpoint(model, directory, dict(metadata))

    def load(self, model: nn.Module, directory: Path) -> None:
        stored = read_config(directory)
        if stored != model.cfg:
            raise CheckpointError(f"{directory}: checkpoint of another model config ({stored} vs {model.cfg})")
        load_state(directory, model)


@dataclass
class TrainHooks:
    """Callbacks for the caller's logging; called on the global-rank-zero process only."""

    on_eval: Callable[[EvalPoint], None] | None = None
    on_sample: Callable[[dict[str, Any]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None  # (optimizer steps done, total)
    on_checkpoint: Callable[[Path, Progress], None] | None = None

    @classmethod
    def to_parent(cls) -> TrainHooks:
        """In a launched process: hooks that report every call to the parent (:func:`launch.send_event`)."""
        return cls(
            on_eval=lambda point: send_event("eval", asdict(point)),
            on_sample=lambda sample: send_event("sample", sample),
            on_progress=lambda done, total: send_event("progress", [done, total]),
            on_checkpoint=lambda path, progress: send_event("checkpoint", [str(path), progress.to_dict()]),
        )

    def replay(self, kind: str, payload: Any) -> None:
        """In the parent: call the hook a launched process reported through :meth:`to_parent`."""
        if kind == "eval" and self.on_eval:
            self.on_eval(EvalPoint(**payload))
        elif kind == "sample" and self.on_sample:
            self.on_sample(payload)
        elif kind == "progress" and self.on_progress:
            self.on_progress(*payload)
        elif kind == "checkpoint" and self.on_checkpoint:
            self.on_checkpoint(Path(payload[0]), Progress.from_dict(payload[1]))


@dataclass
class TrainResult:
    checkpoint: Path  # the finished model (``final/`` of the run directory)
    progress: Progress  # steps, tokens seen, eval history, samples
    resumed_from: int | None = None  # step a killed run was resumed from
    already_finished: bool = False  # nothing was trained: the run directory held a finished run
    tokens_per_second: float | None = None  # training throughput of this session
    is_global_zero: bool = True

    @property
    def final_losses(self) -> tuple[float, float]:
        last = self.progress.evals[-1]
        return last.train_loss, last.val_loss


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; targets equal to -100 (padding, masked prompts) are ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def lr_multiplier(step: int, *, settings: TrainConfig, total_steps: int) -> float:
    """Factor on ``settings.lr`` for optimizer step ``step`` (0-based): linear warmup, then constant or a
    cosine decay that reaches ``min_lr`` at ``total_steps``."""
    warmup = settings.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if not settings.cosine_decay:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = settings.min_lr / settings.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches in an order fixed by ``(seed, epoch)``, sharded across ranks, able to start mid-epoch.

    A ``DataLoader`` draws its shuffle order from a generator whose state is hard to restore half-way;
    deriving each epoch's permutation from the seed makes "epoch 3, batch 5" a reproducible position.
    """

    def __init__(
        self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.batch_size = size, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.size))
        # Every rank gets the same number of samples, so all take the same number of steps.
        order = order[: len(order) - len(order) % self.world_size][self.rank :: self.world_size]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        per_rank = self.size // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches(self.epoch)[self.start :]


def _resumable_loader(loader: DataLoader, seed: int, rank: int, world_size: int) -> DataLoader:
    """The same dataset, collation and workers as ``loader``, with batches from an EpochBatchSampler."""
    if loader.batch_size is None:
        raise TrainingError("the training DataLoader must batch with batch_size (not a custom batch_sampler)")
    sampler = EpochBatchSampler(
        len(loader.dataset),
        loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        drop_last=loader.drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        # Without a generator of its own, every iter() draws a worker seed from the global RNG, so a run
        # resumed mid-epoch would draw once more than an uninterrupted one and get other dropout masks.
        generator=torch.Generator().manual_seed(seed),
    )


def _in_order(loader: DataLoader) -> DataLoader:
    """``loader``'s batches without shuffling: evaluation always looks at the same batches, and (with a
    generator of its own) leaves the global RNG, and so the dropout masks of training, untouched."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=False,
        drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        generator=torch.Generator(),
    )


def _fused_adamw_supported(accelerator: str) -> bool:
    # The fused kernel does the whole update in one pass per tensor; available on CPU and CUDA.
    return accelerator in ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Trainer:
    fabric: Any
    model: nn.Module  # the plain module (saving, sampling)
    wrapped: nn.Module  # what Fabric set up (forward/backward: device, precision, DDP, compile)
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_data: DataLoader
    train_eval: DataLoader
    val_data: DataLoader | None
    settings: TrainConfig
    total_steps: int
    run: RunDirectory
    saver: ModelSaver
    hooks: TrainHooks
    sample: Callable[[nn.Module], str] | None
    metadata: Mapping[str, Any]
    progress: Progress = field(default_factory=Progress)
    session_tokens: int = 0
    session_seconds: float = 0.0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_data.batch_sampler)

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    def run_to_end(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps, initial=self.progress.step, unit="step", desc="training",
            disable=not (self.fabric.is_global_zero and sys.stderr.isatty()),
        )
        with bar:
            while self.progress.step < self.total_steps:
                self._epoch(bar)
        if self.progress.batch:  # stopped by max_steps inside an epoch: still show what it writes
            self._take_sample()
        if not self.progress.evals or self.progress.evals[-1].step != self.progress.step:
            self._evaluate()
        self.progress.finished = True

    def _epoch(self, bar) -> None:
        self.train_data.batch_sampler.set_position(self.progress.epoch, self.progress.batch)
        batches = iter(self.train_data)
        while self.progress.batch < self.batches_per_epoch and self.progress.step < self.total_steps:
            self._step(batches)
            bar.update(1)
            if self.hooks.on_progress and self.fabric.is_global_zero:
                self.hooks.on_progress(self.progress.step, self.total_steps)
            if (self.progress.step - 1) % self.settings.eval_freq == 0:
                point = self._evaluate()
                bar.set_postfix(train=f"{point.train_loss:.3f}", val=f"{point.val_loss:.3f}")
            if self.progress.batch == self.batches_per_epoch:
                self._take_sample()
                self.progress.epoch += 1
                self.progress.batch = 0
            if self.progress.step % self.settings.checkpoint_every == 0 and self.progress.step < self.total_steps:
                self._save_step()
            if self.progress.batch == 0:
                return

    def _step(self, batches: Iterator) -> None:
        """One optimizer step over up to ``grad_accum_steps`` micro-batches (fewer at an epoch's end)."""
        started = time.perf_counter()
        micro = min(self.settings.grad_accum_steps, self.batches_per_epoch - self.progress.batch)
        for i in range(micro):
            inputs, targets = self.fabric.to_device(next(batches))
            # Gradients are only synchronized across devices on the last micro-batch.
            with self.fabric.no_backward_sync(self.wrapped, enabled=i < micro - 1):
                loss = lm_loss(self.wrapped(inputs), targets) / micro
                self.fabric.backward(loss)
            tokens = inputs.numel() * self.world_size
            self.progress.tokens_seen += tokens
            self.session_tokens += tokens
        if self.settings.grad_clip:
            self.fabric.clip_gradients(self.wrapped, self.optimizer, max_norm=self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.batch += micro
        self.progress.step += 1
        elapsed = time.perf_counter() - started
        self.progress.train_seconds += elapsed
        self.session_seconds += elapsed

    @torch.no_grad()
    def _mean_loss(self, loader: DataLoader | None) -> float:
        if loader is None or len(loader) == 0:
            return float("nan")  # as the workshop's calc_loss_loader
        total, count = 0.0, 0
        for inputs, targets in loader:
            if count == self.settings.eval_iter:
                break
            inputs, targets = self.fabric.to_device((inputs, targets))
            total += lm_loss(self.wrapped(inputs), targets).item()
            count += 1
        return total / count

    def _evaluate(self) -> EvalPoint:
        self.wrapped.eval()
        train_loss, val_loss = self._mean_loss(self.train_eval), self._mean_loss(self.val_data)
        self.wrapped.train()
        p = self.progress
        point = EvalPoint(
            step=p.step,
            epoch=p.epoch + p.batch / self.batches_per_epoch,
            tokens_seen=p.tokens_seen,
            train_loss=train_loss,
            val_loss=val_loss,
            lr=self.optimizer.param_groups[0]["lr"],
        )
        p.evals.append(point)
        log.info("Ep %d (Step %06d): Train loss %.3f, Val loss %.3f", point.epoch_number, p.step, train_loss, val_loss)
        if self.hooks.on_eval and self.fabric.is_global_zero:
            self.hooks.on_eval(point)
        return point

    def _take_sample(self) -> None:
        if self.sample is None:
            return
        record = {"epoch": self.progress.epoch + 1, "step": self.progress.step, "text": self.sample(self.model)}
        self.progress.samples.append(record)
        log.info("Ep %d sample: %s", record["epoch"], record["text"])
        if self.hooks.on_sample and self.fabric.is_global_zero:
            self.hooks.on_sample(record)

    def _save_step(self) -> None:
        if self.fabric.is_global_zero:

            def write(directory: Path) -> None:
                self.saver.save(self.model, directory, self.metadata)
                save_trainer_state(directory, self.optimizer, self.scheduler, self.progress)

            path = self.run.save_step(self.progress.step, write)
            if self.hooks.on_checkpoint:
                self.hooks.on_checkpoint(path, self.progress)
        self.fabric.barrier()

    def save_final(self) -> Path:
        if self.fabric.is_global_zero:

            def write(directory: Path) -> None:
                self.saver.save(self.model, directory, self.metadata)
                write_progress(directory, self.progress)

            self.run.save_final(write)
        self.fabric.barrier()
        return self.run.final

    def resume(self, directory: Path) -> None:
        self.saver.load(self.model, directory)
        state = load_trainer_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.progress = read_progress(directory)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None, settings: TrainConfig,
        run_dir: str | Path, **options: Any) -> TrainResult:  # fmt: skip
    """:func:`train_in` holding ``run_dir`` against other processes: a second run of the same directory (two
    pipelines sharing an output location) waits, then finds the finished model. Under a multi-device launch
    rank 0 holds it; the other ranks wait for rank 0 in Fabric's rendezvous."""
    runtime = resolve_runtime(settings.runtime)
    if runtime.world_size > 1 and not is_launched():
        raise TrainingError(
            f"{runtime.world_size} devices: Fabric re-executes the current command for each one, so "
            "multi-device training must run through groundup.train.launch.run_launched"
        )
    holds = not is_launched() or os.environ.get("LOCAL_RANK", "0") == "0"
    with RunDirectory(run_dir).exclusive() if holds else contextlib.nullcontext():
        return train_in(model, train_loader, val_loader, settings, run_dir, **options)


def train_in(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    settings: TrainConfig,
    run_dir: str | Path,
    *,
    sample: Callable[[nn.Module], str] | None = None,
    hooks: TrainHooks | None = None,
    saver: ModelSaver | None = None,
    identity: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (its parameters with ``requires_grad``) on ``(inputs, targets)`` batches.

    ``run_dir`` holds the run's checkpoints: a killed run resumes from its last one, a finished one is
    returned as it is, without training. ``identity`` (e.g. the dataset digest and model config) joins
    ``settings`` in what the run directory must have been created for. ``sample(model) -> str`` is called
    after every epoch; ``metadata`` goes into every checkpoint's ``config.json`` (through the saver).
    The caller seeds and initialises the model; ``settings.seed`` fixes the batch order.
    """
    hooks, saver = hooks or TrainHooks(), saver or GPTSaver()
    runtime = resolve_runtime(settings.runtime)
    run = RunDirectory(run_dir)
    run.claim({"settings": settings.model_dump(mode="json"), **(identity or {})})
    if run.is_finished():
        log.info("%s holds a finished run; not training again", run.root)
        return TrainResult(run.final, read_progress(run.final), already_finished=True)

    fabric = _make_fabric(runtime)
    fabric.launch()
    train_data = _resumable_loader(train_loader, settings.seed, fabric.global_rank, fabric.world_size)
    batches_per_epoch = len(train_data.batch_sampler)
    if batches_per_epoch == 0:
        raise TrainingError(
            f"the training data gives no batch: {len(train_loader.dataset)} windows for batch_size "
            f"{train_loader.batch_size} on {fabric.world_size} device(s); use more text or smaller batches"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(f"{type(model).__name__} has no parameter with requires_grad=True")
    optimizer = torch.optim.AdamW(
        trainable, lr=settings.lr, weight_decay=settings.weight_decay,
        fused=_fused_adamw_supported(runtime.accelerator) or None,
    )
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum_steps)
    total_steps = min(settings.epochs * steps_per_epoch, settings.max_steps or sys.maxsize)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, settings=settings, total_steps=total_steps)
    )
    forward = torch.compile(model) if runtime.compile else model
    wrapped, optimizer = fabric.setup(forward, optimizer)
    trainer = _Trainer(
        fabric=fabric, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
        train_data=train_data, train_eval=_in_order(train_loader),
        val_data=_in_order(val_loader) if val_loader is not None else None, settings=settings,
        total_steps=total_steps, run=run, saver=saver, hooks=hooks, sample=sample, metadata=metadata or {},
    )
    resumed_from = None
    latest = run.latest()
    if latest is not None:
        trainer.resume(latest)
        resumed_from = trainer.progress.step
        log.info("resuming %s from step %d", run.root, resumed_from)
    wrapped.train()
    with cpu_memory.freed_memory_kept(keeps_freed_memory(settings.runtime, runtime)):
        trainer.run_to_end()
    checkpoint = trainer.save_final()
    speed = trainer.session_tokens / trainer.session_seconds if trainer.session_seconds else None
    return TrainResult(
        checkpoint, trainer.progress, resumed_from=resumed_from, tokens_per_second=speed,
        is_global_zero=fabric.is_global_zero,
    )
