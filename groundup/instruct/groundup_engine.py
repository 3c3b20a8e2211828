"""Engine ``groundup``: instruction finetuning of our own GPT with LoRA (LLMs-from-scratch chapter 7 +
appendix E). :class:`GroundupEngine` is its face in ``groundup.instruct.engines``.

The base is a groundup checkpoint (converted GPT-2 weights, or the pipeline's own pretrained model). Its
chosen linear layers get LoRA adapters (``groundup.model.lora``), everything else is frozen, and the
adapters train in the pretraining stage's Fabric loop (``groundup.train.loop.fit``): same accelerator,
precision, gradient accumulation, checkpoint/resume and evaluation schedule. The batches are
``groundup.instruct.batching``'s (prompt + response + end-of-text, padding ignored in the loss).

Outputs in ``out_dir``: ``val.json`` (the held-out validation entries), ``run/`` (the loop's run
directory: step checkpoints while training, ``run/final/`` at the end) and ``loss.png``. ``run/final`` is
the adapter directory: ``adapter.safetensors`` + ``adapter.json`` naming the base checkpoint, which
``groundup.model.io.load_model`` (``groundup generate``, the response stage) loads as base + adapter.

Recipes are profiles: ``chapter7`` is LLMs-from-scratch chapter 7 (GPT-2 355M, AdamW lr 5e-5, weight
decay 0.1, batch 8, 2 epochs) with appendix E's LoRA (r 16, alpha 16, every linear layer); ``quickstart``
finetunes GPT-2 124M for one epoch on a slice of the data on a laptop CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tiktoken
import torch
from torch import nn
from torch.utils.data import DataLoader

from groundup.config import FinetuneConfig, LoRAConfig, TrainConfig
from groundup.errors import SettingsError
from groundup.files import sha256_file, write_json
from groundup.instruct.batching import InstructionDataset, instruction_loader
from groundup.instruct.data import holdout_validation, load_entries
from groundup.instruct.engines import FinetuneBase, FinetuneJob, FinetuneOutcome, TrainCallbacks
from groundup.instruct.prompts import format_prompt
from groundup.model.generate import generate
from groundup.model.gpt import GPTModel
from groundup.model.io import load_checkpoint
from groundup.model.lora import apply_lora, base_reference, load_lora_weights, save_adapter
from groundup.text.tokenizers import get_tokenizer
from groundup.train.launch import run_launched
from groundup.train.loop import TrainHooks, TrainingError, fit, needs_own_process, resolve_runtime
from groundup.train.plots import save_loss_plot
from groundup.train.state import Progress

TOKENIZER = "gpt2"
SAMPLE_TOKENS = 50


class FinetuneError(SettingsError):
    """Settings or inputs the groundup finetuning cannot start with; raised before any training."""


@dataclass
class GroundupFinetuneResult:
    adapter_dir: Path  # run/final: adapter.safetensors + adapter.json (+ progress.json)
    out_dir: Path
    val_file: Path
    loss_plot: Path | None
    progress: Progress
    n_train: int
    n_val: int
    trainable_parameters: int
    total_parameters: int
    resumed_from: int | None
    already_finished: bool
    tokens_per_second: float | None
    is_global_zero: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (a multi-device run hands its result over as JSON)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
        data["progress"] = self.progress.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroundupFinetuneResult:
        paths = {k: Path(data[k]) for k in ("adapter_dir", "out_dir", "val_file")}
        plot = Path(data["loss_plot"]) if data.get("loss_plot") else None
        return cls(**{**data, **paths, "loss_plot": plot, "progress": Progress.from_dict(data["progress"])})

    @property
    def metrics(self) -> dict[str, float]:
        """The last evaluation, plus sizes and speed: what the task logs as final metrics."""
        last = self.progress.evals[-1] if self.progress.evals else None
        out: dict[str, float] = {
            "steps": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "train_seconds": self.progress.train_seconds,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
        }
        if last is not None:
            out.update(train_loss=last.train_loss, val_loss=last.val_loss)
            if math.isfinite(last.val_loss):
                out["val_ppl"] = math.exp(min(last.val_loss, 50.0))
        if self.tokens_per_second:
            out["tokens_per_second"] = self.tokens_per_second
        return out


class AdapterSaver:
    """The loop's checkpoints hold only the adapter (a few MB), never a copy of the frozen base."""

    def __init__(self, lora: LoRAConfig, base: dict[str, Any]) -> None:
        self.lora, self.base = lora, base

    def save(self, model: nn.Module, directory: Path, metadata: Mapping[str, Any]) -> None:
        save_adapter(model, directory, self.lora, self.base, dict(metadata))

    def load(self, model: nn.Module, directory: Path) -> None:
        load_lora_weights(model, directory)


