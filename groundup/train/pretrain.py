"""Pretraining the from-scratch GPT on a Parquet token store: the workshop's section 4 as one function.

Settings are checked before anything heavy happens (accelerator, preset, vocabulary, window length), then
the model is built and seeded the workshop's way, trained by :func:`groundup.train.loop.fit` in a run
directory keyed by what it trains (the tokens' digest, the model, the settings), and the loss plot drawn.
Rerunning with the same inputs resumes a killed run or returns the finished one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tiktoken import Encoding
from torch import nn

from groundup.config import PretrainConfig, config_digest
from groundup.files import sha256_file
from groundup.model.generate import generate
from groundup.model.gpt import GPTConfig, GPTModel, config_from_preset, init_weights
from groundup.text.tokenizers import get_tokenizer, text_to_token_ids, token_ids_to_text
from groundup.text.windows import create_dataloaders
from groundup.train.launch import run_launched
from groundup.train.loop import Runtime, TrainHooks, TrainingError, fit, needs_own_process, resolve_runtime
from groundup.train.plots import save_loss_plot
from groundup.train.state import EvalPoint

STAGE = "pretrain"


@dataclass
class PretrainResult:
    checkpoint: str  # model.safetensors + config.json of the trained model
    run_dir: str
    loss_plot: str
    gpt_config: dict[str, Any]
    parameters: int
    steps: int
    epochs: float
    tokens_seen: int
    train_seconds: float
    evals: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    resumed_from: int | None
    already_finished: bool
    tokens_per_second: float | None

    @property
    def eval_points(self) -> list[EvalPoint]:
        return [EvalPoint(**point) for point in self.evals]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gpt_config(config: PretrainConfig) -> GPTConfig:
    try:
        return config_from_preset(config.model.preset, **config.model.overrides())
    except ValueError as exc:
        raise TrainingError(f"model settings: {exc}") from None


def window_settings(config: PretrainConfig, cfg: GPTConfig) -> tuple[int, int]:
    max_length = config.train.max_length or cfg.context_length
    if max_length > cfg.context_length:
        raise TrainingError(
            f"train.max_length ({max_length}) is longer than the model's context_length ({cfg.context_length})"
        )
    return max_length, config.train.stride or max_length


@dataclass(frozen=True)
class PretrainPlan:
    """Settings checked and resolved: what a run will use, known before any data is read."""

    runtime: Runtime
    gpt: GPTConfig
    max_length: int
    stride: int
    tokenizer: Encoding


def plan_pretraining(config: PretrainConfig) -> PretrainPlan:
    """Check every setting that can be checked without the data; each problem is a named error."""
    runtime = resolve_runtime(config.train.runtime)
    cfg = gpt_config(config)
    max_length, stride = window_settings(config, cfg)
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.vocab_dir)
    if cfg.vocab_size < tokenizer.n_vocab:
        raise TrainingError(
            f"model vocab_size {cfg.vocab_size} is smaller than the {config.data.tokenizer} tokenizer's "
            f"{tokenizer.n_vocab} token ids"
        )
    return PretrainPlan(runtime, cfg, max_length, stride, tokenizer)


def build_model(cfg: GPTConfig, config: PretrainConfig) -> GPTModel:
    """The workshop's ``torch.manual_seed(123); model = GPTModel(cfg)`` (or GPT-2's initialisation)."""
    torch.manual_seed(config.train.seed)
    model = GPTModel(cfg)
    if config.train.init == "gpt2":
        init_weights(model)
    return model


def text_sampler(tokenizer: Encoding, start_context: str, max_new_tokens: int) -> Callable[[nn.Module], str]:
    """The workshop's ``generate_and_print_sample``: greedy continuation of ``start_context``, one line."""

    def sample(model: nn.Module) -> str:
        idx = text_to_token_ids(start_context, tokenizer).to(next(model.parameters()).device)
        out = generate(model, idx, max_new_tokens, eos_id=None)
        return token_ids_to_text(out, tokenizer).replace("\n", " ")

    return sample


def run_directory(output_dir: str | Path, identity: dict[str, Any], config: PretrainConfig) -> Path:
    key = config_digest({"identity": identity, "train": config.train.model_dump(mode="json")})
    return Path(output_dir) / "checkpoints" / f"{STAGE}-{key}"


def pretrain_gpt(
    parquet: str | Path,
    config: PretrainConfig,
    output_dir: str | Path = "artifacts",
    *,
    hooks: TrainHooks | None = None,
    parquet_sha256: str | None = None,
) -> PretrainResult | None:
    """Pretrain on the tokens in ``parquet``; the checkpoint lands under ``<output_dir>/checkpoints/``.

    Returns None only on the non-zero ranks of a multi-device run. With more than one device, or on a CPU
    off the main thread, the run happens in a launched subprocess (see :func:`needs_own_process`); ``hooks``
    are called here all the same, as the subprocess reports.
    """
    plan = plan_pretraining(config)
    cfg = plan.gpt
    parquet_sha256 = parquet_sha256 or sha256_file(parquet)
    identity = {
        "tokens_sha256": parquet_sha256,
        "train_ratio": config.data.train_ratio,
        "tokenizer": config.data.tokenizer,
        "model": cfg.to_dict(),
    }
    run_dir = run_directory(output_dir, identity, config)
    if needs_own_process(config.train.runtime, plan.runtime):
        run_dir.mkdir(parents=True, exist_ok=True)
        job = {"parquet": str(parquet), "config": config.model_dump(mode="json"), "output_dir": str(output_dir),
               "parquet_sha256": parquet_sha256}
        hooks = hooks or TrainHooks()
        return PretrainResult(**run_launched(f"{__name__}:launched_pretrain", job, run_dir, on_event=hooks.replay))

    train_loader, val_loader = create_dataloaders(
        parquet, max_length=plan.max_length, stride=plan.stride, batch_size=config.train.batch_size,
        train_ratio=config.data.train_ratio, seed=config.train.seed,
    )
    model = build_model(cfg, config)
    result = fit(
        model, train_loader, val_loader, config.train, run_dir,
        sample=text_sampler(plan.tokenizer, config.train.start_context, config.train.sample_tokens),
        hooks=hooks, identity=identity,
        metadata={"tokenizer": config.data.tokenizer, "stage": STAGE, "tokens_sha256": parquet_sha256},
    )
    if not result.is_global_zero:
        return None
    progress = result.progress
    plot = save_loss_plot(progress.evals, run_dir / "loss.png")
    return PretrainResult(
        checkpoint=str(result.checkpoint),
        run_dir=str(run_dir),
        loss_plot=str(plot),
        gpt_config=cfg.to_dict(),
        parameters=model.num_parameters(),
        steps=progress.step,
        epochs=progress.evals[-1].epoch,
        tokens_seen=progress.tokens_seen,
        train_seconds=progress.train_seconds,
        evals=[asdict(point) for point in progress.evals],
        samples=progress.samples,
        resumed_from=result.resumed_from,
        already_finished=result.already_finished,
        tokens_per_second=result.tokens_per_second,
    )


def launched_pretrain(parquet: str, config: dict[str, Any], output_dir: str, parquet_sha256: str) -> dict | None:
    """Entry point of every rank of a launched run (``python -m groundup.train.launch``)."""
    result = pretrain_gpt(
        parquet, PretrainConfig.model_validate(config), output_dir, hooks=TrainHooks.to_parent(),
        parquet_sha256=parquet_sha256,
    )
    return result.to_dict() if result is not None else None
