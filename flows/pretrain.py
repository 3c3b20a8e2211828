"""Flow ``pretrain``: the data stage (download, tokenize) and then pretraining the from-scratch GPT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from groundup import tracking
from groundup.config import PretrainConfig
from groundup.flows.common import parent_run
from groundup.flows.data import prepare_data
from groundup.tasks.pretrain import pretrain as pretrain_task
from groundup.train.pretrain import plan_pretraining


@flow(name="pretrain", log_prints=True)
def pretrain(
    config: PretrainConfig = PretrainConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Prepare ``config.data`` and pretrain ``config.model`` on it with ``config.train``.

    Returns the task's result (``checkpoint``, ``model_version`` e.g. ``groundup-gpt/1``, ``loss_plot``,
    ``steps``, ``tokens_seen``, final losses, ``samples``) plus ``parquet`` and the data stage's results.
    """
    output_dir = str(Path(output_dir).resolve())
    plan_pretraining(config)  # bad settings fail here, not after the data stage
    with parent_run("pretrain", config=config, output_dir=output_dir, experiment=experiment,
                    parent_run_id=parent_run_id) as run_id:
        data = prepare_data(config=config.data, output_dir=output_dir, experiment=experiment, parent_run_id=run_id)
        result = pretrain_task(
            data["parquet"], config, output_dir=output_dir, experiment=experiment, parent_run_id=run_id,
            text_sha256=data["text_sha256"],
        )
        print(f"pretrained {result['model_version']}: {result['steps']} steps, "
              f"final val loss {result['final_val_loss']:.3f} -> {result['checkpoint']}")
        return {**result, "parquet": data["parquet"], "tokens": data["tokens"], "parquet_sha256": data["parquet_sha256"]}
