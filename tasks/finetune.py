"""Prefect tasks for instruction data and finetuning: ``split_instructions``, ``finetune_lora`` (LitGPT) and
``finetune_groundup`` (our own GPT with our LoRA).

All are cached on content: the instruction source (the file itself when it is local), the base model
(its files when it is a directory), the training data and the settings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from groundup import tracking
from groundup.config import FinetuneConfig, InstructDataConfig, config_digest
from groundup.files import sha256_file, sha256_tree
from groundup.instruct import data as instruct_data
from groundup.instruct import litgpt_finetune, lora_finetune
from groundup.tasks.common import content_key_with, png_markdown, progress_reporter, stage_run
from groundup.train.loop import TrainHooks
from groundup.train.state import EvalPoint

TRAIN_DATASET = "instruct-train"
TEST_DATASET = "instruct-test"
VAL_DATASET = "instruct-val"


# ---------------------------------------------------------------------------------------------------------
# Instruction data
# ---------------------------------------------------------------------------------------------------------


@task(name="split_instructions", cache_key_fn=content_key_with("config.source"), persist_result=True)
def split_instructions(
    config: InstructDataConfig,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Fetch, validate and split the instruction data into ``<output_dir>/instruct/<settings>/``."""
    out = Path(output_dir)
    with stage_run(
        "split_instructions",
        config=config,
        parent_run_id=parent_run_id,
        output_dir=output_dir,
        experiment=experiment,
    ) as run:
        split = instruct_data.prepare_instruction_data(
            config, out_dir=out / "instruct" / config.digest(), cache_dir=out / "downloads"
        )
        remote = config.source if config.source.startswith(("http://", "https://")) else None
        for path, name, digest, context in (
            (split.train, TRAIN_DATASET, split.train_sha256, "training"),
            (split.test, TEST_DATASET, split.test_sha256, "testing"),
        ):
            run.log_dataset(path, name=name, digest=digest, context=context, source=remote)
        run.log_params({"source_sha256": split.source_sha256})
        run.log_metrics({"n_train": split.n_train, "n_test": split.n_test})
        create_markdown_artifact(
            key="instruction-split",
            markdown=(
                f"### Instruction data split\n\n| | entries | sha256 |\n|---|---|---|\n"
                f"| train | {split.n_train} | `{split.train_sha256[:16]}` |\n"
                f"| test | {split.n_test} | `{split.test_sha256[:16]}` |\n\n"
                f"Source: `{config.source}` (sha256 `{split.source_sha256[:16]}`)"
            ),
            description="train/test split of the instruction data",
        )
        return {
            **split.as_dict(),
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "run_id": run.run_id,
        }


# ---------------------------------------------------------------------------------------------------------
# LoRA finetuning with LitGPT
# ---------------------------------------------------------------------------------------------------------


def hf_token(secret_name: str | None) -> str | None:
    """The Hugging Face token: the named Prefect Secret block if one is configured, else ``$HF_TOKEN``."""
    if secret_name:
        from prefect.blocks.system import Secret

        return Secret.load(secret_name).get()
    return os.environ.get("HF_TOKEN") or None


def model_name(base: str) -> str:
    """``microsoft/phi-2`` or ``/ckpts/phi-2`` -> ``finetuned-phi-2`` (a valid registry name)."""
    stem = Path(base.rstrip("/")).name or base
    return "finetuned-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def base_reference(base: str, base_dir: Path) -> str:
    """How the lineage names the base model: ``hf:<hub id>`` or the local checkpoint directory."""
    return f"hf:{base}" if litgpt_finetune.is_hub_id(base) else f"dir:{base_dir}"


def _metrics_and_plot(metrics: dict[str, float], loss_plot: str | Path | None) -> tuple[str, str]:
    """The final metrics as a markdown table and the loss curves inlined, for either engine's summary."""
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()))
    plot = png_markdown(loss_plot, "loss curves") if loss_plot else ""
    return f"| metric | value |\n|---|---|\n{rows}", plot


def _markdown_summary(base: str, result: litgpt_finetune.FinetuneResult, model_ref: str) -> str:
    table, plot = _metrics_and_plot(result.metrics.final, result.loss_plot)
    return (
        f"### LoRA finetuning (LitGPT) of `{base}`\n\n"
        f"Registered as **{model_ref}**; merged model in `{result.model_dir}`.\n"
        f"{result.n_train} training / {result.n_val} validation entries on "
        f"{result.placement.accelerator} ({result.placement.precision or 'LitGPT default precision'}).\n\n"
        f"{table}\n\n{plot}\n"
    )


