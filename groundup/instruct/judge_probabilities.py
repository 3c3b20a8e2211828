"""Scores from the probabilities a judge gives the numbers 0-100, rather than from the one number it writes.

A judge asked for "the integer number only" spreads its belief over several numbers. Greedy decoding keeps
only the most probable one, so a small judge that slightly prefers 100 answers 100 to everything (every
pair of controls ties); the expected score ``Σ p(n)·n`` over the numbers' renormalized probabilities keeps
how sure it is, and ranks answers the greedy number cannot tell apart.

- :func:`litgpt_number_probabilities`: a local LitGPT judge, exactly: one forward pass over the prompt
  (the chat template's assistant prefix included), then one batched pass over every number's spelling in
  the judge's own tokenization (1-3 tokens each: :func:`groundup.instruct.constrained.number_spellings`),
  which chains the probabilities of multi-token numbers and the probability that the reply ends there
  (the template's stop tokens): the probability that the number is the whole reply, as the prompt asks
  (``1`` is then neither the start of ``10`` nor of a list ``1. First, ...``), the same end rule as
  constrained decoding's.
- :func:`logprob_number_probabilities`: an OpenAI-compatible server's ``top_logprobs`` at the token where
  the reply writes its score (the reply's first token, or the value of ``{"score": ...}``), when that
  token is the whole number (OpenAI's and Llama 3's tokenizers spell 0-999 as one token); otherwise None
  and the reply's text is parsed.

Either way :class:`NumberProbabilities` reports the expected score, the most probable number, the number
the judge writes (for LitGPT: constrained decoding's, from the same passes, so both scorings of one run
can be compared) and the probability mass the judge put on replying with a whole number 0-100 at all (a
sanity figure: low mass means the judge mostly wanted to write something else, and the score stands for
little of what it says; from a server, the mass among its top alternatives, a lower bound).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

SCORES = range(0, 101)  # the scale a judge scores on
# Spellings scored per batched pass: bounds the copies of the prompt's KV cache (Llama 3 8B, a 600-token
# prompt: 32 rows take 2.5 GB in bf16; all 101 single-token numbers at once would take 8 GB).
ROWS_PER_PASS = 32


@dataclass(frozen=True)
class NumberProbabilities:
    expected: float  # Σ p(n)·n, p renormalized over the numbers 0-100
    argmax: int  # the most probable number
    mass: float  # the probability of replying with a whole number 0-100 at all, before renormalizing
    written: int  # what the judge writes: constrained decoding's number (LitGPT), the score token (server)

    @classmethod
    def from_probabilities(
        cls, probabilities: Mapping[int, float], written: int
    ) -> NumberProbabilities | None:
        """From each number's probability (any subset of 0-100); None when they sum to nothing."""
        mass = sum(probabilities.values())
        if not mass > 0.0:
            return None
        expected = sum(n * p for n, p in probabilities.items()) / mass
        return cls(float(expected), max(probabilities, key=probabilities.__getitem__), float(mass), written)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# A local LitGPT judge: the exact probability of every number
# ---------------------------------------------------------------------------------------------------------


