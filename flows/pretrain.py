"""Flow ``pretrain``: the data stage (download, tokenize) and then pretraining the from-scratch GPT."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from groundup import tracking
from groundup.config import PretrainConfig
from groundup.flows.common import stage_context
from groundup.flows.data import PreparedData, prepare_data
from groundup.tasks.common import StageResult
from groundup.tasks.pretrain import PretrainedModel
from groundup.tasks.pretrain import pretrain as pretrain_task
from groundup.train.pretrain import plan_pretraining


@dataclasses.dataclass
class PretrainRun(StageResult):
    """The data the model was pretrained on, and the pretrained model."""

    data: PreparedData
    pretrain: PretrainedModel


@flow(name="pretrain", log_prints=True)
def pretrain(
    config: PretrainConfig = PretrainConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> PretrainRun:
    """Prepare ``config.data`` and pretrain ``config.model`` on it with ``config.train``.

    Returns ``data`` (the data stage's results) and ``pretrain`` (``checkpoint``, ``model_version`` e.g.
    ``groundup-gpt/1``, ``loss_plot``, ``steps``, ``tokens_seen``, final losses, ``samples``).
    """
    output_dir = str(Path(output_dir).resolve())
    plan_pretraining(config)  # bad settings fail here, not after the data stage
    with stage_context("pretrain", config=config, output_dir=output_dir, experiment=experiment,
                       parent_run_id=parent_run_id) as context:  # fmt: skip
        data = prepare_data(config=config.data, **context.kwargs)
        result = pretrain_task(data.tokens.parquet, config, text_sha256=data.text.sha256, **context.kwargs)
        print(f"pretrained {result.model_version}: {result.steps} steps, "
              f"final val loss {result.final_val_loss:.3f} -> {result.checkpoint}")
        return PretrainRun(data=data, pretrain=result)
