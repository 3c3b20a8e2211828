"""Sliding windows over token ids for next-token prediction, and the train/validation DataLoaders.

The corpus is split on tokens (the first ``train_ratio`` of the ids train, the rest validate), and
windows start at ``range(0, len(tokens) - max_length, stride)`` as in the workshop, each target being its
input shifted by one token. Tokens stay in the store's compact dtype; a window becomes int64 only when it
is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from groundup.errors import InputDataError
from groundup.text.store import read_tokens


class WindowError(InputDataError):
    """Settings that leave a split without a single window or batch; the message says which and why."""


class GPTWindowDataset(Dataset):
    """``(input, target)`` pairs of ``max_length`` token ids, ``stride`` apart; target = input shifted by one."""

    def __init__(self, tokens: np.ndarray | torch.Tensor | Sequence[int], max_length: int, stride: int) -> None:
        if max_length < 1 or stride < 1:
            raise WindowError(f"max_length ({max_length}) and stride ({stride}) must be positive")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        self.tokens = np.asarray(tokens)
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, len(self.tokens) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        window = torch.from_numpy(self.tokens[start : start + self.max_length + 1].astype(np.int64))
        return window[:-1], window[1:]


def split_tokens(tokens: np.ndarray, train_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < train_ratio < 1.0:
        raise WindowError(f"train_ratio must be between 0 and 1, got {train_ratio}")
    split = int(train_ratio * len(tokens))
    return tokens[:split], tokens[split:]


def _check_split(name: str, tokens: np.ndarray, max_length: int, source: str) -> None:
    if len(tokens) <= max_length:
        raise WindowError(
            f"{source}: the {name} split has {len(tokens)} tokens, too few for one window of max_length "
            f"{max_length} (needs {max_length + 1}); use more text, a smaller max_length or another train_ratio"
        )


def create_dataloaders(
    parquet_path: str | Path,
    *,
    max_length: int,
    stride: int,
    batch_size: int,
    train_ratio: float = 0.9,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 123,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over a token store.

    The train loader shuffles (if ``shuffle``) with its own generator seeded by ``seed``, so the order is
    reproducible without touching the global RNG, and drops a last short batch (if ``drop_last``); the
    validation loader keeps the corpus order and every window.
    """
    source = str(parquet_path)
    train_tokens, val_tokens = split_tokens(read_tokens(parquet_path), train_ratio)
    _check_split("training", train_tokens, max_length, source)
    _check_split("validation", val_tokens, max_length, source)
    train = GPTWindowDataset(train_tokens, max_length, stride)
    if drop_last and len(train) < batch_size:
        raise WindowError(
            f"{source}: the training split has {len(train)} windows, fewer than one batch of {batch_size} "
            "(drop_last would leave no batch); use more text or a smaller batch_size, max_length or stride"
        )
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, generator=generator
    )
    val_loader = DataLoader(
        GPTWindowDataset(val_tokens, max_length, stride),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
    )
    return train_loader, val_loader