def train_settings(config: FinetuneConfig, eval_batches: int) -> TrainConfig:
    """The loop's settings for a finetuning run. Evaluation covers the whole validation set every
    ``eval_interval`` steps; a resumable checkpoint (the adapter + optimizer state) is written as often."""
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.micro_batch_size,
        grad_accum_steps=config.global_batch_size // config.micro_batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        max_steps=config.max_steps,
        eval_freq=config.eval_interval,
        eval_iter=max(eval_batches, 1),
        checkpoint_every=config.eval_interval,
        sample_tokens=SAMPLE_TOKENS,
        seed=config.seed,
        runtime=config.runtime,
    )


def check_supported(config: FinetuneConfig) -> None:
    """Settings this engine refuses, checked before anything is read or written."""
    if config.litgpt.quantize:
        raise FinetuneError(
            f"finetune.litgpt.quantize={config.litgpt.quantize!r} is a LitGPT (bitsandbytes) option; the groundup "
            "engine trains unquantized weights: leave it empty or use engine=litgpt"
        )
    if config.global_batch_size % config.micro_batch_size:
        raise FinetuneError(
            f"global_batch_size ({config.global_batch_size}) must be a multiple of micro_batch_size "
            f"({config.micro_batch_size})"
        )


def response_sampler(
    entry: Mapping[str, str], tokenizer: tiktoken.Encoding, prompt_style: str, max_new_tokens: int
) -> Callable[[nn.Module], str]:
    """The model's greedy answer to one validation prompt: the loop's after-epoch sample."""
    prompt = tokenizer.encode_ordinary(format_prompt(entry, prompt_style))

    def sample(model: nn.Module) -> str:
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        out = generate(model, idx, max_new_tokens, eos_id=tokenizer.eot_token)
        return tokenizer.decode([t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eot_token])

    return sample


def _loaders(
    fit_entries: Sequence[Mapping[str, str]],
    val_entries: Sequence[Mapping[str, str]],
    tokenizer: tiktoken.Encoding,
    config: FinetuneConfig,
    context_length: int,
) -> tuple[DataLoader, DataLoader | None, int]:
    """Train (shuffled) and validation loaders, and the batch width both are cut to."""
    allowed = min(config.max_seq_length or context_length, context_length)
    options = {"allowed_max_length": allowed, "mask_prompt": config.mask_prompt, "seed": config.seed}
    train = instruction_loader(
        InstructionDataset(fit_entries, tokenizer, config.prompt_style),
        config.micro_batch_size,
        shuffle=True,
        **options,
    )
    val = None
    if val_entries:
        val = instruction_loader(
            InstructionDataset(val_entries, tokenizer, config.prompt_style),
            config.micro_batch_size,
            shuffle=False,
            **options,
        )
    return train, val, allowed


def finetune_gpt(
    base_dir: str | Path,
    train_path: str | Path,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 123,
    base_model_ref: str | None = None,
    hooks: TrainHooks | None = None,
    tokenizer: tiktoken.Encoding | None = None,
) -> GroundupFinetuneResult:
    """LoRA-finetune the groundup checkpoint ``base_dir`` on the entries of ``train_path``.

    ``val_fraction`` of them (chosen with ``seed``, as the LitGPT engine does) are held out for validation.
    ``base_model_ref`` (e.g. ``gpt2-124m/1``) is recorded in the adapter so it can find its base through the
    registry. A killed run resumes from its last checkpoint in ``out_dir/run``; a finished one is returned.
    More than one device, or a CPU off the main thread, runs in a process of its own
    (:func:`needs_own_process`); ``hooks`` are called here all the same, as that process reports.
    """
    check_supported(config)
    if needs_own_process(config.runtime, resolve_runtime(config.runtime, "finetune.runtime")):
        job = {
            "base_dir": str(base_dir),
            "train_path": str(train_path),
            "config": config.model_dump(mode="json"),
            "out_dir": str(out_dir),
            "val_fraction": val_fraction,
            "seed": seed,
            "base_model_ref": base_model_ref,
        }
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hooks = hooks or TrainHooks()
        launched = run_launched(f"{__name__}:launched_finetune", job, out_dir, on_event=hooks.replay)
        return GroundupFinetuneResult.from_dict(launched)

    out_dir = Path(out_dir)
    tokenizer = tokenizer or get_tokenizer(TOKENIZER)
    base = base_reference(base_dir, base_model_ref)
    model = _load_base(base["path"], tokenizer)
    fit_entries, val_entries = holdout_validation(load_entries(train_path), val_fraction, seed)
    val_file = write_json(out_dir / "val.json", val_entries)
    train_loader, val_loader, allowed = _loaders(
        fit_entries, val_entries, tokenizer, config, model.cfg.context_length
    )

    torch.manual_seed(config.seed)  # LoRA's A matrices (and dropout) draw from it
    apply_lora(model, config.lora)
    model.train()
    identity = {
        "base_weights_sha256": base["weights_sha256"],
        "train_sha256": sha256_file(train_path),
        "val_fraction": val_fraction,
        "data_seed": seed,
        "lora": config.lora.model_dump(mode="json"),
        "prompt_style": config.prompt_style,
        "mask_prompt": config.mask_prompt,
        "allowed_max_length": allowed,
    }
    try:
        result = fit(
            model,
            train_loader,
            val_loader,
            train_settings(config, len(val_loader) if val_loader else 0),
            out_dir / "run",
            sample=response_sampler(
                (val_entries or fit_entries)[0], tokenizer, config.prompt_style, SAMPLE_TOKENS
            ),
            hooks=hooks,
            saver=AdapterSaver(config.lora, base),
            identity=identity,
            metadata={"tokenizer": TOKENIZER, "prompt_style": config.prompt_style, "engine": "groundup"},
        )
    except TrainingError as exc:
        raise FinetuneError(f"finetuning {base_dir} on {train_path}: {exc}") from exc
    evals = result.progress.evals
    plot = save_loss_plot(evals, out_dir / "loss.png") if evals and result.is_global_zero else None
    return GroundupFinetuneResult(
        adapter_dir=result.checkpoint,
        out_dir=out_dir,
        val_file=val_file,
        loss_plot=plot,
        progress=result.progress,
        n_train=len(fit_entries),
        n_val=len(val_entries),
        trainable_parameters=model.num_parameters(trainable_only=True),
        total_parameters=model.num_parameters(),
        resumed_from=result.resumed_from,
        already_finished=result.already_finished,
        tokens_per_second=result.tokens_per_second,
        is_global_zero=result.is_global_zero,
    )


