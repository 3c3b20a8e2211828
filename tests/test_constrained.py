"""Decoding constrained to the numbers 0-100, on a tiny real LitGPT checkpoint (random weights)."""

from __future__ import annotations

import pytest
import torch

from groundup.instruct import judge
from groundup.instruct.constrained import choose_number, number_spellings
from groundup.instruct.inference import LitGPTModel


@pytest.fixture(scope="module")
def tiny(tiny_litgpt_dir) -> LitGPTModel:
    return LitGPTModel(tiny_litgpt_dir, accelerator="cpu")


def test_every_number_has_its_own_spelling_in_the_models_tokenization(tiny):
    spellings = number_spellings(tiny.encode, "Score: ")
    assert sorted(spellings.values()) == list(range(101))
    for ids, number in spellings.items():
        assert tiny.decode(list(ids)) == str(number)


def full_forward_choice(model: LitGPTModel, prompt: str, stop_ids: list[int]) -> int:
    """The same constrained greedy rule, computed the slow way: one uncached forward pass per step."""
    spellings = number_spellings(model.encode, prompt)
    prefix: tuple[int, ...] = ()
    base = model.encode(prompt)
    while True:
        logits = model.logits(torch.tensor([base + list(prefix)]))[0, -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        options = {
            s[len(prefix)]: float(log_probs[s[len(prefix)]])
            for s in spellings
            if len(s) > len(prefix) and s[: len(prefix)] == prefix
        }
        if prefix in spellings:
            options[None] = float(torch.logsumexp(log_probs[stop_ids], dim=0))
        best = max(options, key=options.__getitem__)
        if best is None:
            return spellings[prefix]
        prefix += (best,)


@pytest.mark.parametrize(
    "prompt", ["Score the answer from 0 to 100: ", "I had always thought Jack Gisburn", "x"]
)
def test_the_cached_decoding_picks_what_full_forward_passes_pick(tiny, prompt):
    stop_ids = [tiny.eos_id]
    choice = choose_number(tiny, prompt, stop_ids)
    assert 0 <= choice.value <= 100 and 0.0 < choice.probability <= 1.0
    assert choice.value == full_forward_choice(tiny, prompt, stop_ids)


def test_a_constrained_litgpt_judge_always_answers_with_a_number(tiny_litgpt_dir):
    constrained = judge.LitGPTJudge(str(tiny_litgpt_dir), max_new_tokens=6, accelerator="cpu")
    free = judge.LitGPTJudge(str(tiny_litgpt_dir), max_new_tokens=6, accelerator="cpu", constrained=False)
    assert constrained.settings["decoding"] == "numbers 0-100" and "max_new_tokens" in free.settings
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    prompts = [judge.judge_prompt(entry, answer) for answer in ("Blue.", "Seven.", "")]
    free_replies = [free.reply(p) for p in prompts]
    assert not any(judge.parse_score(r).parsed for r in free_replies), free_replies  # random weights
    assert all(judge.parse_score(constrained.reply(p)).parsed for p in prompts)
