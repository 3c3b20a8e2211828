"""The workshop's loss plot: train and validation loss against epochs, with tokens seen on a second axis."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from groundup.files import atomic_path
from groundup.train.state import EvalPoint


def loss_figure(points: Sequence[EvalPoint]) -> Figure:
    """The figure of ``plot_losses`` from the workshop, drawn from the recorded evaluation points.

    Built on a bare ``Figure`` (no pyplot): no global state, safe in Prefect's worker threads.
    """
    epochs = [p.epoch for p in points]
    fig = Figure(figsize=(5, 3))
    ax1 = fig.add_subplot()
    ax1.plot(epochs, [p.train_loss for p in points], label="Training loss")
    ax1.plot(epochs, [p.val_loss for p in points], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same curves against tokens seen, drawn invisibly to scale the top axis
    ax2.plot([p.tokens_seen for p in points], [p.train_loss for p in points], alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    return fig


def save_loss_plot(points: Sequence[EvalPoint], path: str | Path) -> Path:
    """Write the loss plot as a PNG (atomically)."""
    if not points:
        raise ValueError("no evaluation points to plot")
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        loss_figure(points).savefig(tmp, format="png", dpi=120)
    return path
