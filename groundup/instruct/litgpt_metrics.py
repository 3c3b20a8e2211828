"""LitGPT's training metrics, read back from the CSV log it writes (``logs/csv/version_0/metrics.csv``):
the series for MLflow, the final values, and the evaluation points for the loss plot."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from groundup.instruct.litgpt_process import LitGPTError
from groundup.train.state import EvalPoint

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
