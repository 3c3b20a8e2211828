"""The promotion rule as a pure function: comparable scores, the champion's record, the judge's controls."""

from __future__ import annotations

import pytest

from groundup.config import PipelineConfig, load_config
from groundup.instruct.judge_scores import summarize
from groundup.instruct.promotion import Champion, decide, judge_refusal, score_basis


def test_scores_are_comparable_only_on_the_same_basis():
    config = load_config(PipelineConfig, "quickstart")
    judge, generation = config.judge, config.generation
    same = score_basis(judge, generation, "judge-x", "abc")
    assert score_basis(judge.model_copy(update={"retries": 9}), generation, "judge-x", "abc") == same
    assert score_basis(judge, generation, "judge-y", "abc") != same
    assert score_basis(judge, generation, "judge-x", "abd") != same
    assert score_basis(judge, generation.model_copy(update={"max_new_tokens": 7}), "judge-x", "abc") != same
    # another scoring mode scores differently: another basis
    assert score_basis(judge.model_copy(update={"scoring": "free"}), generation, "judge-x", "abc") != same


@pytest.mark.parametrize(
    ("score", "champion", "promoted", "reason"),
    [
        (70.0, None, True, "no champion yet"),
        (None, None, False, "not judged"),
        (70.0, Champion("m/1", 60.0, "b"), True, "70 beats the champion's 60"),
        (50.0, Champion("m/1", 60.0, "b"), False, "50 does not beat the champion's 60"),
        (
            70.0,
            Champion("m/1", 60.0, "other"),
            False,
            "champion m/1 was scored on another basis; compare by hand",
        ),
        (70.0, Champion("m/1", None, None), False, "champion m/1 has no recorded score"),
        (10.0, Champion("m/2", 90.0, "b"), True, "already the champion"),
    ],
)
def test_decide(score, champion, promoted, reason):
    decision = decide("m/2", score, "b", champion)
    assert (decision.promoted, decision.reason) == (promoted, reason)


def judged(reference: list[int] | None = None, mismatched: list[int] | None = None) -> dict:
    """A judge's summary of four entries, with controls when ``reference`` and ``mismatched`` are given."""
    scores = {"base_model": [10, 20, 30, 40], "finetuned_model": [60, 70, 80, 90]}
    if reference is not None:
        scores.update(reference_answer=reference, mismatched_answer=mismatched)
    return summarize(scores, samples=200)


def test_a_judge_that_cannot_tell_right_from_wrong_promotes_nothing():
    # references mostly scored below mismatched answers: AUC 3/16 (ties count half) < 0.8
    refusal = judge_refusal(judged([50, 40, 60, 50], [60, 50, 70, 60]))
    assert refusal and "cannot tell right from wrong" in refusal and "0.19 < 0.80" in refusal
    decision = decide("m/2", 75.0, "b", None, refusal=refusal)
    assert not decision.promoted and decision.reason == refusal

    sighted = judged([90, 80, 95, 85], [10, 20, 5, 15])
    assert sighted["control"]["auc"] == 1.0 and sighted["control"]["trusted"]
    assert judge_refusal(sighted) is None
    assert judge_refusal(judged()) is None  # no controls judged: nothing to refuse on
