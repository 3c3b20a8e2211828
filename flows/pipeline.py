"""Flow ``groundup-pipeline``: every stage as one flow run, independent branches running concurrently.

::

    download_text ─► tokenize_to_parquet ─┬─► record_corpus
                                          └─► pretrain ─────────────┐ (the base if finetune.base = pretrained)
    fetch_gpt2_weights ─────────────────────────────────────────────┤ (the base of the groundup engine)
    split_instructions ─────────────────────────────────────────────┴─► finetune ─► generate_responses
        ─► judge_responses ─► promote          (and evaluate_mc of both models when mc_eval.enabled)

The flow calls the stages' tasks directly (``.submit`` on a thread pool), so the Prefect UI shows one graph
and each task is cached on its content on its own: changing only the judge's settings reruns only the
judge; one changed byte of the text reruns tokenizing and pretraining. A failed task fails the flow with
its error; a rerun (or a flow retry) reuses every finished task's persisted result, and pretraining and
finetuning resume from their last checkpoints. One MLflow parent run per flow run; the stages nest under it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from groundup import tracking
from groundup.config import MC_EVAL_LABELS, PIPELINE_STAGES, PipelineConfig
from groundup.errors import SettingsError
from groundup.flows.common import Stages, stage_context
from groundup.flows.data import PreparedData
from groundup.instruct.engines import checked_engine
from groundup.instruct.promotion import SCORE_METRIC, judge_refusal, score_basis
from groundup.tasks.common import StageContext, StageResult
from groundup.tasks.data import download_text, record_corpus, tokenize_to_parquet
from groundup.tasks.evaluate import (
    JudgeScores,
    MCAccuracy,
    TestResponses,
    evaluate_mc,
    generate_responses,
    judge_responses,
)
from groundup.tasks.finetune import FinetuneResult, TrainTestSplit, finetune, split_instructions
from groundup.tasks.pretrain import PretrainedModel, pretrain
from groundup.tasks.promote import Promotion, promote
from groundup.tasks.weights import FetchedGPT2, fetch_gpt2_weights
from groundup.text.tokenizers import VOCAB_DIR_ENV

FLOW_NAME = "groundup-pipeline"


@dataclasses.dataclass
class PipelineRun(StageResult):
    """Every stage's result, each stage's state (``Completed``, ``Cached`` ...) and the pipeline's MLflow run."""

    run_id: str
    stages: dict[str, str]
    data: PreparedData
    pretrain: PretrainedModel
    split: TrainTestSplit
    finetune: FinetuneResult
    responses: TestResponses
    promotion: Promotion
    weights: FetchedGPT2 | None = None  # weights.enabled
    judge: JudgeScores | None = None  # judge.enabled
    mc_eval: dict[str, MCAccuracy] = dataclasses.field(default_factory=dict)  # by model label; mc_eval.enabled


def check(config: PipelineConfig) -> None:
    """Settings that cannot work together, refused before any stage starts."""
    unknown = sorted(set(config.placement) - set(PIPELINE_STAGES))
    if unknown:
        raise SettingsError(f"pipeline placement names unknown stages {unknown}; stages: {', '.join(PIPELINE_STAGES)}")
    checked_engine(config.finetune)  # the engine, its base's kind, its settings and accelerator
    size = config.finetune.base_model.size
    if size and not config.weights.enabled:
        raise SettingsError(
            f"finetune.base {config.finetune.base!r} needs the GPT-2 weights stage, but weights.enabled is false",
            fix="use finetune.base=pretrained or a checkpoint directory",
        )
    if size and size != config.weights.size:
        raise SettingsError(
            f"finetune.base {config.finetune.base!r} and weights.size {config.weights.size!r} must name one GPT-2"
        )


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineRun:
    """Data → pretraining; GPT-2 weights; instruction split → finetuning → responses → judge → promotion."""
    return execute(config, Stages())


def execute(config: PipelineConfig, stages: Stages) -> PipelineRun:
    """The pipeline's body, with the way stages are run injected (``bench/pipeline.py`` calls them plainly)."""
    check(config)
    out = str(Path(config.output_dir).resolve())
    stages.placement, stages.output_dir = dict(config.placement), out
    if config.data.vocab_dir:
        # The tokenizer files the data stage is given serve every stage that tokenizes (finetuning, responses).
        os.environ.setdefault(VOCAB_DIR_ENV, str(Path(config.data.vocab_dir).resolve()))
    with stage_context(FLOW_NAME, config=config, output_dir=out, experiment=config.experiment, parent_run_id=None) as context:
        result = run_stages(config, stages, context)
        tracked = tracking.open_run(context.parent_run_id)
        tracked.set_tags({f"{tracking.TAG}stage_state.{name}": state for name, state in result.stages.items()})
        tracked.set_tags(produced_models(result))
        tracked.log_metrics(headline_metrics(result))
        return result


