"""LoRA finetuning with LitGPT, run as a subprocess (``python -m litgpt finetune_lora``).

Never in-process: ``litgpt.finetune.lora.setup()`` re-parses ``sys.argv`` and Lightning's multi-device
launch re-runs the current command. LitGPT has no accelerator flag, so the accelerator is chosen through
the environment (``LT_ACCELERATOR``, read by Lightning Fabric, plus ``CUDA_VISIBLE_DEVICES=""`` for CPU),
after checking here that what was asked for exists. Every setting goes into one YAML file passed with
``--config`` (kept in the output directory as the record of the run); paths in it are absolute.

Output directory layout: ``data/`` (the train/val files LitGPT read), ``litgpt_finetune.yaml``,
``logs/csv/version_0/metrics.csv`` (LitGPT's CSV logger) and ``final/`` — the merged model
(``lit_model.pth``, a complete LitGPT checkpoint) and the LoRA weights (``lit_model.pth.lora``).

The subprocess itself is ``litgpt_process``, base models (hub download, checkpoint checks)
``litgpt_checkpoints``; here: placement, the settings translated into LitGPT's YAML, its CSV metrics read
back (``litgpt_metrics``), and :class:`LitGPTEngine`, the engine ``litgpt`` of ``groundup.instruct.engines``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from groundup import devices
from groundup.config import FinetuneConfig
from groundup.errors import DeviceError, SettingsError
from groundup.files import write_json
from groundup.instruct.data import holdout_validation, load_entries
from groundup.instruct.engines import FinetuneBase, FinetuneJob, FinetuneOutcome, TrainCallbacks
from groundup.instruct.litgpt_checkpoints import check_checkpoint_dir, resolve_base_model
from groundup.instruct.litgpt_metrics import (
    TrainingMetrics,
    evaluation_points,
    find_metrics_csv,
    read_litgpt_metrics,
)
from groundup.instruct.litgpt_process import (
    LineCallback,
    LitGPTError,
    ProgressCallback,
    progress_forwarder,
    run_litgpt,
)
from groundup.train import cpu_memory
from groundup.train.plots import save_loss_plot

# ---------------------------------------------------------------------------------------------------------
# Accelerator and precision
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the run goes: the accelerator, the precision passed to LitGPT and the environment that selects it."""

    accelerator: str
    precision: str | None
    env: dict[str, str]


def resolve_placement(config: FinetuneConfig) -> Placement:
    """Check the requested accelerator, devices, precision and quantization against this machine."""
    runtime = config.runtime
    accelerator = devices.resolve_accelerator(
        runtime.accelerator, setting="finetune.runtime.accelerator", devices=runtime.devices
    )
    world_size = runtime.devices * runtime.num_nodes
    if accelerator != "cuda" and world_size > 1:
        raise DeviceError(
            f"finetune.runtime: devices={runtime.devices}, num_nodes={runtime.num_nodes} needs CUDA GPUs (LitGPT's "
            f"multi-device LoRA runs data-parallel with FSDP); the accelerator here is {accelerator!r}"
        )
    # CPUs (and MPS) have no fast bf16; LitGPT's own default would pick a 16-bit mode there.
    precision = runtime.precision or ("32-true" if accelerator in ("cpu", "mps") else None)
    devices.check_quantization(
        config.litgpt.quantize, accelerator, setting="finetune.litgpt.quantize", precision=precision, world_size=world_size
    )
    env = {"LT_ACCELERATOR": accelerator}
    if accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        if runtime.keep_freed_memory:  # read by glibc when the subprocess starts
            env.update(cpu_memory.environment())
    return Placement(accelerator, precision, env)

def iterations_per_epoch(n_train: int, config: FinetuneConfig) -> int:
    """Micro batches per epoch on each device (LitGPT's ``iter``)."""
    return math.ceil(n_train / (config.runtime.devices * config.runtime.num_nodes) / config.micro_batch_size)


