"""Flow ``finetune``: split the instruction data, then LoRA-finetune with the configured engine."""

from __future__ import annotations

from typing import Any

from prefect import flow

from groundup import tracking
from groundup.config import FinetuneConfig, InstructDataConfig, WeightsConfig
from groundup.flows.common import parent_run
from groundup.flows.weights import load_gpt2
from groundup.instruct.lora_finetune import gpt2_size
from groundup.tasks import finetune as finetune_tasks


def engine_task(engine: str):
    """The task that finetunes with ``engine``.

    Every engine task takes ``(train_path, config, val_fraction, seed, output_dir, experiment,
    parent_run_id)`` and returns a dict with at least ``engine``, ``model_ref`` (the registered version),
    ``model_dir`` and ``metrics``. ``finetune_groundup`` also takes ``base_checkpoint`` and
    ``base_model_ref``: the GPT-2 (or pretrained) checkpoint to adapt and its registered version.
    """
    tasks = {"litgpt": finetune_tasks.finetune_lora, "groundup": finetune_tasks.finetune_groundup}
    try:
        return tasks[engine]
    except KeyError:
        raise ValueError(f"unknown finetuning engine {engine!r}; available: {', '.join(tasks)}") from None


def gpt2_base(
    config: FinetuneConfig, weights: WeightsConfig | None, output_dir: str, experiment: str, run_id: str
) -> dict[str, str]:
    """Engine ``groundup`` on a GPT-2 size (``gpt2-124M``): the weights stage fetches and converts it first;
    its checkpoint is the base and its registered version (``gpt2-124m/N``) the lineage parent. ``weights``
    says where GPT-2 comes from (source, local dir); its size follows ``config.base``."""
    size = gpt2_size(config.base) if config.engine == "groundup" else None
    if size is None:
        return {}
    settings = WeightsConfig.model_validate({**(weights or WeightsConfig()).model_dump(), "size": size})
    fetched = load_gpt2(config=settings, output_dir=output_dir, experiment=experiment, parent_run_id=run_id)
    return {"base_checkpoint": fetched["checkpoint"], "base_model_ref": fetched["model_version"]}


@flow(name="finetune", log_prints=True)
def finetune(
    config: FinetuneConfig = FinetuneConfig(),
    data: InstructDataConfig = InstructDataConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    weights: WeightsConfig | None = None,
) -> dict[str, Any]:
    """Split the instruction data (``data``) and finetune ``config.base`` on its training part (``weights``:
    where the groundup engine gets GPT-2 from, when the base is a GPT-2 size)."""
    train = engine_task(config.engine)
    settings = {"finetune": config.model_dump(mode="json"), "instruct": data.model_dump(mode="json")}
    with parent_run(
        "finetune", config=settings, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as run_id:
        split = finetune_tasks.split_instructions(
            data, output_dir=output_dir, experiment=experiment, parent_run_id=run_id
        )
        base = gpt2_base(config, weights, output_dir, experiment, run_id)
        result = train(
            split["train"],
            config,
            val_fraction=data.val_fraction,
            seed=data.seed,
            output_dir=output_dir,
            experiment=experiment,
            parent_run_id=run_id,
            **base,
        )
        return {"split": split, "finetune": result, "run_id": run_id}
