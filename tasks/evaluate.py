"""Prefect tasks for evaluation: ``generate_responses``, ``judge_responses`` and ``evaluate_mc``.

Each is cached on content (test data, model directories, responses file, settings) and logs a nested MLflow
run; the judge and the multiple-choice evaluation also attach their metrics to the finetuned model's
registered version (``tracking.record_evaluation``), so the registry shows them next to the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from groundup import tracking
from groundup.config import GenerationConfig, JudgeConfig, MCEvalConfig, config_digest
from groundup.files import sha256_file
from groundup.tasks.common import (
    StageResult,
    content_key,
    content_key_with,
    png_markdown,
    progress_reporter,
    stage_run,
)

TEST_DATASET = "instruct-test"
RESPONSES_DATASET = "test-responses"
PREVIEW_CHARS = 160


@dataclasses.dataclass
class TestResponses(StageResult):
    """Both models' answers to the test set: the JSON Lines file, and what was answered with what."""

    __test__ = False  # not a pytest test class, despite its name

    responses: str  # the JSON Lines file, one record per test entry
    entries: int
    cached: bool  # answered by an earlier run (the file was complete already)
    models: dict[str, dict[str, Any]]  # base_model / finetuned_model -> its identity (id, digest, prompt style)
    metrics: dict[str, float]
    run_id: str


@dataclasses.dataclass
class JudgeScores(StageResult):
    """The judge's scores of both models' answers: files, summary statistics and whether to trust them."""

    scores: str  # Parquet, one row per test entry
    judgments: str
    histogram: str
    summary: dict[str, Any]  # per model and control: count, unparsed, mean, ...; the paired difference
    metrics: dict[str, float]
    verdict: str  # one sentence from the controls: does the judge tell right from wrong?
    judge: str  # the judge's id
    run_id: str


@dataclasses.dataclass
class MCAccuracy(StageResult):
    """lm-eval multiple-choice accuracy of one model."""

    metrics: dict[str, float]  # flat: ``mc.<task>.acc`` ...
    tasks: dict[str, dict[str, float]]
    samples: dict[str, int]  # questions per task
    run_id: str


def local_model(model: str, output_dir: str) -> str:
    """A hub id becomes a local LitGPT checkpoint under ``<output_dir>/checkpoints/litgpt`` (downloaded
    once, where finetuning puts its base models); directories are used as they are."""
    from groundup.instruct import litgpt_checkpoints

    if not litgpt_checkpoints.is_hub_id(model):
        return model
    from groundup.tasks.common import hf_token

    target = Path(output_dir) / "checkpoints" / "litgpt"
    return str(litgpt_checkpoints.resolve_base_model(model, target, hf_token=hf_token(None)))


def _short(text: Any, limit: int = PREVIEW_CHARS) -> str:
    text = "" if text is None else str(text).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------


