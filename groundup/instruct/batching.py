"""Instruction examples as training batches for our GPT (LLMs-from-scratch chapter 7, section 7.3).

Each entry becomes ``prompt + response + <|endoftext|>`` token ids, the prompt formatted by
``groundup.instruct.prompts`` (Alpaca or Phi-3). A batch is padded to its longest entry with the
end-of-text id; inputs are the sequence without its last token, targets the sequence shifted by one. Target
positions past an entry's own end-of-text token are ``-100`` so the loss ignores the padding, while that
first end-of-text token stays a target: it is how the model learns to stop. With ``mask_prompt`` the
targets inside the prompt are ``-100`` too, so only the response is learned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from groundup.instruct.prompts import format_prompt
from groundup.text.tokenizers import get_tokenizer
from groundup.train.loop import IGNORE_INDEX  # the loss ignores exactly what the batches mark

END_OF_TEXT_ID = 50256


@dataclass(frozen=True)
class Example:
    """One tokenized entry: ``prompt + response + end-of-text`` ids and how many of them are the prompt."""

    token_ids: tuple[int, ...]
    prompt_length: int


class InstructionDataset(Dataset[Example]):
    """Entries (``instruction``, ``input``, ``output``) tokenized once, up front."""

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        tokenizer: tiktoken.Encoding | None = None,
        prompt_style: str = "alpaca",
    ) -> None:
        tokenizer = tokenizer or get_tokenizer("gpt2")
        self.examples = [tokenize_entry(entry, tokenizer, prompt_style) for entry in entries]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def tokenize_entry(
    entry: dict[str, Any], tokenizer: tiktoken.Encoding, prompt_style: str = "alpaca"
) -> Example:
    # Prompt and response are encoded separately so the prompt's length in tokens is exact; they meet at a
    # newline, which GPT-2's BPE never merges with the next word, so the ids equal encoding the whole text.
    # Ordinary encoding: a literal "<|endoftext|>" typed into an entry is text, not the control token.
    prompt = tokenizer.encode_ordinary(format_prompt(entry, prompt_style))
    response = tokenizer.encode_ordinary(entry["output"])
    return Example(tuple(prompt + response + [tokenizer.eot_token]), len(prompt))


def collate_instructions(
    batch: Sequence[Example],
    *,
    pad_token_id: int = END_OF_TEXT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of shape (batch, longest entry − 1), at most ``allowed_max_length`` wide."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if allowed_max_length is not None and allowed_max_length < 1:
        raise ValueError(f"allowed_max_length must be positive, got {allowed_max_length}")
    # One extra token, because inputs and targets each drop one end of the sequence.
    limit = None if allowed_max_length is None else allowed_max_length + 1
    rows = [example.token_ids[:limit] for example in batch]
    lengths = torch.tensor([len(row) for row in rows])
    if int(lengths.min()) < 2:
        raise ValueError("every example needs at least two tokens (a prompt token and end-of-text)")
    sequences = torch.full((len(rows), int(lengths.max())), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        sequences[i, : len(row)] = torch.tensor(row, dtype=torch.long)

    inputs, targets = sequences[:, :-1], sequences[:, 1:].clone()
    positions = torch.arange(targets.shape[1])
    # Target j is token j + 1: real while j + 1 < length, so the entry's own end-of-text is kept.
    targets[positions >= (lengths - 1)[:, None]] = ignore_index
    if mask_prompt:
        prompt_lengths = torch.tensor([example.prompt_length for example in batch])
        targets[positions < (prompt_lengths - 1)[:, None]] = ignore_index
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets


def instruction_loader(
    dataset: InstructionDataset,
    batch_size: int,
    *,
    shuffle: bool,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
    seed: int = 123,
    drop_last: bool = False,
) -> DataLoader:
    collate = functools.partial(
        collate_instructions, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )
