"""Flow ``load-gpt2``: pretrained GPT-2 weights fetched, converted into our model and registered."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from groundup import tracking
from groundup.config import WeightsConfig
from groundup.flows.common import Stages, stage_context
from groundup.tasks.weights import FetchedGPT2, fetch_gpt2_weights


@flow(name="load-gpt2", log_prints=True)
def load_gpt2(
    config: WeightsConfig = WeightsConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    out_dir: str | None = None,
) -> FetchedGPT2:
    """GPT-2 ``config.size`` from ``config.source`` (or ``config.from_dir``) as a groundup checkpoint.

    Returns ``checkpoint`` (its directory), ``model_version`` (``gpt2-124m/N``) and the source's lineage.
    """
    output_dir = str(Path(output_dir).resolve())
    with stage_context(
        "load-gpt2", config=config, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as context:
        stages = Stages()
        stages.submit("fetch_gpt2_weights", fetch_gpt2_weights, config, out_dir=out_dir, **context.kwargs)
        result = stages.result("fetch_gpt2_weights", "checkpoint")
        print(f"GPT-2 weights: {result.model_version} at {result.checkpoint}: {result.smoke_text!r}")
        return result
