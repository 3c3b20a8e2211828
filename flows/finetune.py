"""Flow ``finetune``: split the instruction data, then LoRA-finetune with the configured engine."""

from __future__ import annotations

import dataclasses

from prefect import flow

from groundup import tracking
from groundup.config import FinetuneConfig, InstructDataConfig, WeightsConfig
from groundup.errors import SettingsError
from groundup.flows.common import Stages, stage_context
from groundup.flows.weights import load_gpt2
from groundup.instruct.engines import PRETRAINED_BASE, checked_engine
from groundup.tasks import finetune as finetune_tasks
from groundup.tasks.common import StageContext, StageResult


@dataclasses.dataclass
class FinetuneRun(StageResult):
    """The instruction data's split, the finetuned model, and the flow's MLflow run the stages nest under."""

    split: finetune_tasks.TrainTestSplit
    finetune: finetune_tasks.FinetuneResult
    run_id: str


def gpt2_base(config: FinetuneConfig, weights: WeightsConfig | None, context: StageContext) -> dict[str, str]:
    """A GPT-2 size as the base (``gpt2-124M``): the weights stage fetches and converts it first; its
    checkpoint is the base and its registered version (``gpt2-124m/N``) the lineage parent. ``weights``
    says where GPT-2 comes from (source, local dir); its size follows ``config.base``."""
    size = config.base_model.size
    if size is None:
        return {}
    settings = WeightsConfig.model_validate({**(weights or WeightsConfig()).model_dump(), "size": size})
    fetched = load_gpt2(config=settings, **context.kwargs)
    return {"base_checkpoint": fetched.checkpoint, "base_model_ref": fetched.model_version}


@flow(name="split-instructions", log_prints=True)
def split_instructions(
    data: InstructDataConfig = InstructDataConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> finetune_tasks.TrainTestSplit:
    """Fetch, validate and split the instruction data (``groundup instruct split``): the first stage of
    ``finetune``, on its own."""
    with stage_context(
        "split-instructions", config=data, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as context:
        stages = Stages()
        stages.submit("split_instructions", finetune_tasks.split_instructions, data, **context.kwargs)
        return stages.result("split_instructions", "train")


@flow(name="finetune", log_prints=True)
def finetune(
    config: FinetuneConfig = FinetuneConfig(),
    data: InstructDataConfig = InstructDataConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    weights: WeightsConfig | None = None,
) -> FinetuneRun:
    """Split the instruction data (``data``) and finetune ``config.base`` on its training part (``weights``:
    where GPT-2 comes from, when the base is a GPT-2 size)."""
    checked_engine(config)  # before any stage: the engine, its base, its settings, the accelerator
    if config.base_model.kind == "pretrained":
        raise SettingsError(
            f"finetune.base={PRETRAINED_BASE!r} is the model the pipeline pretrains",
            fix="run `groundup run`, or give a checkpoint directory or GPT-2 size as --base",
        )
    settings = {"finetune": config.model_dump(mode="json"), "instruct": data.model_dump(mode="json")}
    with stage_context(
        "finetune", config=settings, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as context:
        stages = Stages()
        stages.submit("split_instructions", finetune_tasks.split_instructions, data, **context.kwargs)
        split = stages.result("split_instructions", "train")
        base = gpt2_base(config, weights, context)
        stages.submit(
            "finetune", finetune_tasks.finetune, split.train, config,
            val_fraction=data.val_fraction, seed=data.seed, **base, **context.kwargs,
        )  # fmt: skip
        return FinetuneRun(split=split, finetune=stages.result("finetune", "model_dir"), run_id=context.parent_run_id)
