"""Sliding windows and DataLoaders over the Parquet token store, checked against the workshop's figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groundup.text.store import read_tokens, write_tokens
from groundup.text.windows import GPTWindowDataset, WindowError, create_dataloaders

WORKSHOP_INPUTS = [[40, 367, 2885, 1464], [1807, 3619, 402, 271], [10899, 2138, 257, 7026], [15632, 438, 2016, 257],
                   [922, 5891, 1576, 438], [568, 340, 373, 645], [1049, 5975, 284, 502], [284, 3285, 326, 11]]  # fmt: skip
WORKSHOP_TARGETS = [[367, 2885, 1464, 1807], [3619, 402, 271, 10899], [2138, 257, 7026, 15632], [438, 2016, 257, 922],
                    [5891, 1576, 438, 568], [340, 373, 645, 1049], [5975, 284, 502, 284], [3285, 326, 11, 287]]  # fmt: skip


@pytest.fixture(scope="module")
def verdict_tokens(verdict_path, tmp_path_factory, gpt2_vocab_dir):
    return write_tokens(verdict_path, tmp_path_factory.mktemp("tokens") / "verdict.parquet", "gpt2", vocab_dir=gpt2_vocab_dir)


def batches(loader) -> list[tuple[list, list]]:
    return [(x.tolist(), y.tolist()) for x, y in loader]


def test_workshop_first_batch(verdict_tokens):
    tokens = read_tokens(verdict_tokens)
    loader = torch.utils.data.DataLoader(GPTWindowDataset(tokens, max_length=4, stride=4), batch_size=8)

    inputs, targets = next(iter(loader))

    assert len(tokens) == 5145
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.tolist() == WORKSHOP_INPUTS
    assert targets.tolist() == WORKSHOP_TARGETS


def test_workshop_first_batch_through_the_train_loader(verdict_tokens):
    train, _ = create_dataloaders(verdict_tokens, max_length=4, stride=4, batch_size=8, shuffle=False)

    inputs, targets = next(iter(train))

    assert (inputs.tolist(), targets.tolist()) == (WORKSHOP_INPUTS, WORKSHOP_TARGETS)


def test_workshop_pretraining_loaders(verdict_tokens):
    train, val = create_dataloaders(verdict_tokens, max_length=256, stride=256, batch_size=2)

    train_batches, val_batches = list(train), list(val)

    assert len(train) == len(train_batches) == 9
    assert len(val) == len(val_batches) == 1
    assert all(x.shape == y.shape == (2, 256) for x, y in train_batches + val_batches)
    assert sum(x.numel() for x, _ in train_batches) == 4608
    assert sum(x.numel() for x, _ in val_batches) == 512


def test_windows_are_slices_with_targets_shifted_by_one():
    tokens = np.arange(1000, 1050, dtype=np.uint16)
    dataset = GPTWindowDataset(tokens, max_length=6, stride=3)

    assert len(dataset) == len(range(0, 50 - 6, 3)) == 15
    for index in range(len(dataset)):
        x, y = dataset[index]
        start = 3 * index
        assert x.tolist() == list(range(1000 + start, 1006 + start))
        assert y.tolist() == list(range(1001 + start, 1007 + start))


@pytest.mark.parametrize("tokens", [torch.arange(20), list(range(20))], ids=["tensor", "list"])
def test_other_token_containers(tokens):
    dataset = GPTWindowDataset(tokens, max_length=5, stride=5)
    x, y = dataset[2]

    assert len(dataset) == 3  # starts 0, 5, 10: a window at 15 would need token 20
    assert (x.tolist(), y.tolist()) == ([10, 11, 12, 13, 14], [11, 12, 13, 14, 15])


def test_shuffling_is_seeded_and_only_for_training(verdict_tokens):
    def loaders(seed):
        return create_dataloaders(verdict_tokens, max_length=32, stride=32, batch_size=4, seed=seed)

    (train_a, val_a), (train_b, val_b), (train_c, _) = loaders(123), loaders(123), loaders(7)
    sequential, _ = create_dataloaders(verdict_tokens, max_length=32, stride=32, batch_size=4, shuffle=False)

    assert batches(train_a) == batches(train_b)
    assert batches(train_a) != batches(train_c)
    assert batches(train_a) != batches(sequential)
    flat = sorted(tuple(row) for x, _ in batches(train_a) for row in x)
    assert flat == sorted(tuple(row) for x, _ in batches(sequential) for row in x)  # same windows, new order
    assert batches(val_a) == batches(val_b)
    first_val = val_a.dataset[0][0].tolist()
    assert batches(val_a)[0][0][0] == first_val


def test_validation_keeps_its_last_short_batch(verdict_tokens):
    train, val = create_dataloaders(verdict_tokens, max_length=32, stride=32, batch_size=4)

    val_windows = len(range(0, 515 - 32, 32))
    assert len(val.dataset) == val_windows == 16
    train_windows = len(range(0, 4630 - 32, 32))
    assert len(train) == train_windows // 4  # drop_last
    sizes = [x.shape[0] for x, _ in create_dataloaders(verdict_tokens, max_length=32, stride=48, batch_size=4)[1]]
    assert len(range(0, 515 - 32, 48)) == 11
    assert sizes == [4, 4, 3]


def test_workers_give_the_same_batches(verdict_tokens):
    plain, _ = create_dataloaders(verdict_tokens, max_length=64, stride=64, batch_size=4, shuffle=False)
    parallel, _ = create_dataloaders(verdict_tokens, max_length=64, stride=64, batch_size=4, shuffle=False, num_workers=2)

    assert batches(plain) == batches(parallel)


def test_a_split_shorter_than_one_window_is_an_error(verdict_tokens):
    with pytest.raises(WindowError, match=r"verdict.parquet: the validation split has 515 tokens, too few for one window of max_length 1024"):
        create_dataloaders(verdict_tokens, max_length=1024, stride=1024, batch_size=2)
    with pytest.raises(WindowError, match=r"the training split has 51 tokens"):
        create_dataloaders(verdict_tokens, max_length=256, stride=256, batch_size=2, train_ratio=0.01)


def test_a_training_split_without_a_full_batch_is_an_error(verdict_tokens):
    with pytest.raises(WindowError, match=r"training split has 18 windows, fewer than one batch of 32"):
        create_dataloaders(verdict_tokens, max_length=256, stride=256, batch_size=32)

    train, _ = create_dataloaders(verdict_tokens, max_length=256, stride=256, batch_size=32, drop_last=False)
    assert len(train) == 1


@pytest.mark.parametrize(("max_length", "stride"), [(0, 4), (4, 0)])
def test_window_settings_must_be_positive(max_length, stride):
    with pytest.raises(WindowError, match="must be positive"):
        GPTWindowDataset(np.arange(10), max_length, stride)
