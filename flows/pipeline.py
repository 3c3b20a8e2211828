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

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from groundup import tracking
from groundup.config import PipelineConfig, config_digest
from groundup.errors import SettingsError
from groundup.flows.common import StageContext, Stages, parent_run
from groundup.instruct.engines import checked_engine
from groundup.tasks.data import download_text, record_corpus, tokenize_to_parquet
from groundup.tasks.evaluate import evaluate_mc, generate_responses, judge_responses
from groundup.tasks.finetune import finetune, split_instructions
from groundup.tasks.pretrain import pretrain
from groundup.tasks.promote import promote
from groundup.tasks.weights import fetch_gpt2_weights
from groundup.text.tokenizers import VOCAB_DIR_ENV

FLOW_NAME = "groundup-pipeline"
# The judge's mean score of the finetuned model: what promotion compares.
SCORE_METRIC = "judge.finetuned_model.mean"


def score_basis(config: PipelineConfig, judge_id: str, test_sha256: str) -> str:
    """What makes two judge scores comparable: the same judge, generation settings and test set."""
    judge = config.judge.model_dump(mode="json", include={"model", "max_new_tokens", "temperature", "chat_template", "seed"})
    generation = config.generation.model_dump(mode="json", exclude={"batch_size", "accelerator"})
    return config_digest([judge_id, judge, generation, test_sha256])


def check(config: PipelineConfig) -> None:
    """Settings that cannot work together, refused before any stage starts."""
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
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Data → pretraining; GPT-2 weights; instruction split → finetuning → responses → judge → promotion."""
    return execute(config, Stages())


def execute(config: PipelineConfig, stages: Stages) -> dict[str, Any]:
    """The pipeline's body, with the way stages are run injected (``bench/pipeline.py`` calls them plainly)."""
    check(config)
    out = str(Path(config.output_dir).resolve())
    if config.data.vocab_dir:
        # The tokenizer files the data stage is given serve every stage that tokenizes (finetuning, responses).
        os.environ.setdefault(VOCAB_DIR_ENV, str(Path(config.data.vocab_dir).resolve()))
    with parent_run(FLOW_NAME, config=config, output_dir=out, experiment=config.experiment, parent_run_id=None) as run_id:
        results = run_stages(config, stages, StageContext(out, config.experiment, run_id))
        tracked = tracking.open_run(run_id)
        tracked.set_tags({f"{tracking.TAG}stage_state.{name}": state for name, state in stages.states().items()})
        tracked.set_tags(produced_models(results))
        tracked.log_metrics(headline_metrics(results))
        return {"run_id": run_id, "stages": stages.states(), **results}


def run_stages(config: PipelineConfig, stages: Stages, context: StageContext) -> dict[str, dict]:
    out = context.output_dir
    # Roots first, so the three branches run side by side while this thread waits on one of them at a time.
    stages.submit("download_text", download_text, config.data.source, output_dir=out, sha256=config.data.sha256)
    if config.weights.enabled:
        stages.submit("fetch_gpt2_weights", fetch_gpt2_weights, config.weights, **context.kwargs)
    stages.submit("split_instructions", split_instructions, config.instruct, **context.kwargs)
    tokens = start_pretraining(config, stages, context)

    split = stages.result("split_instructions", "train")
    base = finetune_base(config, stages)
    stages.submit(
        "finetune", finetune, split["train"], config.finetune,
        val_fraction=config.instruct.val_fraction, seed=config.instruct.seed, **base, **context.kwargs,
    )  # fmt: skip
    finetuned = stages.result("finetune", "model_dir")
    results = {"split": split, "finetune": finetuned, **evaluate_and_promote(config, stages, split, base, finetuned, context)}

    results["data"] = {**tokens, "run_id": stages.result("record_corpus")["run_id"]}
    results["pretrain"] = stages.result("pretrain", "checkpoint")
    if config.weights.enabled:
        results["weights"] = stages.result("fetch_gpt2_weights", "checkpoint")
    return results


def start_pretraining(config: PipelineConfig, stages: Stages, context: StageContext) -> dict[str, Any]:
    """Tokenize the downloaded text, then submit the corpus record and pretraining; returns the tokens."""
    out = context.output_dir
    text = stages.result("download_text")
    stages.submit(
        "tokenize_to_parquet", tokenize_to_parquet, text["path"], config.data.tokenizer, config.data.vocab_dir, out
    )
    tokens = stages.result("tokenize_to_parquet", "parquet")
    stages.submit("record_corpus", record_corpus, config.data, text, tokens, **context.kwargs)
    stages.submit("pretrain", pretrain, tokens["parquet"], config.pretrain, text_sha256=text["sha256"], **context.kwargs)
    return tokens


