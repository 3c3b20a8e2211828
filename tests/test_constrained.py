"""A local judge that always answers with a number, on a tiny real LitGPT checkpoint (random weights):
decoding constrained to the numbers 0-100, and scoring by the probabilities of those numbers."""

from __future__ import annotations

import pytest
import torch

from groundup.instruct import judge, judge_probabilities
from groundup.instruct.constrained import choose_number, number_spellings
from groundup.instruct.inference import LitGPTModel
from groundup.instruct.judge_probabilities import litgpt_number_probabilities


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


def full_forward_probabilities(model: LitGPTModel, prompt: str, stop_ids: list[int]) -> dict[int, float]:
    """Each number's probability as the whole reply, the slow way: one uncached forward pass per prefix,
    times the probability of stopping after it."""
    base = model.encode(prompt)

    def next_token(prefix: tuple[int, ...]) -> torch.Tensor:
        return torch.softmax(model.logits(torch.tensor([base + list(prefix)]))[0, -1].float(), dim=-1)

    probabilities = {}
    for spelling, number in number_spellings(model.encode, prompt).items():
        p = 1.0
        for i, token in enumerate(spelling):
            p *= float(next_token(spelling[:i])[token])
        probabilities[number] = p * float(next_token(spelling)[stop_ids].sum())
    return probabilities


@pytest.mark.parametrize(
    ("prompt", "rows_per_pass"),
    [("Score the answer from 0 to 100: ", 32), ("I had always thought Jack Gisburn", 5)],
)
def test_probability_scoring_gives_what_full_forward_passes_give(tiny, prompt, rows_per_pass, monkeypatch):
    monkeypatch.setattr(judge_probabilities, "ROWS_PER_PASS", rows_per_pass)  # one pass, or several
    stop_ids = sorted({tiny.eos_id, 0})
    expected = full_forward_probabilities(tiny, prompt, stop_ids)
    mass = sum(expected.values())
    result = litgpt_number_probabilities(tiny, prompt, stop_ids)
    assert result.mass == pytest.approx(mass, rel=1e-4)
    assert result.expected == pytest.approx(sum(n * p for n, p in expected.items()) / mass, rel=1e-4)
    assert result.argmax == max(expected, key=expected.__getitem__)
    assert 0.0 < result.mass <= 1.0 and 0.0 <= result.expected <= 100.0
    assert result.written == choose_number(tiny, prompt, stop_ids).value  # constrained, same passes


def test_a_local_judge_always_answers_with_a_number(tiny_litgpt_dir):
    constrained = judge.LitGPTJudge(
        str(tiny_litgpt_dir), max_new_tokens=6, accelerator="cpu", scoring="constrained"
    )
    by_probability = judge.LitGPTJudge(str(tiny_litgpt_dir), max_new_tokens=6, accelerator="cpu")
    free = judge.LitGPTJudge(str(tiny_litgpt_dir), max_new_tokens=6, accelerator="cpu", scoring="free")
    assert by_probability.settings["scoring"] == "probability"  # the default
    assert constrained.settings["scoring"] == "constrained" and "max_new_tokens" in free.settings
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    prompts = [judge.judge_prompt(entry, answer) for answer in ("Blue.", "Seven.", "")]
    free_replies = [free.reply(p).text for p in prompts]
    assert not any(judge.parse_score(r).parsed for r in free_replies), free_replies  # random weights
    assert all(judge.parse_score(constrained.reply(p).text).parsed for p in prompts)
    for prompt in prompts:
        reply = by_probability.reply(prompt)
        assert reply.text == constrained.reply(prompt).text == str(reply.probabilities.written)
        assert 0.0 <= reply.probabilities.expected <= 100.0
