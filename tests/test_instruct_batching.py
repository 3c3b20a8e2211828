"""Instruction batches: padding, shifted targets, -100 masking, prompt masking, truncation, devices."""

from __future__ import annotations

import pytest
import torch

from groundup.instruct.batching import (
    END_OF_TEXT_ID,
    Example,
    InstructionDataset,
    collate_instructions,
    instruction_loader,
    tokenize_entry,
)
from groundup.instruct.data import load_entries
from groundup.instruct.prompts import format_prompt
from groundup.text.tokenizers import get_tokenizer

P, X = END_OF_TEXT_ID, -100

# The chapter-7 example: three entries of 5, 2 and 3 tokens, each followed by its end-of-text token.
BATCH = [
    Example((0, 1, 2, 3, 4, P), prompt_length=3),
    Example((5, 6, P), prompt_length=1),
    Example((7, 8, 9, P), prompt_length=2),
]


def test_padding_shift_and_ignore_index():
    inputs, targets = collate_instructions(BATCH)
    assert inputs.tolist() == [
        [0, 1, 2, 3, 4],
        [5, 6, P, P, P],
        [7, 8, 9, P, P],
    ]
    # Each entry keeps its first end-of-text target; the padding after it is ignored.
    assert targets.tolist() == [
        [1, 2, 3, 4, P],
        [6, P, X, X, X],
        [8, 9, P, X, X],
    ]
    assert inputs.dtype == targets.dtype == torch.long


def test_mask_prompt_ignores_the_prompt_targets():
    _, targets = collate_instructions(BATCH, mask_prompt=True)
    # Prompt of 3 tokens: targets 1 and 2 are prompt tokens; 3 (the first response token) is learned.
    assert targets.tolist() == [
        [X, X, 3, 4, P],
        [6, P, X, X, X],
        [X, 9, P, X, X],
    ]


def test_allowed_max_length_truncates():
    inputs, targets = collate_instructions(BATCH, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, P], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, P, X], [8, 9, P]]


def test_a_batch_of_equal_lengths_has_no_padding():
    inputs, targets = collate_instructions([Example((1, 2, P), 1), Example((3, 4, P), 1)])
    assert inputs.tolist() == [[1, 2], [3, 4]] and targets.tolist() == [[2, P], [4, P]]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
        ),
    ],
)
def test_batches_land_on_the_requested_device(device):
    inputs, targets = collate_instructions(BATCH, device=device)
    assert inputs.device.type == targets.device.type == device


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="empty batch"):
        collate_instructions([])
    with pytest.raises(ValueError, match="allowed_max_length"):
        collate_instructions(BATCH, allowed_max_length=0)


def test_entries_tokenize_as_prompt_response_end_of_text(instruction_data_path):
    entries = load_entries(instruction_data_path)
    tokenizer = get_tokenizer("gpt2")
    for style in ("alpaca", "phi-3"):
        for entry in entries:
            example = tokenize_entry(entry, tokenizer, style)
            prompt = format_prompt(entry, style)
            # Encoding prompt and response apart gives exactly the ids of the whole text.
            assert list(example.token_ids) == tokenizer.encode_ordinary(prompt + entry["output"]) + [P]
            assert tokenizer.decode(list(example.token_ids[: example.prompt_length])) == prompt


def test_loader_over_the_instruction_data(instruction_data_path):
    dataset = InstructionDataset(load_entries(instruction_data_path)[:24], get_tokenizer("gpt2"))
    loader = instruction_loader(dataset, batch_size=8, shuffle=True, allowed_max_length=64, mask_prompt=True)
    batches = list(loader)
    assert len(batches) == 3
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.shape[0] == 8 and inputs.shape[1] <= 64
        # Every target is a real token or ignored; the prompt is masked so every row starts ignored.
        assert ((targets == X) | ((targets >= 0) & (targets < 50257))).all()
        assert (targets[:, 0] == X).all()
    # The same seed gives the same order.
    again = list(
        instruction_loader(dataset, batch_size=8, shuffle=True, allowed_max_length=64, mask_prompt=True)
    )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
