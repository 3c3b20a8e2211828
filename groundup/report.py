"""What ``groundup run`` prints when the pipeline is done: every stage and its state, skipped ones with why,
the models it produced, and the next commands, written so that they run in the user's shell as printed.

Part of the command-line layer: the flow returns results, this module words them. A printed command names
the ``groundup`` executable as the shell will find it: plain ``groundup`` when ``PATH`` leads to this very
installation, else its path (``.venv/bin/groundup`` after ``make run``, which never activates the venv).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from groundup.config import LOCAL_GPT2, LOCAL_JUDGE, MC_EVAL_LABELS, PIPELINE_STAGES, PipelineConfig
from groundup.instruct.judge_scores import control_verdict
from groundup.instruct.promotion import SCORE_METRIC

if TYPE_CHECKING:  # the flow's result type; this module words it and runs no flow
    from groundup.flows.pipeline import PipelineRun

# The pipeline's stages in the order they run, one per model for evaluate_mc; optional ones may be absent.
STAGES = tuple(
    stage
    for name in PIPELINE_STAGES
    for stage in ([f"{name}_{label}" for label in MC_EVAL_LABELS] if name == "evaluate_mc" else [name])
)


def command(tool: str = "groundup") -> str:
    """How to type ``tool`` (a console script of this installation) so that the user's shell runs it."""
    script = Path(sys.executable).parent / tool
    if not script.exists():
        return shlex.quote(tool)  # installed elsewhere on PATH (e.g. a system-wide prefect)
    on_path = shutil.which(tool)
    if on_path and Path(on_path).resolve() == script.resolve():
        return tool
    # sys.executable may be a symlink into the base interpreter: keep the venv's path, not its target.
    absolute = Path(os.path.abspath(script))
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    return shlex.quote(shown if "/" in shown else f"./{shown}")


def skipped_because(stage: str, config: PipelineConfig, sources_dir: str | None) -> str | None:
    """Why an optional stage did not run, in terms of what the user gave; None for a stage that always runs."""
    if stage == "fetch_gpt2_weights" and not config.weights.enabled:
        if sources_dir and not (Path(sources_dir) / LOCAL_GPT2).is_dir():
            return f"no {LOCAL_GPT2}/ in --sources-dir: finetuning starts from the model pretrained in this run"
        return "weights.enabled is false"
    if stage == "judge_responses" and not config.judge.enabled:
        if sources_dir and not (Path(sources_dir) / LOCAL_JUDGE).is_dir():
            return f"no {LOCAL_JUDGE}/ in --sources-dir: the finetuned model is promoted without a score"
        return "judge.enabled is false"
    if stage.startswith("evaluate_mc_") and not config.mc_eval.enabled:
        return "mc_eval.enabled is false (multiple-choice benchmarks need the eval extra and their data sets)"
    return None


def stage_lines(states: dict[str, str], config: PipelineConfig, sources_dir: str | None) -> list[str]:
    """Each stage's state (``Completed``, ``Cached`` ...), or why an optional one was skipped."""
    names = [*STAGES, *(name for name in states if name not in STAGES)]
    width = max(map(len, names))
    lines = []
    for name in names:
        state = states.get(name) or (f"skipped: {why}" if (why := skipped_because(name, config, sources_dir)) else None)
        if state:
            lines.append(f"  {name:<{width}}  {state}")
    return lines


def model_lines(result: PipelineRun, config: PipelineConfig, sources_dir: str | None) -> list[str]:
    pre = result.pretrain
    lines = [f"pretrained   {pre.model_version}: {pre.steps} steps, val loss {pre.final_val_loss:.3f}"]
    if result.weights:
        lines.append(f"GPT-2        {result.weights.model_version} ({result.weights.checkpoint})")
    lines.append(f"finetuned    {result.finetune.model_ref} ({result.finetune.model_dir})")
    judge = result.judge
    if judge:
        m = judge.metrics
        lines.append(
            f"judge        {judge.judge}: base {m.get('judge.base_model.mean', math.nan):.1f}, "
            f"finetuned {m.get(SCORE_METRIC, math.nan):.1f} (mean of 0-100)"
        )
        lines.append(f"             {control_verdict(judge.summary)}")
    else:
        lines.append(f"judge        skipped: {skipped_because('judge_responses', config, sources_dir)}")
    promotion = result.promotion
    lines.append(f"promotion    {promotion.model} -> @{', @'.join(promotion.aliases)}: {promotion.reason}")
    return lines


def next_commands(result: PipelineRun, output_dir: str | Path) -> list[str]:
    """The commands to look at this run, each runnable as printed (tests run them)."""
    from groundup import serving

    groundup, out = command(), shlex.quote(str(output_dir))
    model = result.promotion.model.split("/")[0]
    lines = [
        f"lineage:     {groundup} lineage {shlex.quote(model + '@candidate')} --output-dir {out}",
        f"both UIs:    {groundup} ui --output-dir {out}    (Prefect and MLflow on this run's data)",
        f"  stop them: {groundup} ui --stop --output-dir {out}",
    ]
    prefect = serving.running_servers(output_dir).get("prefect")
    if prefect:  # the background server that ran this flow: its UI is up already
        lines.append(f"Prefect UI:  {prefect.url}")
    return lines


def summary(
    result: PipelineRun, config: PipelineConfig, output_dir: str | Path, sources_dir: str | None = None
) -> str:
    """The report ``groundup run`` prints: stages, models, next commands."""
    return "\n".join([
        "", "groundup pipeline", "", *stage_lines(result.stages, config, sources_dir), "",
        *model_lines(result, config, sources_dir), "", *next_commands(result, output_dir),
    ])  # fmt: skip
