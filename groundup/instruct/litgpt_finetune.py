"""LoRA finetuning with LitGPT, run as a subprocess (``python -m litgpt finetune_lora``).

Never in-process: ``litgpt.finetune.lora.setup()`` re-parses ``sys.argv`` and Lightning's multi-device
launch re-runs the current command. LitGPT has no accelerator flag, so the accelerator is chosen through
the environment (``LT_ACCELERATOR``, read by Lightning Fabric, plus ``CUDA_VISIBLE_DEVICES=""`` for CPU),
after checking here that what was asked for exists. Every setting goes into one YAML file passed with
``--config`` (kept in the output directory as the record of the run); paths in it are absolute.

Output directory layout: ``data/`` (the train/val files LitGPT read), ``litgpt_finetune.yaml``,
``logs/csv/version_0/metrics.csv`` (LitGPT's CSV logger) and ``final/`` — the merged model
(``lit_model.pth``, a complete LitGPT checkpoint) and the LoRA weights (``lit_model.pth.lora``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from groundup import devices
from groundup.config import FinetuneConfig
from groundup.errors import DeviceError, GroundupError, ModelError
from groundup.files import write_json
from groundup.instruct.data import holdout_validation, load_entries
from groundup.train.plots import save_loss_plot
from groundup.train.state import EvalPoint

log = logging.getLogger(__name__)

LineCallback = Callable[[str], None]
ProgressCallback = Callable[[int, int], None]

TOKEN_HELP = (
    "set the HF_TOKEN environment variable, or store the token in a Prefect Secret block and name it in "
    "finetune.hf_token_secret (e.g. --set finetune.hf_token_secret=hf-token)"
)
# Series read from LitGPT's CSV log; throughput columns ending in ``_per_sec`` are kept as well.
METRIC_COLUMNS = (
    "loss",
    "val_loss",
    "val_ppl",
    "learning_rate",
    "iter_time",
    "tokens",
    "total_tokens",
    "epoch",
)
ERROR_TAIL_LINES = 40


class LitGPTError(GroundupError, RuntimeError):
    """A LitGPT subprocess failed; the message carries the end of its output."""


class BaseModelError(ModelError):
    """A base model that cannot be used (not a checkpoint, not downloadable, gated without a token)."""


# ---------------------------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------------------------


def missing_checkpoint_files(directory: Path) -> list[str]:
    """The files LitGPT needs that ``directory`` lacks (empty for a usable checkpoint)."""
    missing = [name for name in ("lit_model.pth", "model_config.yaml") if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer.model)")
    if not (directory / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    return missing


def check_checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise BaseModelError(f"base model directory {str(directory)!r} does not exist")
    missing = missing_checkpoint_files(directory)
    if missing:
        raise BaseModelError(
            f"base model directory {str(directory)!r} is not a LitGPT checkpoint: missing {', '.join(missing)}"
        )
    return directory


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(base: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(HUB_ID.match(base)) and not Path(base).exists()


def resolve_base_model(
    base: str,
    checkpoints_dir: str | Path,
    *,
    hf_token: str | None = None,
    on_line: LineCallback | None = None,
) -> Path:
    """A local LitGPT checkpoint for ``base``: the directory itself, or ``checkpoints_dir/<org>/<name>``
    downloaded and converted with ``litgpt download`` (skipped when already there)."""
    if not is_hub_id(base):
        if not Path(base).exists():
            raise BaseModelError(
                f"base model {base!r} is neither a Hugging Face hub id (org/name, e.g. microsoft/phi-2) "
                "nor an existing LitGPT checkpoint directory"
            )
        return check_checkpoint_dir(base)
    target = (Path(checkpoints_dir) / base).resolve()
    if target.is_dir() and not missing_checkpoint_files(target):
        return target
    env = {"HF_TOKEN": hf_token} if hf_token else {}
    try:
        run_litgpt(
            ["download", base, "--checkpoint_dir", str(Path(checkpoints_dir).resolve())],
            env=env,
            drop_env=() if hf_token else ("HF_TOKEN",),
            on_line=on_line,
            secrets=[hf_token] if hf_token else [],
        )
    except LitGPTError as exc:
        raise _download_error(base, str(exc), hf_token) from None
    if not target.is_dir() or missing_checkpoint_files(target):
        # ``litgpt download`` exits 0 after printing a notice for repos it has no config for.
        raise BaseModelError(
            f"litgpt download {base!r} produced no LitGPT checkpoint in {str(target)!r}; LitGPT may not support "
            "this model (see `litgpt download list`)"
        )
    return target


def _download_error(base: str, output: str, hf_token: str | None) -> BaseModelError:
    if "requires authentication" in output or "gated repo" in output.lower():
        if not hf_token:
            return BaseModelError(
                f"base model {base!r} is gated on the Hugging Face Hub and no token was given: accept its license "
                f"on https://huggingface.co/{base}, then {TOKEN_HELP}"
            )
        return BaseModelError(
            f"the Hugging Face token was refused for the gated model {base!r}; check that it has access "
            f"(https://huggingface.co/{base})"
        )
    return BaseModelError(f"could not download base model {base!r}:\n{output}")


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
        config.quantize, accelerator, setting="finetune.quantize", precision=precision, world_size=world_size
    )
    env = {"LT_ACCELERATOR": accelerator}
    if accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return Placement(accelerator, precision, env)


# ---------------------------------------------------------------------------------------------------------
# Running LitGPT
# ---------------------------------------------------------------------------------------------------------


def run_litgpt(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    drop_env: Sequence[str] = (),
    on_line: LineCallback | None = None,
    secrets: Sequence[str] = (),
    cwd: str | Path | None = None,
) -> None:
    """Run ``python -m litgpt <args>``, passing each output line (secrets masked) to ``on_line``.

    Raises :class:`LitGPTError` with the end of the output if it exits non-zero.
    """
    full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"  # lines must arrive as they are printed, not in 8 KiB blocks
    command = [sys.executable, "-m", "litgpt", *args]
    emit = on_line or log.info
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=full_env,
        cwd=cwd,
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = _mask(raw.rstrip("\n"), secrets)
            tail.append(line)
            emit(line)
        returncode = process.wait()
    if returncode != 0:
        # The exception line goes first so that a one-line view (Prefect's state message) shows the cause.
        cause = next((line for line in reversed(tail) if EXCEPTION_LINE.match(line)), "")
        raise LitGPTError(f"`litgpt {args[0]}` failed (exit code {returncode}): {cause}\n" + "\n".join(tail))


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")


def _mask(line: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line


PROGRESS_LINE = re.compile(r"\biter (\d+) step (\d+)\b")


@contextlib.contextmanager
def _progress_forwarder(
    on_line: LineCallback | None, on_progress: ProgressCallback | None, total_steps: int
) -> Iterator[LineCallback]:
    """Pass lines on, and turn LitGPT's ``Epoch 1 | iter 8 step 2 | ...`` lines into progress reports."""
    from tqdm.auto import tqdm

    emit = on_line or log.info
    with tqdm(total=total_steps, desc="finetune_lora", unit="step", disable=not sys.stderr.isatty()) as bar:

        def forward(line: str) -> None:
            emit(line)
            match = PROGRESS_LINE.search(line)
            if match:
                step = min(int(match.group(2)), total_steps)
                bar.update(step - bar.n)
                if on_progress:
                    on_progress(step, total_steps)

        yield forward


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
        raise ValueError(
            f"global_batch_size={config.global_batch_size} over {ranks} device(s) is smaller than "
            f"micro_batch_size={config.micro_batch_size}"
        )


