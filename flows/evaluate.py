"""Flow ``evaluate``: test-set responses of both models, the judge's scores, multiple-choice benchmarks."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import Task, flow

from groundup import tracking
from groundup.config import EvaluateConfig, GenerationConfig, JudgeConfig
from groundup.errors import SettingsError
from groundup.flows.common import stage_context
from groundup.tasks import evaluate as evaluate_tasks
from groundup.tasks.common import StageContext, StageResult


@dataclasses.dataclass
class Evaluation(StageResult):
    """Both models' test-set responses, the judge's scores (if it ran), lm-eval accuracy per model (if it
    ran), and the flow's MLflow run the stages nest under."""

    run_id: str
    responses: evaluate_tasks.TestResponses
    judge: evaluate_tasks.JudgeScores | None = None
    mc_eval: dict[str, evaluate_tasks.MCAccuracy] = dataclasses.field(default_factory=dict)  # by model label


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
) -> Evaluation:
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
        raise SettingsError(f"flow evaluate needs {', '.join(missing)}", fix="give the test data and both models")
    with stage_context(
        "evaluate", config=config, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as context:
        responses = evaluate_tasks.generate_responses(
            test_data, base_model, finetuned_model, config.generation, **context.kwargs
        )
        result = Evaluation(run_id=context.parent_run_id, responses=responses)
        if config.judge.enabled:
            result.judge = evaluate_tasks.judge_responses(
                responses.responses, config.judge, finetuned_ref, **context.kwargs
            )
        if config.mc_eval.enabled:
            result.mc_eval = {
                label: evaluate_tasks.evaluate_mc(model, config.mc_eval, ref, label, **context.kwargs)
                for label, model, ref in (
                    ("base_model", base_model, base_ref),
                    ("finetuned_model", finetuned_model, finetuned_ref),
                )
            }
        return result


def one_stage(name: str, config: Any, given: StageContext, stage: Task, *args: Any) -> StageResult:
    """The body of a flow of one stage: ``stage(*args)`` in the stage context of a flow run ``name``
    (``given``: the flow's parameters; a parent run of its own unless one is given)."""
    with stage_context(name, config=config, **given.kwargs) as context:
        return stage(*args, **context.kwargs)


@flow(name="respond", log_prints=True)
def respond(
    config: GenerationConfig = GenerationConfig(),
    test_data: str = "",
    base_model: str = "",
    finetuned_model: str = "",
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> evaluate_tasks.TestResponses:
    """Only the responses of ``evaluate`` (``groundup respond``)."""
    given = StageContext(output_dir, experiment, parent_run_id)
    return one_stage("respond", config, given, evaluate_tasks.generate_responses, test_data, base_model, finetuned_model, config)


@flow(name="judge", log_prints=True)
def judge(
    config: JudgeConfig = JudgeConfig(),
    responses: str = "",
    finetuned_ref: str | None = None,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> evaluate_tasks.JudgeScores:
    """Only the judge of ``evaluate``, on a responses file (``groundup judge``)."""
    given = StageContext(output_dir, experiment, parent_run_id)
    return one_stage("judge", config, given, evaluate_tasks.judge_responses, responses, config, finetuned_ref)