@task(name="finetune_lora", cache_key_fn=content_key_with("config.base"), persist_result=True)
def finetune_lora(
    train_path: str,
    config: FinetuneConfig,
    val_fraction: float = 0.1,
    seed: int = 123,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """LoRA-finetune ``config.base`` with LitGPT on ``train_path`` (``val_fraction`` of it held out with
    ``seed`` for validation), log the run to MLflow and register the merged model."""
    logger = get_run_logger()
    out = Path(output_dir).resolve()
    with stage_run(
        "finetune_lora",
        config=config,
        parent_run_id=parent_run_id,
        output_dir=output_dir,
        experiment=experiment,
    ) as run:
        token = hf_token(config.hf_token_secret) if litgpt_finetune.is_hub_id(config.base) else None
        base_dir = litgpt_finetune.resolve_base_model(
            config.base, out / "checkpoints" / "litgpt", hf_token=token, on_line=logger.info
        )
        base_sha256 = sha256_tree(base_dir)
        train_sha256 = sha256_file(train_path)
        run_key = config_digest([base_sha256, train_sha256, config.digest(), val_fraction, seed])
        result = litgpt_finetune.finetune_lora(
            base_dir,
            train_path,
            config,
            out / "finetune" / f"litgpt-{run_key}",
            val_fraction=val_fraction,
            seed=seed,
            on_line=logger.info,
            on_progress=progress_reporter(f"LoRA finetuning of {config.base}"),
        )

        run.log_params(
            {
                "val_fraction": val_fraction,
                "data_seed": seed,
                "base_dir": str(base_dir),
                "base_sha256": base_sha256,
                "accelerator": result.placement.accelerator,
                "resolved_precision": result.placement.precision or "litgpt-default",
                "n_train": result.n_train,
                "n_val": result.n_val,
            }
        )
        run.log_dataset(train_path, name=TRAIN_DATASET, digest=train_sha256, context="training")
        val_sha256 = sha256_file(result.val_file)
        run.log_dataset(result.val_file, name=VAL_DATASET, digest=val_sha256, context="validation")
        for name, points in result.metrics.series.items():
            run.log_metric_history(name, points)
        run.log_metrics({f"final_{k}": v for k, v in result.metrics.final.items()})
        if result.loss_plot:
            run.log_artifact(result.loss_plot)
        run.log_artifact(result.out_dir / "litgpt_finetune.yaml")
        run.log_artifact(litgpt_finetune.find_metrics_csv(result.out_dir))

        version = run.register_directory(
            result.model_dir,
            model_name(config.base),
            parent=base_reference(config.base, base_dir),
            datasets={TRAIN_DATASET: train_sha256},
            params={
                "engine": "litgpt",
                "lora": config.lora.model_dump(),
                "prompt_style": config.prompt_style,
            },
            tags={
                tracking.TAG + "base_model": config.base,
                tracking.TAG + "base_sha256": base_sha256,
                tracking.TAG + "engine": "litgpt",
            },
            model_type="litgpt",
        )
        model_ref = tracking.version_ref(version)
        create_markdown_artifact(
            key="finetune-lora",
            markdown=_markdown_summary(config.base, result, model_ref),
            description="LoRA finetuning with LitGPT",
        )
        return {
            "engine": "litgpt",
            "model_ref": model_ref,
            "model_dir": str(result.model_dir),
            "lora_weights": str(result.lora_weights),
            "out_dir": str(result.out_dir),
            "loss_plot": str(result.loss_plot) if result.loss_plot else None,
            "base": config.base,
            "base_dir": str(base_dir),
            "base_sha256": base_sha256,
            "train_sha256": train_sha256,
            "prompt_style": config.prompt_style,
            "metrics": result.metrics.final,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "run_id": run.run_id,
        }


# ---------------------------------------------------------------------------------------------------------
# LoRA finetuning of our own GPT (engine "groundup")
# ---------------------------------------------------------------------------------------------------------


def groundup_base(config: FinetuneConfig, base_checkpoint: str | None) -> Path:
    """The groundup checkpoint to finetune: the one handed over by the weights/pretrain stage, else
    ``config.base`` as a directory. GPT-2 sizes and ``pretrained`` are resolved by the flows."""
    if base_checkpoint:
        return Path(base_checkpoint)
    if Path(config.base).is_dir():
        return Path(config.base)
    raise ValueError(
        f"finetune.base={config.base!r} is not a checkpoint directory; a GPT-2 size or 'pretrained' needs "
        "its checkpoint passed as base_checkpoint (the finetune and pipeline flows fetch or train it first)"
    )


def _groundup_summary(base: Path, result: lora_finetune.GroundupFinetuneResult, model_ref: str) -> str:
    samples = "\n".join(f"- epoch {s['epoch']}: {s['text']!r}" for s in result.progress.samples)
    table, plot = _metrics_and_plot(result.metrics, result.loss_plot)
    return (
        f"### LoRA finetuning (groundup) of `{base}`\n\n"
        f"Registered as **{model_ref}**: the adapter in `{result.adapter_dir}` on top of its base.\n"
        f"{result.n_train} training / {result.n_val} validation entries; "
        f"{result.trainable_parameters:,} of {result.total_parameters:,} parameters trained.\n\n"
        f"{table}\n\n{plot}\n\nAnswers to a validation prompt:\n{samples}\n"
    )


@task(name="finetune_groundup", cache_key_fn=content_key_with("config.base"), persist_result=True)
def finetune_groundup(
    train_path: str,
    config: FinetuneConfig,
    val_fraction: float = 0.1,
    seed: int = 123,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    base_checkpoint: str | None = None,
    base_model_ref: str | None = None,
) -> dict[str, Any]:
    """LoRA-finetune our GPT (``base_checkpoint``, else ``config.base`` as a directory) on ``train_path``,
    log the run to MLflow and register the adapter directory with lineage to ``base_model_ref`` (e.g.
    ``gpt2-124m/1``) and the training data digest.

    The adapter (a few MB) is what gets registered, not a merged copy of the base: the base is already a
    registered version, and the adapter records its path, weights digest and version, so
    ``model.io.load_model`` rebuilds the finetuned model from either. Cached on the contents of the base
    checkpoint and the training data, and on the settings.
    """
    out = Path(output_dir).resolve()
    base_dir = groundup_base(config, base_checkpoint)
    with stage_run(
        "finetune_groundup", config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment
    ) as run:
        base_sha256 = sha256_file(base_dir / "model.safetensors")
        train_sha256 = sha256_file(train_path)
        run_key = config_digest([base_sha256, train_sha256, config.digest(), val_fraction, seed])
        logged: set[int] = set()

        def log_eval(point: EvalPoint) -> None:
            metrics = {"train_loss": point.train_loss, "val_loss": point.val_loss, "lr": point.lr}
            run.log_metrics({**metrics, "tokens_seen": point.tokens_seen, "epoch": point.epoch}, step=point.step)
            logged.add(point.step)

        result = lora_finetune.finetune_gpt(
            base_dir,
            train_path,
            config,
            out / "finetune" / f"groundup-{run_key}",
            val_fraction=val_fraction,
            seed=seed,
            base_model_ref=base_model_ref,
            hooks=TrainHooks(on_eval=log_eval, on_progress=progress_reporter(f"LoRA finetuning of {base_dir.name}")),
        )
        for point in result.progress.evals:  # evaluations of an earlier, interrupted session of this run
            if point.step not in logged:
                log_eval(point)

        run.log_params(
            {
                "val_fraction": val_fraction,
                "data_seed": seed,
                "base_dir": str(base_dir.resolve()),
                "base_sha256": base_sha256,
                "base_model_ref": base_model_ref or "",
                "n_train": result.n_train,
                "n_val": result.n_val,
                "resumed_from": result.resumed_from,
            }
        )
        run.log_dataset(train_path, name=TRAIN_DATASET, digest=train_sha256, context="training")
        run.log_dataset(result.val_file, name=VAL_DATASET, digest=sha256_file(result.val_file), context="validation")
        run.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
        run.log_dict(result.progress.samples, "samples.json")
        if result.loss_plot:
            run.log_artifact(result.loss_plot)

        parent_name = base_model_ref.rsplit("/", 1)[0].split("@", 1)[0] if base_model_ref else config.base
        version = run.register_directory(
            result.adapter_dir,
            model_name(parent_name),
            parent=base_model_ref or f"dir:{base_dir.resolve()}",
            datasets={TRAIN_DATASET: train_sha256},
            params={"engine": "groundup", "lora": config.lora.model_dump(), "prompt_style": config.prompt_style},
            tags={
                tracking.TAG + "base_model": base_model_ref or str(base_dir.resolve()),
                tracking.TAG + "base_sha256": base_sha256,
                tracking.TAG + "engine": "groundup",
            },
        )
        model_ref = tracking.version_ref(version)
        create_markdown_artifact(
            key="finetune-groundup",
            markdown=_groundup_summary(base_dir, result, model_ref),
            description="LoRA finetuning of our GPT",
        )
        return {
            "engine": "groundup",
            "model_ref": model_ref,
            "model_dir": str(result.adapter_dir),
            "adapter_dir": str(result.adapter_dir),
            "out_dir": str(result.out_dir),
            "loss_plot": str(result.loss_plot) if result.loss_plot else None,
            "base": config.base,
            "base_dir": str(base_dir.resolve()),
            "base_sha256": base_sha256,
            "base_model_ref": base_model_ref,
            "train_sha256": train_sha256,
            "prompt_style": config.prompt_style,
            "metrics": result.metrics,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "run_id": run.run_id,
        }