def lora_alpha(config: FinetuneConfig) -> int:
    alpha = config.lora.alpha
    if not float(alpha).is_integer():
        raise ValueError(f"LitGPT takes an integer lora.alpha, got {alpha}")
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
        "quantize": config.quantize,
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
# Metrics
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainingMetrics:
    """Series ``name -> [(iteration, value)]`` from LitGPT's CSV log, and the final values."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)


def read_litgpt_metrics(csv_path: str | Path) -> TrainingMetrics:
    """Parse LitGPT's ``metrics.csv``. Its CSV logger writes sparse rows: training rows (``loss``, ...),
    throughput rows and validation rows share a ``step`` column (the iteration). The final validation is
    logged without a step (it shows up as step 0 after the loop); it is put at the last iteration."""
    metrics = TrainingMetrics()
    last_step = 0
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0))
            is_final_validation = bool(row.get("val_loss")) and not row.get("loss") and step < last_step
            if is_final_validation:
                step = last_step
            last_step = max(last_step, step)
            for name, value in row.items():
                if value in ("", None) or not (name in METRIC_COLUMNS or name.endswith("_per_sec")):
                    continue
                metrics.series.setdefault(name, []).append((step, float(value)))
            if is_final_validation:
                metrics.final["val_loss"] = float(row["val_loss"])
                metrics.final["val_ppl"] = float(row["val_ppl"])
    for name in ("loss", "learning_rate", "tokens", "total_tokens"):
        if metrics.series.get(name):
            metrics.final.setdefault(name, metrics.series[name][-1][1])
    metrics.final["iterations"] = float(last_step)
    return metrics


def find_metrics_csv(out_dir: Path) -> Path:
    candidates = sorted((out_dir / "logs" / "csv").glob("version_*/metrics.csv"))
    if not candidates:
        raise LitGPTError(f"LitGPT wrote no metrics.csv under {str(out_dir / 'logs' / 'csv')!r}")
    return candidates[-1]


def evaluation_points(metrics: TrainingMetrics, iterations_per_epoch: int) -> list[EvalPoint]:
    """LitGPT's validations as the workshop's evaluation points, for the same loss plot as our own training.

    Training loss, learning rate and tokens are taken at the validation's iteration (LitGPT logs them every
    ``log_interval`` iterations); ``step`` is the iteration. A final validation at the same iteration as the
    last periodic one replaces it.
    """

    def at(name: str, step: int, default: float = math.nan) -> float:
        earlier = [value for s, value in metrics.series.get(name, []) if s <= step]
        return earlier[-1] if earlier else default

    points = {
        step: EvalPoint(
            step=step,
            epoch=step / max(1, iterations_per_epoch),
            tokens_seen=int(at("tokens", step, default=0)),
            train_loss=at("loss", step),
            val_loss=val_loss,
            lr=at("learning_rate", step),
        )
        for step, val_loss in metrics.series.get("val_loss", [])
    }
    return list(points.values())


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
        raise ValueError("LitGPT finetuning needs validation entries: set a val_fraction above 0")

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
        with _progress_forwarder(on_line, on_progress, expected_steps(len(fit), config)) as forward:
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