def _load_base(directory: str | Path, tokenizer: tiktoken.Encoding) -> GPTModel:
    model = load_checkpoint(directory)
    if model.cfg.vocab_size < tokenizer.n_vocab:
        raise FinetuneError(
            f"base {directory}: vocabulary of {model.cfg.vocab_size} tokens, but the {TOKENIZER} tokenizer "
            f"needs {tokenizer.n_vocab}"
        )
    return model


def launched_finetune(config: dict[str, Any], **job: Any) -> dict[str, Any] | None:
    """One rank of a launched run (``groundup.train.launch``); rank zero returns the result."""
    result = finetune_gpt(config=FinetuneConfig.model_validate(config), hooks=TrainHooks.to_parent(), **job)
    return result.to_dict() if result.is_global_zero else None


def _summary(result: GroundupFinetuneResult) -> str:
    samples = "\n".join(f"- epoch {s['epoch']}: {s['text']!r}" for s in result.progress.samples)
    return (
        f"The adapter in `{result.adapter_dir}` on top of its base; {result.n_train} training / {result.n_val} "
        f"validation entries; {result.trainable_parameters:,} of {result.total_parameters:,} parameters "
        f"trained.\n\nAnswers to a validation prompt:\n{samples}"
    )


class GroundupEngine:
    """Engine ``groundup``: LoRA adapters on a groundup checkpoint (GPT-2, the pretrained model, a directory).

    The adapter (a few MB) is what gets registered, not a merged copy of the base: the base is already a
    registered version or a directory, and the adapter records its path, weights digest and version, so
    ``model.loading.load_model`` rebuilds the finetuned model from either.
    """

    name = "groundup"
    stage = "finetune_groundup"  # the MLflow stage run (and lineage) name
    accepts = ("gpt2", "pretrained", "directory")

    def check(self, config: FinetuneConfig) -> None:
        check_supported(config)
        resolve_runtime(config.runtime, "finetune.runtime")

    def prepare_base(self, base: FinetuneBase, output_root: Path, *, hf_token: str | None = None, on_line: Any = None) -> Path:
        """A directory base is used in place (GPT-2 sizes and ``pretrained`` come from their stages)."""
        return Path(base.value)

    def train(self, job: FinetuneJob, callbacks: TrainCallbacks) -> FinetuneOutcome:
        result = finetune_gpt(
            job.base_dir, job.train_path, job.config, job.out_dir, val_fraction=job.val_fraction, seed=job.seed,
            base_model_ref=job.base_model_ref,
            hooks=TrainHooks(
                on_eval=callbacks.on_eval, on_progress=callbacks.on_progress,
                on_checkpoint=(lambda _, progress: callbacks.on_checkpoint(progress.step))
                if callbacks.on_checkpoint else None,
            ),
        )  # fmt: skip
        return FinetuneOutcome(
            model_dir=result.adapter_dir,
            out_dir=result.out_dir,
            val_file=result.val_file,
            n_train=result.n_train,
            n_val=result.n_val,
            final_metrics=result.metrics,
            loss_plot=result.loss_plot,
            params={"resumed_from": result.resumed_from},
            evals=result.progress.evals,
            records={"samples.json": result.progress.samples},
            summary=_summary(result),
            extra={"adapter_dir": str(result.adapter_dir)},
        )