def run_stages(config: PipelineConfig, stages: Stages, context: StageContext) -> PipelineRun:
    # Roots first, so the three branches run side by side while this thread waits on one of them at a time.
    stages.submit("download_text", download_text, config.data.source, output_dir=context.output_dir, sha256=config.data.sha256)
    if config.weights.enabled:
        stages.submit("fetch_gpt2_weights", fetch_gpt2_weights, config.weights, **context.kwargs)
    stages.submit("split_instructions", split_instructions, config.instruct, **context.kwargs)
    start_pretraining(config, stages, context)

    split = stages.result("split_instructions", "train")
    base = finetune_base(config, stages)
    stages.submit(
        "finetune", finetune, split.train, config.finetune,
        val_fraction=config.instruct.val_fraction, seed=config.instruct.seed, **base, **context.kwargs,
    )  # fmt: skip
    finetuned = stages.result("finetune", "model_dir")
    evaluated = evaluate_and_promote(config, stages, split, base, finetuned, context)
    data = PreparedData(
        text=stages.result("download_text"), tokens=stages.result("tokenize_to_parquet"),
        corpus=stages.result("record_corpus"),
    )  # fmt: skip
    pretrained = stages.result("pretrain", "checkpoint")
    weights = stages.result("fetch_gpt2_weights", "checkpoint") if config.weights.enabled else None
    return PipelineRun(
        run_id=context.parent_run_id, stages=stages.states(),  # every stage is done: its final state
        data=data, pretrain=pretrained, split=split, finetune=finetuned, weights=weights, **evaluated,
    )  # fmt: skip


def start_pretraining(config: PipelineConfig, stages: Stages, context: StageContext) -> None:
    """Tokenize the downloaded text, then submit the corpus record and pretraining."""
    text = stages.result("download_text")
    stages.submit(
        "tokenize_to_parquet", tokenize_to_parquet, text.path, config.data.tokenizer, config.data.vocab_dir,
        context.output_dir,
    )  # fmt: skip
    tokens = stages.result("tokenize_to_parquet", "parquet")
    stages.submit("record_corpus", record_corpus, config.data, text, tokens, **context.kwargs)
    stages.submit("pretrain", pretrain, tokens.parquet, config.pretrain, text_sha256=text.sha256, **context.kwargs)


def evaluate_and_promote(
    config: PipelineConfig,
    stages: Stages,
    split: TrainTestSplit,
    base: dict[str, str],
    finetuned: FinetuneResult,
    context: StageContext,
) -> dict[str, StageResult | dict[str, MCAccuracy] | None]:
    """Responses of base and finetuned model, the judge (and multiple-choice benchmarks), then promotion:
    the :class:`PipelineRun` fields of those stages."""
    base_model, model, ref = finetuned.base_dir, finetuned.model_dir, finetuned.model_ref
    stages.submit(
        "generate_responses", generate_responses, split.test, base_model, model, config.generation,
        model_versions=[base.get("base_model_ref"), ref], **context.kwargs,
    )  # fmt: skip
    evaluated_models = dict(zip(MC_EVAL_LABELS, ((base_model, base.get("base_model_ref")), (model, ref)), strict=True))
    if config.mc_eval.enabled:
        for label, (path, version) in evaluated_models.items():
            stages.submit(f"evaluate_mc_{label}", evaluate_mc, path, config.mc_eval, version, label, **context.kwargs)
    responses = stages.result("generate_responses", "responses")
    judged, score, basis, refusal = None, None, "", None
    if config.judge.enabled:
        stages.submit("judge_responses", judge_responses, responses.responses, config.judge, ref, **context.kwargs)
        judged = stages.result("judge_responses", "scores")
        score = judged.metrics.get(SCORE_METRIC)
        basis = score_basis(config.judge, config.generation, judged.judge, split.test_sha256)
        refusal = judge_refusal(judged.summary)
    stages.submit("promote", promote, ref, score, basis, refusal, **context.kwargs)
    mc_eval = {label: stages.result(f"evaluate_mc_{label}") for label in evaluated_models if config.mc_eval.enabled}
    return {"responses": responses, "judge": judged, "promotion": stages.result("promote"), "mc_eval": mc_eval}


def finetune_base(config: PipelineConfig, stages: Stages) -> dict[str, str]:
    """The base checkpoint and its registered version (the lineage parent) when another stage of this run
    makes the base: GPT-2 from the weights stage, or the model pretrained here. Empty when the engine finds
    the base itself (a directory, a hub id)."""
    stage = config.finetune.base_model.from_stage
    if stage is None:
        return {}
    result = stages.result(stage, "checkpoint")
    return {"base_checkpoint": str(result.checkpoint), "base_model_ref": result.model_version}


def produced_models(result: PipelineRun) -> dict[str, str]:
    """Tags naming the model versions this run produced or reused (``groundup.model.finetune`` ...)."""
    refs = {"pretrain": result.pretrain.model_version, "finetune": result.finetune.model_ref}
    if result.weights:
        refs["weights"] = result.weights.model_version
    return {f"{tracking.TAG}model.{stage}": ref for stage, ref in refs.items() if ref}


def headline_metrics(result: PipelineRun) -> dict[str, float]:
    """A few numbers for the pipeline's parent run (each stage's own run has the full set)."""
    metrics = {
        "pretrain.final_val_loss": result.pretrain.final_val_loss,
        "pretrain.final_train_loss": result.pretrain.final_train_loss,
        "promoted": float(result.promotion.promoted),
    }
    if result.judge:
        metrics.update({k: v for k, v in result.judge.metrics.items() if k.endswith(".mean")})
    return metrics