def expected_steps(n_train: int, config: FinetuneConfig) -> int:
    """Optimizer steps LitGPT will take: micro batches, ``accumulation`` of them per step."""
    ranks = config.runtime.devices * config.runtime.num_nodes
    accumulation = max(1, config.global_batch_size // ranks // config.micro_batch_size)
    steps = config.epochs * max(1, iterations_per_epoch(n_train, config) // accumulation)
    return min(steps, config.max_steps) if config.max_steps else steps


def check_batch_sizes(config: FinetuneConfig) -> None:
    ranks = config.runtime.devices * config.runtime.num_nodes
    if config.global_batch_size // ranks < config.micro_batch_size:
        raise SettingsError(
            f"global_batch_size={config.global_batch_size} over {ranks} device(s) is smaller than "
            f"micro_batch_size={config.micro_batch_size}"
        )


def lora_alpha(config: FinetuneConfig) -> int:
    alpha = config.lora.alpha
    if not float(alpha).is_integer():
        raise SettingsError(f"LitGPT takes an integer lora.alpha, got {alpha}")
    return int(alpha)


def litgpt_settings(
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    config: FinetuneConfig,
    placement: Placement,
    num_workers: int,
) -> dict[str, Any]:
    """The ``--config`` YAML for ``litgpt finetune_lora``: our settings in LitGPT's names."""
    from groundup.instruct.litgpt_prompts import class_path

    lora = config.lora
    return {
        "checkpoint_dir": str(base_dir),
        "out_dir": str(out_dir),
        "precision": placement.precision,
        "quantize": config.litgpt.quantize,
        "devices": config.runtime.devices,
        "num_nodes": config.runtime.num_nodes,
        "lora_r": lora.r,
        "lora_alpha": lora_alpha(config),
        "lora_dropout": lora.dropout,
        "lora_query": lora.query,
        "lora_key": lora.key,
        "lora_value": lora.value,
        "lora_projection": lora.projection,
        "lora_mlp": lora.mlp,
        "lora_head": lora.head,
        "data": {
            "class_path": "litgpt.data.JSON",
            "init_args": {
                "json_path": str(data_dir),
                "mask_prompt": config.mask_prompt,
                # Our prompt formats, not LitGPT's (its Alpaca differs from the workshop's).
                "prompt_style": {"class_path": class_path(config.prompt_style)},
                "seed": config.seed,
                "num_workers": num_workers,
            },
        },
        "train": {
            "epochs": config.epochs,
            "max_steps": config.max_steps,
            "global_batch_size": config.global_batch_size,
            "micro_batch_size": config.micro_batch_size,
            # LitGPT's warmup divides by the step count: 1 is its smallest value (the first step has lr 0).
            "lr_warmup_steps": max(1, config.warmup_steps),
            "max_seq_length": config.max_seq_length,
            "log_interval": config.log_interval,
            "save_interval": None,  # only the final checkpoint is kept
        },
        "eval": {"interval": config.eval_interval},
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": config.lr, "weight_decay": config.weight_decay},
        },
        "logger_name": "csv",
        "seed": config.seed,
    }


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    out_dir: Path
    model_dir: Path  # merged, complete LitGPT checkpoint
    lora_weights: Path
    metrics: TrainingMetrics
    loss_plot: Path | None  # None when LitGPT never validated (eval_interval beyond the last step)
    placement: Placement
    n_train: int
    n_val: int
    train_file: Path
    val_file: Path


def finetune_lora(
    base_dir: str | Path,
    train_path: str | Path,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 123,
    on_line: LineCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> FinetuneResult:
    """LoRA-finetune the LitGPT checkpoint ``base_dir`` on the entries in ``train_path``.

    ``val_fraction`` of them (chosen with ``seed``) are held out for validation. ``out_dir`` is replaced;
    LitGPT writes straight into it (the files it records, like ``final/hyperparameters.yaml``, name their
    real paths) and it is removed again if the run fails, so a failed run leaves nothing behind.
    """
    base_dir = check_checkpoint_dir(base_dir)
    check_batch_sizes(config)
    lora_alpha(config)
    placement = resolve_placement(config)
    fit, val = holdout_validation(load_entries(train_path), val_fraction, seed)
    if not val:
        raise SettingsError("LitGPT finetuning needs validation entries: set a val_fraction above 0")

    out_dir = Path(out_dir).resolve()
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        data_dir = out_dir / "data"
        write_json(data_dir / "train.json", fit, indent=4)
        write_json(data_dir / "val.json", val, indent=4)
        # DataLoader workers only pay off when a GPU waits for batches; on CPU they compete with training.
        num_workers = 0 if placement.accelerator == "cpu" else 4
        settings = litgpt_settings(base_dir, data_dir, out_dir, config, placement, num_workers)
        settings_file = out_dir / "litgpt_finetune.yaml"
        settings_file.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        with progress_forwarder(on_line, on_progress, expected_steps(len(fit), config)) as forward:
            # The base is local by now: LitGPT needs no token (and prints its arguments).
            run_litgpt(
                ["finetune_lora", "--config", str(settings_file)],
                env=placement.env,
                drop_env=("HF_TOKEN",),
                on_line=forward,
            )
        if not (out_dir / "final" / "lit_model.pth").is_file():
            raise LitGPTError(
                f"litgpt finetune_lora wrote no merged model {str(out_dir / 'final' / 'lit_model.pth')!r}"
            )
        metrics = read_litgpt_metrics(find_metrics_csv(out_dir))
        points = evaluation_points(metrics, iterations_per_epoch(len(fit), config))
        loss_plot = save_loss_plot(points, out_dir / "loss.png") if points else None
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return FinetuneResult(
        out_dir=out_dir,
        model_dir=out_dir / "final",
        lora_weights=out_dir / "final" / "lit_model.pth.lora",
        metrics=metrics,
        loss_plot=loss_plot,
        placement=placement,
        n_train=len(fit),
        n_val=len(val),
        train_file=out_dir / "data" / "train.json",
        val_file=out_dir / "data" / "val.json",
    )


def _summary(result: FinetuneResult) -> str:
    return (
        f"Merged model in `{result.model_dir}`; {result.n_train} training / {result.n_val} validation entries on "
        f"{result.placement.accelerator} ({result.placement.precision or 'LitGPT default precision'})."
    )


class LitGPTEngine:
    """Engine ``litgpt``: LoRA on any LitGPT model (a hub id or a LitGPT checkpoint directory), merged."""

    name = "litgpt"
    stage = "finetune_lora"  # the MLflow stage run (and lineage) name
    accepts = ("directory", "hub")

    def check(self, config: FinetuneConfig) -> None:
        check_batch_sizes(config)
        lora_alpha(config)
        resolve_placement(config)

    def prepare_base(
        self, base: FinetuneBase, output_root: Path, *, hf_token: str | None = None, on_line: LineCallback | None = None
    ) -> Path:
        return resolve_base_model(base.value, output_root / "checkpoints" / "litgpt", hf_token=hf_token, on_line=on_line)

    def train(self, job: FinetuneJob, callbacks: TrainCallbacks) -> FinetuneOutcome:
        result = finetune_lora(
            job.base_dir, job.train_path, job.config, job.out_dir, val_fraction=job.val_fraction, seed=job.seed,
            on_line=callbacks.on_line, on_progress=callbacks.on_progress,
        )  # fmt: skip
        return FinetuneOutcome(
            model_dir=result.model_dir,
            out_dir=result.out_dir,
            val_file=result.val_file,
            n_train=result.n_train,
            n_val=result.n_val,
            final_metrics=result.metrics.final,
            loss_plot=result.loss_plot,
            params={
                "accelerator": result.placement.accelerator,
                "resolved_precision": result.placement.precision or "litgpt-default",
            },
            metric_history=result.metrics.series,
            artifacts=[result.out_dir / "litgpt_finetune.yaml", find_metrics_csv(result.out_dir)],
            model_type="litgpt",
            summary=_summary(result),
            extra={"lora_weights": str(result.lora_weights)},
        )