@task(name="generate_responses", cache_key_fn=content_key, persist_result=True)
def generate_responses(
    test_data: str,
    base_model: str,
    finetuned_model: str,
    config: GenerationConfig = GenerationConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    model_versions: list[str | None] | None = None,
) -> TestResponses:
    """Both models' responses to every test entry, in ``<output_dir>/eval/responses/``; ``model_versions``
    (the registered versions of the two models, where they are registered) become the run's model inputs."""
    from groundup.instruct import responses as library
    from groundup.instruct.resumable import read_jsonl

    with stage_run("generate_responses", config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
        result = library.generate_responses(
            test_data,
            local_model(base_model, output_dir),
            local_model(finetuned_model, output_dir),
            Path(output_dir) / "eval" / "responses",
            config,
            on_progress=progress_reporter("Test-set responses of the base and finetuned models"),
        )
        records = read_jsonl(result.path)
        run.log_params(
            {
                f"{key}.{field}": value
                for key, ident in result.models.items()
                for field, value in ident.items()
            }
        )
        run.log_dataset(test_data, name=TEST_DATASET, digest=sha256_file(test_data), context="testing")
        tracking.log_versions_used(run, model_versions or [])
        run.log_artifact(result.path, "responses")
        metrics = {"entries": result.entries}
        for key in library.MODEL_KEYS:
            answers = [record[key] for record in records]
            metrics[f"{key}.empty"] = sum(not answer for answer in answers)
            metrics[f"{key}.mean_words"] = sum(len(a.split()) for a in answers) / max(len(answers), 1)
        run.log_metrics(metrics)
        create_markdown_artifact(
            key="test-responses",
            markdown=_responses_markdown(records, result),
            description="test-set responses of the base and finetuned models",
        )
        return TestResponses(
            responses=str(result.path), entries=result.entries, cached=result.cached, models=result.models,
            metrics=metrics, run_id=run.run_id,
        )  # fmt: skip


def _responses_markdown(records: list[dict[str, Any]], result: Any, shown: int = 3) -> str:
    lines = [
        f"### Test-set responses ({result.entries} entries{', from an earlier run' if result.cached else ''})\n",
        *(
            f"- {key.replace('_', ' ')}: `{result.models[key]['id']}`, prompts in "
            f"`{records[0].get(key + '_prompt_style', '?').rsplit('.', 1)[-1]}` style"
            for key in ("base_model", "finetuned_model")
            if records
        ),
        f"- file: `{result.path}`\n",
        "| instruction | expected | base model | finetuned model |",
        "|---|---|---|---|",
    ]
    for record in records[:shown]:
        cells = [record["instruction"], record["output"], record["base_model"], record["finetuned_model"]]
        lines.append("| " + " | ".join(_short(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------------------------------------


@task(name="judge_responses", cache_key_fn=content_key_with("config.model"), persist_result=True)
def judge_responses(
    responses: str,
    config: JudgeConfig = JudgeConfig(),
    finetuned_ref: str | None = None,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> JudgeScores:
    """Score both models' responses with the configured judge; ``finetuned_ref`` (``name/version``) is the
    registered finetuned model the evaluation is recorded on."""
    from groundup.instruct import judge as library

    responses_sha256 = sha256_file(responses)
    out = Path(output_dir) / "eval" / "judge" / config_digest([responses_sha256, config.digest()])
    with stage_run("judge_responses", config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
        local = config.model if config.backend != "litgpt" else local_model(config.model, output_dir)
        judge = library.make_judge(config.model_copy(update={"model": local}))
        result = library.judge_responses(
            responses,
            out,
            judge,
            controls=config.controls,
            min_control_auc=config.min_control_auc,
            bootstrap_samples=config.bootstrap_samples,
            seed=config.seed,
            on_progress=progress_reporter(f"Judging responses with {config.model}"),
        )
        metrics = library.summary_metrics(result.summary)
        verdict = library.control_verdict(result.summary)
        run.log_params({"judge_id": judge.judge_id, "judge_settings": judge.settings})
        run.set_tags({tracking.TAG + "judge.verdict": verdict})
        print(verdict)
        run.log_dataset(responses, name=RESPONSES_DATASET, digest=responses_sha256, context="evaluation")
        run.log_metrics(metrics)
        import pandas as pd

        table = pd.read_parquet(result.scores)
        run.log_table(table, "scores_table.json")
        for path in (result.scores, result.judgments, result.histogram):
            run.log_artifact(path, "judge")
        if finetuned_ref:
            tracking.record_evaluation(finetuned_ref, run, metrics)
        create_table_artifact(
            key="judge-scores", table=_comparison_rows(table), description="judge scores per test entry"
        )
        create_markdown_artifact(
            key="judge-summary", markdown=_judge_markdown(judge.judge_id, result), description="judge summary"
        )
        return JudgeScores(
            scores=str(result.scores), judgments=str(result.judgments), histogram=str(result.histogram),
            summary=result.summary, metrics=metrics, verdict=verdict, judge=judge.judge_id, run_id=run.run_id,
        )  # fmt: skip


def _comparison_rows(table: Any) -> list[dict[str, Any]]:
    import pandas as pd

    def score(value: Any) -> float | None:
        return None if pd.isna(value) else round(float(value), 1)  # from probabilities: a decimal

    return [
        {
            "index": int(row["index"]),
            "instruction": _short(row["instruction"], 80),
            "base_model_score": score(row["base_model_score"]),
            "finetuned_model_score": score(row["finetuned_model_score"]),
            "base_model_reply": _short(row["base_model_reply"], 40),
            "finetuned_model_reply": _short(row["finetuned_model_reply"], 40),
        }
        for row in table.to_dict("records")
    ]


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _judge_markdown(judge_id: str, result: Any) -> str:
    from groundup.instruct.judge import control_verdict

    s = result.summary
    rows = [
        f"| {key.replace('_', ' ')} | {s[key]['count']} | {s[key]['unparsed']} ({_fmt(s[key]['unparsed_share'], '.0%')}) "
        f"| {_fmt(s[key]['mean'])} | {_fmt(s[key]['median'])} | {_fmt(s[key]['std'])} |"
        for key in ("base_model", "finetuned_model", "reference_answer", "mismatched_answer")
        if key in s
    ]
    d = s["difference"]
    return (
        f"### Judge scores (0–100) by `{judge_id}`\n\n**{control_verdict(s)}**\n\n"
        "| model | entries | unparsed | mean | median | std |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nFinetuned − base: **{_fmt(d['mean'])}** points, paired bootstrap 95% interval "
        f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] over {d['pairs']} entries where both scores parsed.\n\n"
        f"{png_markdown(result.histogram, 'judge score histogram')}\n"
    )


# ---------------------------------------------------------------------------------------------------------
# Multiple-choice benchmarks
# ---------------------------------------------------------------------------------------------------------


@task(name="evaluate_mc", cache_key_fn=content_key_with("config.include_path"), persist_result=True)
def evaluate_mc(
    model: str,
    config: MCEvalConfig = MCEvalConfig(),
    model_ref: str | None = None,
    label: str = "finetuned_model",
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> MCAccuracy:
    """lm-eval accuracy of ``model`` on ``config.tasks``; recorded on ``model_ref`` if given."""
    from groundup.instruct.mc_eval import evaluate_mc as run_mc

    with stage_run(f"evaluate_mc_{label}", config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
        result = run_mc(
            local_model(model, output_dir),
            config.tasks,
            include_path=config.include_path,
            batch_size=config.batch_size,
            limit=config.limit,
            accelerator=config.accelerator,
        )
        metrics = result.flat_metrics()
        run.log_params({"model": result.model_id, "label": label})
        run.log_metrics(metrics)
        run.log_dict({"metrics": result.metrics, "samples": result.samples}, "mc_eval.json")
        if model_ref:
            tracking.record_evaluation(model_ref, run, metrics)
        rows = "\n".join(
            f"| {task} | {_fmt(values.get('acc'), '.3f')} | {_fmt(values.get('acc_stderr'), '.3f')} "
            f"| {result.samples.get(task, '–')} |"
            for task, values in result.metrics.items()
        )
        create_markdown_artifact(
            key=f"mc-eval-{label.replace('_', '-')}",
            markdown=f"### Multiple-choice accuracy of `{result.model_id}`\n\n"
            f"| task | acc | stderr | questions |\n|---|---|---|---|\n{rows}\n",
            description=f"lm-eval accuracy ({label})",
        )
        return MCAccuracy(metrics=metrics, tasks=result.metrics, samples=result.samples, run_id=run.run_id)