def evaluate_and_promote(
    config: PipelineConfig,
    stages: Stages,
    split: dict[str, Any],
    base: dict[str, str],
    finetuned: dict[str, Any],
    context: StageContext,
) -> dict[str, dict]:
    """Responses of base and finetuned model, the judge (and multiple-choice benchmarks), then promotion."""
    base_model, model, ref = finetuned["base_dir"], finetuned["model_dir"], finetuned["model_ref"]
    stages.submit("generate_responses", generate_responses, split["test"], base_model, model, config.generation, **context.kwargs)
    if config.mc_eval.enabled:
        for label, path, version in (("base_model", base_model, base.get("base_model_ref")), ("finetuned_model", model, ref)):
            stages.submit(f"evaluate_mc_{label}", evaluate_mc, path, config.mc_eval, version, label, **context.kwargs)
    results = {"responses": stages.result("generate_responses", "responses")}
    score, basis = None, ""
    if config.judge.enabled:
        responses = results["responses"]["responses"]
        stages.submit("judge_responses", judge_responses, responses, config.judge, ref, **context.kwargs)
        results["judge"] = stages.result("judge_responses", "scores")
        score = results["judge"]["metrics"].get(SCORE_METRIC)
        basis = score_basis(config, results["judge"]["judge"], split["test_sha256"])
    stages.submit("promote", promote, ref, score, basis, **context.kwargs)
    results["promotion"] = stages.result("promote")
    results.update({name: stages.result(name) for name in stages.futures if name.startswith("evaluate_mc_")})
    return results


def finetune_base(config: PipelineConfig, stages: Stages) -> dict[str, str]:
    """The base checkpoint and its registered version (the lineage parent) when another stage of this run
    makes the base: GPT-2 from the weights stage, or the model pretrained here. Empty when the engine finds
    the base itself (a directory, a hub id)."""
    stage = config.finetune.base_model.from_stage
    if stage is None:
        return {}
    result = stages.result(stage, "checkpoint")
    return {"base_checkpoint": str(result["checkpoint"]), "base_model_ref": result["model_version"]}


def produced_models(results: dict[str, dict]) -> dict[str, str]:
    """Tags naming the model versions this run produced or reused (``groundup.model.finetune`` ...)."""
    refs = {stage: results[stage].get("model_version") for stage in ("pretrain", "weights") if stage in results}
    refs["finetune"] = results["finetune"]["model_ref"]
    return {f"{tracking.TAG}model.{stage}": ref for stage, ref in refs.items() if ref}


def headline_metrics(results: dict[str, dict]) -> dict[str, float]:
    """A few numbers for the pipeline's parent run (each stage's own run has the full set)."""
    metrics = {
        "pretrain.final_val_loss": results["pretrain"].get("final_val_loss"),
        "pretrain.final_train_loss": results["pretrain"].get("final_train_loss"),
        "promoted": float(results["promotion"]["promoted"]),
    }
    metrics.update({k: v for k, v in results.get("judge", {}).get("metrics", {}).items() if k.endswith(".mean")})
    return metrics


# ---------------------------------------------------------------------------------------------------------
# What `groundup run` prints
# ---------------------------------------------------------------------------------------------------------


def summary(result: dict[str, Any], output_dir: str | Path = "artifacts") -> str:
    """A short report of a pipeline run and how to look at it in both UIs."""
    lines = ["", "groundup pipeline", ""]
    width = max(len(name) for name in result["stages"])
    lines += [f"  {name:<{width}}  {state}" for name, state in result["stages"].items()]
    pre = result["pretrain"]
    lines += ["", f"pretrained   {pre['model_version']}: {pre['steps']} steps, val loss {pre['final_val_loss']:.3f}"]
    if "weights" in result:
        lines.append(f"GPT-2        {result['weights']['model_version']} ({result['weights']['checkpoint']})")
    lines.append(f"finetuned    {result['finetune']['model_ref']} ({result['finetune']['model_dir']})")
    judge = result.get("judge")
    if judge:
        m = judge["metrics"]
        lines.append(
            f"judge        {judge['judge']}: base {m.get('judge.base_model.mean', float('nan')):.1f}, "
            f"finetuned {m.get(SCORE_METRIC, float('nan')):.1f} (mean of 0-100)"
        )
    else:
        lines.append("judge        skipped (judge.enabled is false): see the README's judge choices")
    promotion = result["promotion"]
    lines.append(f"promotion    {promotion['model']} -> @{', @'.join(promotion['aliases'])}: {promotion['reason']}")
    lines += ["", f"lineage:     groundup lineage {promotion['model'].split('/')[0]}@candidate"]
    lines += ui_hints(output_dir)
    return "\n".join(lines)


def ui_hints(output_dir: str | Path) -> list[str]:
    out = Path(output_dir)
    if os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_UI_URL

        return [f"Prefect UI:  {PREFECT_UI_URL.value()}", f"MLflow UI:   {os.environ.get('MLFLOW_TRACKING_URI')}"]
    return [
        f"browse both: groundup ui --output-dir {out}    (Prefect and MLflow servers on this run's data)",
        f"  or:        PREFECT_HOME={out / 'prefect'} prefect server start",
        f"             MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}",
    ]
