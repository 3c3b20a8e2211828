"""Flow ``evaluate``: test-set responses of both models, the judge's scores, multiple-choice benchmarks."""

from __future__ import annotations

from typing import Any

from prefect import flow

from groundup import tracking
from groundup.config import EvaluateConfig, GenerationConfig, JudgeConfig
from groundup.flows.common import parent_run
from groundup.tasks import evaluate as evaluate_tasks


@flow(name="evaluate", log_prints=True)
def evaluate(
    config: EvaluateConfig = EvaluateConfig(),
    test_data: str = "",
    base_model: str = "",
    finetuned_model: str = "",
    finetuned_ref: str | None = None,
    base_ref: str | None = None,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Answer every entry of ``test_data`` with ``base_model`` and ``finetuned_model`` (directories or hub
    ids), judge the answers (``config.judge.enabled``) and run lm-eval tasks on both models
    (``config.mc_eval.enabled``). ``finetuned_ref`` / ``base_ref`` (``name/version``) are the registered
    versions the evaluations are recorded on."""
    missing = [
        name
        for name, value in (
            ("test_data", test_data),
            ("base_model", base_model),
            ("finetuned_model", finetuned_model),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"flow evaluate needs {', '.join(missing)}")
    common = {"output_dir": output_dir, "experiment": experiment}
    with parent_run("evaluate", config=config, parent_run_id=parent_run_id, **common) as run_id:
        result: dict[str, Any] = {"run_id": run_id}
        result["responses"] = evaluate_tasks.generate_responses(
            test_data, base_model, finetuned_model, config.generation, parent_run_id=run_id, **common
        )
        if config.judge.enabled:
            result["judge"] = evaluate_tasks.judge_responses(
                result["responses"]["responses"], config.judge, finetuned_ref, parent_run_id=run_id, **common
            )
        if config.mc_eval.enabled:
            result["mc_eval"] = {
                label: evaluate_tasks.evaluate_mc(
                    model, config.mc_eval, ref, label, parent_run_id=run_id, **common
                )
                for label, model, ref in (
                    ("base_model", base_model, base_ref),
                    ("finetuned_model", finetuned_model, finetuned_ref),
                )
            }
        return result


@flow(name="respond", log_prints=True)
def respond(
    config: GenerationConfig = GenerationConfig(),
    test_data: str = "",
    base_model: str = "",
    finetuned_model: str = "",
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Only the responses of ``evaluate`` (``groundup respond``)."""
    with parent_run("respond", config=config, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id) as run_id:
        return evaluate_tasks.generate_responses(
            test_data, base_model, finetuned_model, config, output_dir=output_dir, experiment=experiment,
            parent_run_id=run_id,
        )  # fmt: skip


@flow(name="judge", log_prints=True)
def judge(
    config: JudgeConfig = JudgeConfig(),
    responses: str = "",
    finetuned_ref: str | None = None,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Only the judge of ``evaluate``, on a responses file (``groundup judge``)."""
    with parent_run("judge", config=config, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id) as run_id:
        return evaluate_tasks.judge_responses(
            responses, config, finetuned_ref, output_dir=output_dir, experiment=experiment, parent_run_id=run_id
        )
