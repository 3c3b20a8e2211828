"""Decoding constrained to whole numbers: a local judge that always answers with a score.

Asked for "the integer number only", a small model often writes something else (it continues the answer,
or explains). Here the judge may only pick tokens that spell one of the numbers 0-100 *in its own
tokenization* (SmolLM2 and Llama 3 split numbers differently), and may only stop once it has spelled a
whole number. Each step takes the most probable allowed token, stopping (the probability of the chat
template's stop tokens) counting as one choice once the prefix is a complete number: greedy decoding,
restricted. Every reply is therefore a number in range, and the model's own preference decides which one.

Numbers are tokenized as continuations of the prompt (``encode(prompt + "85")`` minus ``encode(prompt)``),
so a tokenizer that merges across the boundary still gets its own spelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from groundup.instruct.judge_probabilities import SCORES


@dataclass(frozen=True)
class NumberChoice:
    value: int
    probability: float  # the product of the chosen steps' probabilities among the allowed options


def number_spellings(encode, prompt: str, numbers: Sequence[int] = SCORES) -> dict[tuple[int, ...], int]:
    """Token ids of each number as it would follow ``prompt``; distinct spellings map to their number."""
    prompt_ids = encode(prompt)
    spellings: dict[tuple[int, ...], int] = {}
    for number in numbers:
        ids = encode(prompt + str(number))
        if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
            ids = prompt_ids + encode(str(number))  # merged across the boundary: spell it on its own
        spellings[tuple(ids[len(prompt_ids) :])] = number
    return spellings


def step_options(
    spellings: dict[tuple[int, ...], int],
    prefix: tuple[int, ...],
    log_probs: torch.Tensor,
    stops: torch.Tensor,
) -> dict[int | None, float]:
    """The allowed next steps after ``prefix`` with their log-probabilities: each token that continues a
    number's spelling, and ``None`` (stop: the template's stop tokens together) once ``prefix`` is one."""
    options: dict[int | None, float] = {
        spelling[len(prefix)]: float(log_probs[spelling[len(prefix)]])
        for spelling in spellings
        if len(spelling) > len(prefix) and spelling[: len(prefix)] == prefix
    }
    if prefix in spellings:
        options[None] = float(torch.logsumexp(log_probs[stops], dim=0))
    return options


def choose_number(
    model, prompt: str, stop_ids: Sequence[int], numbers: Sequence[int] = SCORES
) -> NumberChoice:
    """The number ``model`` (a ``LitGPTModel``) writes after ``prompt`` when it may write nothing else.

    ``stop_ids``: the tokens that end a reply (end-of-text, the template's end-of-turn); at least one."""
    spellings = number_spellings(model.encode, prompt, numbers)
    gpt = model.llm.model
    idx = torch.tensor([model.encode(prompt)], dtype=torch.long, device=model.device)
    idx, _ = model._fit(idx, max(len(s) for s in spellings) + 1)
    length = idx.shape[1]
    stops = torch.tensor(sorted(set(stop_ids)), device=model.device)
    prefix: tuple[int, ...] = ()
    probability = 1.0
    gpt.set_kv_cache(
        batch_size=1, max_seq_length=length + max(len(s) for s in spellings), device=model.device
    )
    try:
        with torch.inference_mode():
            logits = gpt(idx, input_pos=torch.arange(length, device=model.device))[0, -1]
            while True:
                options = step_options(spellings, prefix, torch.log_softmax(logits.float(), dim=-1), stops)
                choice = max(options, key=options.__getitem__)
                total = torch.logsumexp(torch.tensor(list(options.values())), dim=0)
                probability *= float(torch.exp(options[choice] - total))
                if choice is None:
                    return NumberChoice(spellings[prefix], probability)
                prefix += (choice,)
                position = torch.tensor([length + len(prefix) - 1], device=model.device)
                logits = gpt(torch.tensor([[choice]], device=model.device), input_pos=position)[0, -1]
    finally:
        gpt.clear_kv_cache()
