"""Prefect tasks for instruction data and finetuning: ``split_instructions`` and ``finetune``, the one task
for every finetuning engine (``groundup.instruct.engines``): the engine trains, the task tracks.

Both are cached on content: the instruction source (the file itself when it is local), the base model
(its files when it is a directory), the training data and the settings.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from groundup import tracking
from groundup.config import FinetuneConfig, InstructDataConfig, config_digest
from groundup.errors import SettingsError
from groundup.files import sha256_file, sha256_tree
from groundup.instruct import data as instruct_data
from groundup.instruct.engines import FinetuneJob, TrainCallbacks, checked_engine
from groundup.tasks.common import (
    StageResult,
    content_key_with,
    hf_token,
    png_markdown,
    progress_reporter,
    stage_run,
)
from groundup.train.state import EvalPoint

TRAIN_DATASET = "instruct-train"
TEST_DATASET = "instruct-test"
VAL_DATASET = "instruct-val"


# ---------------------------------------------------------------------------------------------------------
# Instruction data
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainTestSplit(StageResult):
    """Where the instruction data's train and test parts were written, their sizes and digests, and how the
    finetune stage holds out its validation share of the training part."""

    source: str
    source_sha256: str
    train: str
    test: str
    n_train: int
    n_test: int
    train_sha256: str
    test_sha256: str
    val_fraction: float
    seed: int
    run_id: str


@task(name="split_instructions", cache_key_fn=content_key_with("config.source"), persist_result=True)
def split_instructions(
    config: InstructDataConfig,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> TrainTestSplit:
    """Fetch, validate and split the instruction data into ``<output_dir>/instruct/<settings>/``."""
    out = Path(output_dir)
    with stage_run("split_instructions", config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
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
        return TrainTestSplit(**split.as_dict(), val_fraction=config.val_fraction, seed=config.seed, run_id=run.run_id)


# ---------------------------------------------------------------------------------------------------------
# LoRA finetuning, with any engine
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneResult(StageResult):
    """What the finetune stage hands on: where the finetuned model is and what it was made from."""

    engine: str
    model_ref: str  # the registered version, ``finetuned-<base>/N``
    model_dir: str  # the directory registered (a merged model or an adapter)
    out_dir: str
    loss_plot: str | None
    base: str  # finetune.base as written
    base_dir: str
    base_sha256: str
    base_model_ref: str | None
    train_sha256: str
    prompt_style: str
    metrics: dict[str, float]
    n_train: int
    n_val: int
    run_id: str
    outputs: dict[str, str]  # engine-specific locations (the LitGPT LoRA weights, the groundup adapter)

    def __getattr__(self, name: str) -> str:
        # Engine-specific outputs read like fields (result.lora_weights, result.adapter_dir).
        outputs = self.__dict__.get("outputs", {})
        if name in outputs:
            return outputs[name]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        outputs = data.pop("outputs")
        return {**data, **outputs}


def registry_name(base: str, base_model_ref: str | None) -> str:
    """The finetuned model's registry name after its base: ``gpt2-124m/1`` (a registered base),
    ``microsoft/phi-2`` or ``/ckpts/phi-2`` -> ``finetuned-gpt2-124m``, ``finetuned-phi-2``."""
    source = base_model_ref.rsplit("/", 1)[0].split("@", 1)[0] if base_model_ref else base
    stem = Path(source.rstrip("/")).name or source
    return "finetuned-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()))
    return f"| metric | value |\n|---|---|\n{rows}"


@task(name="finetune", cache_key_fn=content_key_with("config.base"), persist_result=True)
def finetune(
    train_path: str,
    config: FinetuneConfig,
    val_fraction: float = 0.1,
    seed: int = 123,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    base_checkpoint: str | None = None,
    base_model_ref: str | None = None,
) -> FinetuneResult:
    """LoRA-finetune ``config.base`` with ``config.engine`` on ``train_path`` (``val_fraction`` of it held
    out with ``seed`` for validation), log the run to MLflow and register the model with its lineage.

    ``base_checkpoint`` / ``base_model_ref``: the checkpoint and registered version of a base made by an
    earlier stage (a GPT-2 size, ``pretrained``); other bases are found or downloaded by the engine.
    """
    engine = checked_engine(config)
    base = config.base_model
    logger = get_run_logger()
    out = Path(output_dir).resolve()
    with stage_run(engine.stage, config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
        if base_checkpoint:
            base_dir = Path(base_checkpoint).resolve()
        elif base.from_stage:
            raise SettingsError(
                f"finetune.base={config.base!r} is made by the {base.from_stage} stage",
                fix="run the finetune or pipeline flow, which runs that stage first, or give a checkpoint directory",
            )
        else:
            token = hf_token(config.litgpt.hf_token_secret) if base.kind == "hub" else None
            base_dir = engine.prepare_base(base, out, hf_token=token, on_line=logger.info).resolve()
        base_sha256 = sha256_tree(base_dir)
        train_sha256 = sha256_file(train_path)
        run_key = config_digest([base_sha256, train_sha256, config.digest(), val_fraction, seed])
        logged: set[int] = set()

        def log_eval(point: EvalPoint) -> None:
            metrics = {"train_loss": point.train_loss, "val_loss": point.val_loss, "lr": point.lr}
            run.log_metrics({**metrics, "tokens_seen": point.tokens_seen, "epoch": point.epoch}, step=point.step)
            logged.add(point.step)

        callbacks = TrainCallbacks(
            on_eval=log_eval, on_line=logger.info, on_progress=progress_reporter(f"LoRA finetuning of {config.base}")
        )
        job = FinetuneJob(
            base_dir, Path(train_path), config, out / "finetune" / f"{engine.name}-{run_key}", val_fraction, seed,
            base_model_ref,
        )
        outcome = engine.train(job, callbacks)
        for point in outcome.evals:  # evaluations of an earlier, interrupted session of this run
            if point.step not in logged:
                log_eval(point)
        run.log_params(
            {
                "val_fraction": val_fraction,
                "data_seed": seed,
                "base_dir": str(base_dir),
                "base_sha256": base_sha256,
                "base_model_ref": base_model_ref or "",
                "n_train": outcome.n_train,
                "n_val": outcome.n_val,
                **outcome.params,
            }
        )
        run.log_dataset(train_path, name=TRAIN_DATASET, digest=train_sha256, context="training")
        run.log_dataset(outcome.val_file, name=VAL_DATASET, digest=sha256_file(outcome.val_file), context="validation")
        for name, points in outcome.metric_history.items():
            run.log_metric_history(name, points)
        run.log_metrics({f"final_{k}": v for k, v in outcome.final_metrics.items()})
        for file_name, record in outcome.records.items():
            run.log_dict(record, file_name)
        for path in [outcome.loss_plot, *outcome.artifacts]:
            if path:
                run.log_artifact(path)

        lineage_parent = base_model_ref or (f"hf:{config.base}" if base.kind == "hub" else f"dir:{base_dir}")
        version = run.register_directory(
            outcome.model_dir,
            registry_name(config.base, base_model_ref),
            parent=lineage_parent,
            datasets={TRAIN_DATASET: train_sha256},
            params={"engine": engine.name, "lora": config.lora.model_dump(), "prompt_style": config.prompt_style},
            tags={
                tracking.TAG + "base_model": base_model_ref or config.base,
                tracking.TAG + "base_sha256": base_sha256,
                tracking.TAG + "engine": engine.name,
            },
            model_type=outcome.model_type,
        )
        model_ref = tracking.version_ref(version)
        plot = png_markdown(outcome.loss_plot, "loss curves") if outcome.loss_plot else ""
        create_markdown_artifact(
            key=f"finetune-{engine.name}",
            markdown=(
                f"### LoRA finetuning ({engine.name}) of `{config.base}`\n\nRegistered as **{model_ref}**. "
                f"{outcome.summary}\n\n{_metrics_table(outcome.final_metrics)}\n\n{plot}\n"
            ),
            description=f"LoRA finetuning with engine {engine.name}",
        )
        return FinetuneResult(
            engine=engine.name,
            model_ref=model_ref,
            model_dir=str(outcome.model_dir),
            out_dir=str(outcome.out_dir),
            loss_plot=str(outcome.loss_plot) if outcome.loss_plot else None,
            base=config.base,
            base_dir=str(base_dir),
            base_sha256=base_sha256,
            base_model_ref=base_model_ref,
            train_sha256=train_sha256,
            prompt_style=config.prompt_style,
            metrics=outcome.final_metrics,
            n_train=outcome.n_train,
            n_val=outcome.n_val,
            run_id=run.run_id,
            outputs=outcome.extra,
        )
