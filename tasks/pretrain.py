"""Prefect task ``pretrain``: train the from-scratch GPT on a Parquet token store, track and register it.

Cached on content (the Parquet bytes and the settings). Below the cache, the library keeps a run directory
per inputs: a killed run resumes from its last checkpoint, a finished one is never trained again, and the
model version it was registered as is reused instead of registering a duplicate.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from groundup import tracking
from groundup.config import PretrainConfig
from groundup.errors import ModelError
from groundup.files import sha256_file, write_json
from groundup.tasks.common import StageResult, content_key, png_markdown, progress_reporter, stage_run
from groundup.train.loop import TrainHooks
from groundup.train.pretrain import STAGE, PretrainResult, pretrain_gpt
from groundup.train.state import EvalPoint

MODEL_NAME = "groundup-gpt"
TOKENS_DATASET = "pretrain-tokens"
REGISTERED_FILE = "registered.json"


@dataclasses.dataclass
class PretrainedModel(StageResult):
    """What pretraining hands on: the checkpoint, its registered version and how the training went."""

    checkpoint: str
    model_version: str  # ``groundup-gpt/N``
    loss_plot: str
    run_dir: str
    steps: int
    tokens_seen: int
    final_train_loss: float
    final_val_loss: float
    samples: list[dict[str, Any]]  # text generated at the end of each epoch: epoch, step, text
    resumed_from: int | None
    run_id: str


def _eval_metrics(point: EvalPoint) -> dict[str, float]:
    return {
        "train_loss": point.train_loss,
        "val_loss": point.val_loss,
        "tokens_seen": point.tokens_seen,
        "epoch": point.epoch,
        "lr": point.lr,
    }


def _registered_version(run_dir: Path) -> str | None:
    """The model version an earlier task run registered this checkpoint as, if it is still registered."""
    path = run_dir / REGISTERED_FILE
    if not path.is_file():
        return None
    ref = json.loads(path.read_text(encoding="utf-8"))["model_version"]
    try:
        tracking.resolve_version(ref)
    except ModelError:
        return None
    return ref


def summary_markdown(result: PretrainResult, model_version: str, config: PretrainConfig) -> str:
    final = result.evals[-1]
    cfg = result.gpt_config
    samples = "\n".join(f"| {s['epoch']} | {s['step']} | {s['text']!r} |" for s in result.samples)
    speed = f"{result.tokens_per_second:,.0f}" if result.tokens_per_second else "–"
    how = "already trained: reused" if result.already_finished else (
        f"resumed from step {result.resumed_from}" if result.resumed_from else "trained from scratch"
    )
    return (
        f"# Pretraining: {model_version}\n\n"
        f"| | |\n| --- | --- |\n"
        f"| model | {config.model.preset}: {cfg['n_layers']} layers, {cfg['n_heads']} heads, emb {cfg['emb_dim']}, "
        f"context {cfg['context_length']}, {result.parameters:,} parameters |\n"
        f"| run | {how}; {result.steps} steps, {result.epochs:g} epochs, {result.tokens_seen:,} tokens seen |\n"
        f"| final loss | train {final['train_loss']:.3f}, validation {final['val_loss']:.3f} |\n"
        f"| speed | {speed} tokens/s |\n"
        f"| checkpoint | `{result.checkpoint}` |\n\n"
        f"{png_markdown(result.loss_plot, 'training and validation loss')}\n\n"
        f"## Samples ({config.train.start_context!r})\n\n| epoch | step | text |\n| ---: | ---: | --- |\n{samples}\n"
    )


@task(name="pretrain", cache_key_fn=content_key, persist_result=True)
def pretrain(
    parquet: str,
    config: PretrainConfig,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    text_sha256: str | None = None,
) -> PretrainedModel:
    """Pretrain on ``parquet``, log the run to MLflow and register the model as ``groundup-gpt``.

    ``text_sha256`` (the raw text the tokens came from) joins the Parquet digest in the model's lineage.
    """
    logger = get_run_logger()
    with stage_run(STAGE, config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
        parquet_sha256 = sha256_file(parquet)
        run.log_dataset(parquet, name=TOKENS_DATASET, digest=parquet_sha256, context="training")
        logged: set[int] = set()

        def log_eval(point: EvalPoint) -> None:
            run.log_metrics(_eval_metrics(point), step=point.step)
            logged.add(point.step)
            logger.info(f"Ep {point.epoch_number} (Step {point.step:06d}): "
                        f"Train loss {point.train_loss:.3f}, Val loss {point.val_loss:.3f}")

        hooks = TrainHooks(
            on_eval=log_eval,
            on_sample=lambda s: logger.info(f"Ep {s['epoch']} sample: {s['text']}"),
            on_progress=progress_reporter(f"pretraining {config.model.preset}"),
        )
        result = pretrain_gpt(parquet, config, output_dir, hooks=hooks, parquet_sha256=parquet_sha256)
        for point in result.eval_points:  # measured by an earlier, interrupted session of this run
            if point.step not in logged:
                log_eval(point)
        final = result.evals[-1]
        run.log_params({"parameters": result.parameters, "run_dir": result.run_dir, "resumed_from": result.resumed_from,
                        "already_finished": result.already_finished})
        run.log_metrics({"final_train_loss": final["train_loss"], "final_val_loss": final["val_loss"],
                         "steps": result.steps, "train_seconds": result.train_seconds,
                         "tokens_per_second": result.tokens_per_second})
        run.log_artifact(result.loss_plot)
        run.log_dict(result.samples, "samples.json")

        run_dir = Path(result.run_dir)
        model_version = _registered_version(run_dir)
        if model_version is None:
            datasets = {TOKENS_DATASET: parquet_sha256, **({"text": text_sha256} if text_sha256 else {})}
            version = run.register_directory(
                result.checkpoint, MODEL_NAME, datasets=datasets, params=config.model_dump(mode="json"),
                tags={tracking.TAG + "gpt_config": json.dumps(result.gpt_config, sort_keys=True)},
            )
            model_version = tracking.version_ref(version)
            write_json(run_dir / REGISTERED_FILE, {"model_version": model_version, "run_id": run.run_id})
        else:
            logger.info(f"{result.checkpoint} is already registered as {model_version}")
            run.log_model_outputs([tracking.model_id_of(tracking.resolve_version(model_version))])
        markdown = summary_markdown(result, model_version, config)
        create_markdown_artifact(key="pretrain-summary", markdown=markdown, description="pretraining summary")
        return PretrainedModel(
            checkpoint=result.checkpoint,
            model_version=model_version,
            loss_plot=result.loss_plot,
            run_dir=result.run_dir,
            steps=result.steps,
            tokens_seen=result.tokens_seen,
            final_train_loss=final["train_loss"],
            final_val_loss=final["val_loss"],
            samples=result.samples,
            resumed_from=result.resumed_from,
            run_id=run.run_id,
        )
