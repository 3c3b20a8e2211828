"""The promotion rule: when a judged model version becomes the champion (pure; the task applies it).

Scores are only comparable when they were produced the same way (same judge and judging settings, same
generation settings, same test set); that recipe is the *basis* (:func:`score_basis`). A champion scored on
another basis is not displaced automatically: the decision says so and a person moves the alias. And a
score is only evidence when the judge has shown it can tell a right answer from a wrong one: a judge whose
control AUC is below the threshold promotes nothing (:func:`judge_refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from groundup.config import GenerationConfig, JudgeConfig, config_digest

# The judge's mean score of the finetuned model: what promotion compares.
SCORE_METRIC = "judge.finetuned_model.mean"

# The judge settings that change what a score means (not where or how fast it is computed).
JUDGE_BASIS_KEYS = {
    "model",
    "max_new_tokens",
    "temperature",
    "chat_template",
    "seed",
    "scoring",
    "top_logprobs",
    "force_format",
}


@dataclass(frozen=True)
class Champion:
    ref: str  # name/version
    score: float | None
    basis: str | None


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_before: str | None = None
    champion_score: float | None = None


def score_basis(judge: JudgeConfig, generation: GenerationConfig, judge_id: str, test_sha256: str) -> str:
    """What makes two judge scores comparable: the same judge, generation settings and test set."""
    judging = judge.model_dump(mode="json", include=JUDGE_BASIS_KEYS)
    answering = generation.model_dump(mode="json", exclude={"batch_size", "accelerator"})
    return config_digest([judge_id, judging, answering, test_sha256])


def judge_refusal(summary: Mapping[str, Mapping[str, Any]] | None) -> str | None:
    """Why the judge's scores may not promote anything (its controls fail), or None."""
    control = (summary or {}).get("control")
    if not control or control.get("trusted"):
        return None
    auc = control.get("auc")
    shown = (
        "no usable control scores" if auc is None else f"control AUC {auc:.2f} < {control['threshold']:.2f}"
    )
    return f"the judge cannot tell right from wrong ({shown}); its scores promote nothing"


def decide(
    candidate: str, score: float | None, basis: str, champion: Champion | None, *, refusal: str | None = None
) -> Decision:
    """Whether ``candidate`` (``name/version``) with ``score`` on ``basis`` should become the champion.

    ``score`` None: not judged, so only a candidate. ``refusal``: the judge is not trusted (the reason)."""
    before = champion.ref if champion else None
    held = champion.score if champion else None
    if score is None:
        return Decision(False, "not judged", before, held)
    if refusal:
        return Decision(False, refusal, before, held)
    if champion is None:
        return Decision(True, "no champion yet")
    if before == candidate:
        return Decision(True, "already the champion", before, held)
    if held is None:
        return Decision(False, f"champion {before} has no recorded score", before)
    if champion.basis != basis:
        return Decision(
            False, f"champion {before} was scored on another basis; compare by hand", before, held
        )
    if score > held:
        return Decision(True, f"{score:.4g} beats the champion's {held:.4g}", before, held)
    return Decision(False, f"{score:.4g} does not beat the champion's {held:.4g}", before, held)
