"""Multiple-choice benchmarks through lm-eval (the workshop's ``litgpt evaluate --tasks mmlu_philosophy``).

lm-eval comes with the ``eval`` extra (``pip install 'groundup[eval]'``) and is imported only here, when an
evaluation runs. Models are scored by :class:`groundup.instruct.lm_eval_model.CausalLMAdapter`: the
log-likelihood of each answer choice under the model itself, for our GPT and LitGPT checkpoints alike.

Offline: ``include_path`` points at a directory of lm-eval task YAMLs whose dataset is a local file, e.g.

.. code-block:: yaml

    task: philosophy_local
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/philosophy.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
    doc_to_choice: ["A", "B", "C", "D"]
    doc_to_target: answer
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from groundup.errors import GroundupError


class MCEvalError(GroundupError, RuntimeError):
    """lm-eval missing, an unknown task, or a task whose data cannot be loaded."""


@dataclass
class MCResult:
    metrics: dict[str, dict[str, float]]  # task -> metric -> value (``acc``, ``acc_stderr``, ...)
    samples: dict[str, int]  # task -> questions evaluated
    model_id: str

    def flat_metrics(self, prefix: str = "mc") -> dict[str, float]:
        return {
            f"{prefix}.{task}.{name}": value
            for task, values in self.metrics.items()
            for name, value in values.items()
        }


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise MCEvalError(
            "multiple-choice evaluation needs lm-eval: pip install 'groundup[eval]' (or set mc_eval.enabled=false)"
        )


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's task index. Indexing its ~15k built-in task YAMLs takes ~25 s, so when every task is
    defined under ``include_path`` only that directory is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def check_tasks(manager: Any, tasks: list[str], include_path: str | None) -> None:
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        where = f" (built-in tasks plus those in {include_path!r})" if include_path else " (built-in tasks)"
        raise MCEvalError(f"unknown lm-eval task(s) {unknown}{where}; `lm_eval ls tasks` lists them")


def evaluate_mc(
    model: str,
    tasks: list[str],
    *,
    include_path: str | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    accelerator: str = "auto",
    seed: int = 1234,
) -> MCResult:
    """Accuracy (and lm-eval's other metrics) of ``model`` on ``tasks``, zero-shot."""
    require_lm_eval()
    import lm_eval

    from groundup.instruct.inference import load_causal_lm
    from groundup.instruct.lm_eval_model import CausalLMAdapter

    manager = task_manager(tasks, include_path)
    check_tasks(manager, tasks, include_path)
    causal_lm = load_causal_lm(model, accelerator=accelerator)
    try:
        output = lm_eval.simple_evaluate(
            model=CausalLMAdapter(causal_lm, batch_size=batch_size),
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (OSError, ConnectionError, ValueError) as exc:
        hint = "" if include_path else "; offline, point mc_eval.include_path at local task definitions"
        raise MCEvalError(f"lm-eval could not run {tasks} ({type(exc).__name__}: {exc}){hint}") from exc
    return MCResult(
        metrics={
            task: _metrics(values, output["higher_is_better"].get(task, {}))
            for task, values in output["results"].items()
        },
        samples={task: int(count.get("effective", 0)) for task, count in output.get("n-samples", {}).items()},
        model_id=causal_lm.model_id,
    )


def _metrics(values: dict[str, Any], metric_names: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.2, "alias": ...}`` -> ``{"acc": 0.5, ...}``: the
    task's metrics and their standard errors (a stderr lm-eval could not compute is "N/A" and left out)."""
    out = {}
    for key, value in values.items():
        name, _, filter_name = key.partition(",")
        if name.removesuffix("_stderr") not in metric_names or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name if filter_name in ("", "none") else f"{name}.{filter_name}"] = float(value)
    return out