def litgpt_number_probabilities(
    model, prompt: str, stop_ids: Sequence[int], numbers: Sequence[int] = SCORES
) -> NumberProbabilities:
    """The probability ``model`` (a ``LitGPTModel``) gives each number as its whole reply after ``prompt``.

    ``stop_ids``: the tokens that end a reply (end-of-text, the template's end-of-turn). The prompt is run
    once; every spelling is then one row of batched passes on copies of the prompt's KV cache, padded to
    the longest spelling (causal attention: padding after a row's spelling changes nothing before it),
    at most :data:`ROWS_PER_PASS` rows at a time.
    """
    import torch  # here, not above: the HTTP judge does not need it

    from groundup.instruct.constrained import number_spellings, step_options

    spellings = number_spellings(model.encode, prompt, numbers)
    depth = max(len(s) for s in spellings)
    # The rows: the spellings no other spelling extends; their prefixes are all the others ("1" of "100").
    rows = [s for s in spellings if not any(len(t) > len(s) and t[: len(s)] == s for t in spellings)]
    idx = torch.tensor([model.encode(prompt)], dtype=torch.long, device=model.device)
    idx, _ = model._fit(idx, depth + 1)
    length = idx.shape[1]
    stops = torch.tensor(sorted(set(stop_ids)), device=model.device)
    gpt = model.llm.model
    width = min(len(rows), ROWS_PER_PASS)
    gpt.set_kv_cache(batch_size=width, max_seq_length=length + depth, device=model.device)
    try:
        with torch.inference_mode():
            first = torch.log_softmax(
                gpt(idx, input_pos=torch.arange(length, device=model.device))[0, -1].float(), -1
            )
            for block in gpt.transformer.h:  # every row continues the same prompt
                cache = block.attn.kv_cache
                cache.k[1:] = cache.k[:1]
                cache.v[1:] = cache.v[:1]
            batch = torch.tensor([row + row[-1:] * (depth - len(row)) for row in rows], device=model.device)
            positions = torch.arange(length, length + depth, device=model.device)
            # Each pass writes only the positions after the prompt, which the next one overwrites.
            later = torch.cat(
                [
                    torch.log_softmax(gpt(chunk, input_pos=positions).float(), dim=-1)
                    for chunk in batch.split(width)
                ]
            )  # (rows, depth, vocab)
    finally:
        gpt.clear_kv_cache()

    def after(prefix: tuple[int, ...]) -> torch.Tensor:
        """Log-probabilities of the token after ``prompt`` + ``prefix``."""
        if not prefix:
            return first
        row = next(i for i, r in enumerate(rows) if r[: len(prefix)] == prefix)
        return later[row, len(prefix) - 1]

    probabilities: dict[int, float] = {}
    for spelling, number in spellings.items():
        log_p = sum(float(after(spelling[:i])[token]) for i, token in enumerate(spelling))
        ends = float(torch.logsumexp(after(spelling)[stops], dim=0))
        probabilities[number] = math.exp(log_p + ends)
    prefix: tuple[int, ...] = ()  # constrained decoding's walk (choose_number's), on the same passes
    while True:
        options = step_options(spellings, prefix, after(prefix), stops)
        step = max(options, key=options.__getitem__)
        if step is None:
            break
        prefix += (step,)
    result = NumberProbabilities.from_probabilities(probabilities, written=spellings[prefix])
    assert result is not None, "a softmax gives every number some probability"
    return result


# ---------------------------------------------------------------------------------------------------------
# An OpenAI-compatible server: the top logprobs where the reply writes its score
# ---------------------------------------------------------------------------------------------------------

# What may come before the score token: nothing, or the start of a JSON-schema-forced {"score": ...}.
_BEFORE_SCORE = re.compile(r'\s*(\{\s*"score"\s*:\s*)?')
_WHOLE_NUMBER = re.compile(r"\s*(100|[1-9]?[0-9])\s*")


def _number(text: str) -> int | None:
    match = _WHOLE_NUMBER.fullmatch(text)
    return int(match.group(1)) if match else None


def logprob_number_probabilities(tokens: Sequence[Mapping[str, Any]] | None) -> NumberProbabilities | None:
    """The expected score from a chat completion's ``choices[0].logprobs.content`` (``token``, ``logprob``,
    ``top_logprobs`` per generated token), or None when they cannot give it: no logprobs, the reply does
    not start with its score (or ``{"score":``), or the score is split over several tokens."""
    written = ""
    for position, entry in enumerate(tokens or []):
        token = entry.get("token", "")
        if not any(c.isdigit() for c in token):
            written += token
            continue
        number = _number(token)
        following = tokens[position + 1].get("token", "") if position + 1 < len(tokens) else ""
        if number is None or following[:1].isdigit() or not _BEFORE_SCORE.fullmatch(written):
            return None  # the first number is not the reply's whole score token
        alternatives = list(entry.get("top_logprobs") or []) or [entry]
        probabilities: dict[int, float] = {}
        for alternative in alternatives:
            value = _number(alternative.get("token", ""))
            if value is not None and alternative.get("logprob") is not None:
                probabilities[value] = probabilities.get(value, 0.0) + math.exp(alternative["logprob"])
        return NumberProbabilities.from_probabilities(probabilities, written=number)
    return None
