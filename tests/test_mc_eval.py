"""Multiple-choice evaluation through lm-eval on a local task definition (offline), with real tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs lm-eval (the 'eval' extra)")

from groundup.instruct import mc_eval  # noqa: E402
from groundup.instruct.inference import CausalLM, load_causal_lm  # noqa: E402
from tests.eval_fixtures import (  # noqa: E402
    MC_CHOICES,
    MC_QUESTIONS,
    MC_TASK,
    mc_doc_to_text,
    save_tiny_gpt,
    write_mc_task,
)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_mc_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory, gpt2_vocab_dir) -> Path:
    return save_tiny_gpt(tmp_path_factory.mktemp("gpt") / "base", context_length=64)


def continuation_logprob(model: CausalLM, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unbatched forward pass (lm-eval's causal tokenization)."""
    whole = model.encode(context + continuation)
    n_context = len(model.encode(context))
    ids = torch.tensor([whole[:-1]])
    log_probs = torch.log_softmax(model.logits(ids).float(), dim=-1)[0]
    targets = whole[n_context:]
    return sum(log_probs[n_context - 1 + i, t].item() for i, t in enumerate(targets))


def expected_accuracy(model: CausalLM) -> float:
    correct = 0
    for question, choices, answer in MC_QUESTIONS:
        scores = [continuation_logprob(model, mc_doc_to_text(question, choices), f" {c}") for c in MC_CHOICES]
        correct += int(max(range(4), key=scores.__getitem__) == answer)
    return correct / len(MC_QUESTIONS)


def test_litgpt_checkpoint_on_a_local_task(tiny_litgpt_dir, task_dir):
    result = mc_eval.evaluate_mc(
        str(tiny_litgpt_dir), [MC_TASK], include_path=str(task_dir), accelerator="cpu"
    )
    assert result.samples == {MC_TASK: len(MC_QUESTIONS)}
    assert set(result.metrics[MC_TASK]) == {"acc", "acc_stderr"}
    model = load_causal_lm(tiny_litgpt_dir, accelerator="cpu")
    assert result.metrics[MC_TASK]["acc"] == pytest.approx(expected_accuracy(model))
    assert result.flat_metrics() == {
        f"mc.{MC_TASK}.acc": result.metrics[MC_TASK]["acc"],
        f"mc.{MC_TASK}.acc_stderr": result.metrics[MC_TASK]["acc_stderr"],
    }


def test_groundup_checkpoint_and_limit(tiny_gpt, task_dir):
    result = mc_eval.evaluate_mc(
        str(tiny_gpt), [MC_TASK], include_path=str(task_dir), limit=4, batch_size=3, accelerator="cpu"
    )
    assert result.samples == {MC_TASK: 4}
    assert 0.0 <= result.metrics[MC_TASK]["acc"] <= 1.0


def test_batched_padded_scoring_equals_one_by_one(tiny_gpt):
    from groundup.instruct.lm_eval_model import CausalLMAdapter

    model = load_causal_lm(tiny_gpt, accelerator="cpu")
    pairs = [(mc_doc_to_text(q, c), f" {letter}") for q, c, _ in MC_QUESTIONS for letter in MC_CHOICES[:2]]
    pairs.append(("word " * 100, " end"))  # longer than the 64-token window: cut from the left
    requests = [(pair, *CausalLMAdapter(model)._encode_pair(*pair)) for pair in pairs]
    batched = CausalLMAdapter(model, batch_size=5)._loglikelihood_tokens(requests, disable_tqdm=True)
    single = CausalLMAdapter(model, batch_size=1)._loglikelihood_tokens(requests, disable_tqdm=True)
    for (b, b_greedy), (s, s_greedy) in zip(batched, single, strict=True):
        assert b == pytest.approx(s, abs=1e-4) and b_greedy == s_greedy
    for (context, continuation), (score, _) in zip(pairs[:-1], single[:-1], strict=True):
        assert score == pytest.approx(continuation_logprob(model, context, continuation), abs=1e-4)


@pytest.mark.slow  # indexing lm-eval's built-in tasks (to know a task is in neither place) takes ~25 s
def test_unknown_task_is_a_clear_error(task_dir, tiny_gpt):
    with pytest.raises(mc_eval.MCEvalError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        mc_eval.evaluate_mc(str(tiny_gpt), ["no_such_task"], include_path=str(task_dir))


def test_missing_lm_eval_is_a_clear_error(task_dir, tiny_gpt, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    with pytest.raises(mc_eval.MCEvalError, match=r"pip install 'groundup\[eval\]'"):
        mc_eval.evaluate_mc(str(tiny_gpt), [MC_TASK], include_path=str(task_dir))


def test_rolling_loglikelihood_and_generation_requests(tiny_gpt):
    from lm_eval.api.instance import Instance

    from groundup.instruct.inference import Sampling
    from groundup.instruct.lm_eval_model import CausalLMAdapter

    model = load_causal_lm(tiny_gpt, accelerator="cpu")
    adapter = CausalLMAdapter(model, batch_size=2)
    text = "Plato wrote dialogues about justice."
    rolling = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    ids = [model.eos_id, *model.encode(text)]  # the whole text, predicted from end-of-text onwards
    log_probs = torch.log_softmax(model.logits(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    expected = sum(log_probs[i, t].item() for i, t in enumerate(ids[1:]))
    assert adapter.loglikelihood_rolling([rolling], disable_tqdm=True)[0] == pytest.approx(expected, abs=1e-4)

    context = "Question: who taught Plato?\nAnswer:"
    request = Instance(
        request_type="generate_until", doc={}, arguments=(context, {"until": ["."], "max_gen_toks": 8}), idx=0
    )
    full = model.complete([context], Sampling(max_new_tokens=8))[0]
    assert adapter.generate_until([request], disable_tqdm=True) == [full.split(".")[0]]
