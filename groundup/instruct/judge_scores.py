"""What a judge's replies say: scores parsed from replies, their statistics, and the controls. (A judge
scored by probabilities gives decimal scores directly: :mod:`groundup.instruct.judge_probabilities`; the
statistics take both.)

Score parsing (:func:`parse_score`) reads a reply as a person would: the final or explicitly labelled
score, never the first incidental number, and unparsed when it is truly ambiguous:

=========================================  =========  ==================================================
reply                                      score      why
=========================================  =========  ==================================================
``85``, ``{"score": 85}``                  85         the number (or the JSON a format-forced server sends)
``Score: 85/100``                          85         labelled; ``/100`` is the scale
``I'd rate this 4/5... final score 80``    80         ``4/5`` is another scale; *final* wins
``Comparing 3 items, I give 65``           65         ``I give`` labels 65; 3 is incidental
``It could be 60 or 70``                   unparsed   two candidates, nothing tells them apart
``eighty``                                 unparsed   number words are not read
``150``, ``-3``, ``85.5``                  unparsed   out of range, negative, not an integer
=========================================  =========  ==================================================

The controls ask whether the judge can judge at all: for each of the first entries it scores the
reference answer and a mismatched reference (another entry's). :func:`control_auc` is the probability
that a reference outranks a mismatched answer (0.5: chance); below ``threshold`` the summary says plainly
that the judge cannot tell right from wrong, and promotion is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MODEL_KEYS = ("base_model", "finetuned_model")
CONTROL_KEYS = ("reference_answer", "mismatched_answer")


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------

# A number not glued to a preceding word, decimal point or slash ("v2", ".5", the "100" of "85/100"), with
# an optional minus sign and decimal part; a trailing "." without digits is punctuation.
_NUMBER = re.compile(r"(?<![\w./])(-?)(\d+)(\.\d+)?(?!\d)")
# A score on another scale ("4/5", "7 out of 10") is not a score from 0 to 100, whatever its value.
_SCALE = re.compile(r"\s*(?:/|out of)\s*(\d+)", re.IGNORECASE)
_DENOMINATOR = re.compile(r"out of\s*$", re.IGNORECASE)
# What labels a number as the judge's score when it comes just before it ("final score 80", "I give 65",
# "Score: 85", "I'd rate it 90"): a label word, then at most a few words that are not a sentence end.
_LABEL = re.compile(
    r"\b(score|scored|scoring|rating|rate|rated|grade|graded|give|giving|assign|award|verdict)\b"
    r"[^.!?\d\n]{0,24}$",
    re.IGNORECASE,
)
_FINAL = re.compile(r"\b(final|overall|total)\b[^.!?\d\n]{0,24}$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedScore:
    score: int | None
    problem: str | None = None  # why the reply is unparsed

    @property
    def parsed(self) -> bool:
        return self.score is not None


@dataclass(frozen=True)
class _Number:
    text: str
    value: int | None  # None: not a whole number from 0 to 100
    problem: str | None
    labelled: bool
    final: bool


def _numbers(reply: str) -> list[_Number]:
    """The numbers of ``reply`` that could be a score on the 0-100 scale, with how they are labelled."""
    numbers = []
    for match in _NUMBER.finditer(reply):
        before = reply[max(0, match.start() - 40) : match.start()]
        scale = _SCALE.match(reply, match.end())
        if _DENOMINATOR.search(before) or (scale and scale.group(1) != "100"):
            continue  # "10" in "7 out of 10", or "4" in "4/5": another scale
        sign, digits, fraction = match.groups()
        problem = None
        if fraction:
            problem = f"not an integer: {match.group(0)}"
        elif sign:
            problem = f"negative: {match.group(0)}"
        elif int(digits) > 100:
            problem = f"out of range: {int(digits)}"
        labelled = bool(scale) or bool(_LABEL.search(before))  # "85/100" says what 85 is
        numbers.append(
            _Number(
                match.group(0),
                None if problem else int(digits),
                problem,
                labelled,
                bool(_FINAL.search(before)),
            )
        )
    return numbers


def parse_score(reply: str | None) -> ParsedScore:
    """The score in ``reply`` as a person would read it, or unparsed with the reason.

    In order: a JSON object's ``score``; the last number labelled *final* (``final score 80``); else the
    labelled numbers (``Score: 85``, ``I give 65``, ``85/100``) if they agree; else the one number there
    is. Numbers on another scale (``4/5``) are never read as scores; several different candidates with
    nothing to tell them apart leave the reply unparsed (ambiguous) rather than guessing.
    """
    if reply is None or not reply.strip():
        return ParsedScore(None, "empty reply")
    from_json = _json_score(reply)
    if from_json is not None:
        return from_json
    numbers = _numbers(reply)
    if not numbers:
        return ParsedScore(None, "no number")
    final = [n for n in numbers if n.final][-1:]  # the conclusion a reply ends on
    for group in (final, [n for n in numbers if n.labelled], numbers):
        valid = {n.value for n in group if n.value is not None}
        if len(valid) == 1:
            return ParsedScore(valid.pop())
        if len(valid) > 1:
            return ParsedScore(None, "ambiguous: " + ", ".join(n.text for n in group if n.value is not None))
        if group:
            return ParsedScore(None, group[0].problem)
    raise AssertionError("unreachable: numbers is not empty")


def _json_score(reply: str) -> ParsedScore | None:
    """``{"score": 85}`` (what a server forced to a JSON schema sends); None when the reply is no such JSON."""
    text = reply.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text).get("score")
    except (ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return ParsedScore(None, f"not an integer: {value!r}")
    if not 0 <= value <= 100:
        return ParsedScore(None, f"out of range: {value}")
    return ParsedScore(value)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def describe_scores(scores: Sequence[float | None]) -> dict[str, float | int | None]:
    """Count, unparsed count and share, and mean / median / sample standard deviation of parsed scores."""
    parsed = np.array([s for s in scores if s is not None], dtype=float)
    total = len(scores)
    unparsed = total - len(parsed)
    return {
        "count": total,
        "parsed": int(len(parsed)),
        "unparsed": unparsed,
        "unparsed_share": unparsed / total if total else None,
        "mean": float(parsed.mean()) if len(parsed) else None,
        "median": float(np.median(parsed)) if len(parsed) else None,
        "std": float(parsed.std(ddof=1)) if len(parsed) > 1 else None,
    }


def paired_difference(
    base: Sequence[float | None], finetuned: Sequence[float | None], *, samples: int = 10_000, seed: int = 123
) -> dict[str, float | int | None]:
    """Mean of ``finetuned - base`` over entries where both scores parsed, with a paired bootstrap 95%
    percentile interval: entries are resampled with replacement, keeping each entry's two scores together,
    so the interval reflects that both models answered the same questions."""
    if len(base) != len(finetuned):
        raise ValueError(f"paired scores need equal lengths, got {len(base)} and {len(finetuned)}")
    diffs = np.array(
        [f - b for b, f in zip(base, finetuned, strict=True) if b is not None and f is not None], dtype=float
    )
    result: dict[str, float | int | None] = {
        "pairs": int(len(diffs)),
        "mean": None,
        "ci_low": None,
        "ci_high": None,
    }
    if len(diffs) == 0:
        return result
    result["mean"] = float(diffs.mean())
    if len(diffs) > 1:
        rng = np.random.default_rng(seed)
        means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


def control_auc(
    reference: Sequence[float | None],
    mismatched: Sequence[float | None],
    *,
    samples: int = 10_000,
    seed: int = 123,
) -> dict[str, float | int | None]:
    """How often the judge scores a reference answer above a mismatched one: the AUC (Mann-Whitney) over
    every pair of a parsed reference score and a parsed mismatched score, ties counting half, with a 95%
    percentile interval from resampling the control entries (each entry's two scores together)."""
    ref = np.array([np.nan if v is None else v for v in reference], dtype=float)
    mis = np.array([np.nan if v is None else v for v in mismatched], dtype=float)
    result: dict[str, float | int | None] = {
        "auc": None,
        "ci_low": None,
        "ci_high": None,
        "entries": len(ref),
    }
    point = _auc(ref[None, :], mis[None, :])[0]
    if math.isnan(point):
        return result
    result["auc"] = float(point)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ref), size=(samples, len(ref)))
    aucs = np.concatenate(
        [_auc(ref[chunk], mis[chunk]) for chunk in np.array_split(draws, max(1, samples // 500))]
    )
    low, high = np.nanpercentile(aucs, [2.5, 97.5])
    result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


def _auc(ref: np.ndarray, mis: np.ndarray) -> np.ndarray:
    """Row-wise AUC of ``(draws, entries)`` reference vs mismatched scores; NaN (unparsed) takes no part."""
    r, m = ref[:, :, None], mis[:, None, :]
    valid = (~np.isnan(r) & ~np.isnan(m)).sum(axis=(1, 2))
    wins = (r > m).sum(axis=(1, 2)) + 0.5 * (r == m).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid > 0, wins / valid, np.nan)


def summarize(
    scores: Mapping[str, Sequence[float | None]],
    *,
    samples: int = 10_000,
    seed: int = 123,
    auc_threshold: float = 0.8,
    number_masses: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Per-model statistics and the paired difference finetuned - base; with control scores, their
    statistics and ``control`` (AUC, interval, threshold and whether the judge is trusted).

    ``number_masses``: per key, the probability mass on numbers of each reply scored from probabilities;
    their count (``by_probability``) and mean (``number_mass``) join that key's statistics."""

    def describe(key: str) -> dict[str, float | int | None]:
        masses = (number_masses or {}).get(key) or []
        stats = describe_scores(scores[key])
        if masses:
            stats.update(by_probability=len(masses), number_mass=float(np.mean(masses)))
        return stats

    summary = {key: describe(key) for key in MODEL_KEYS}
    summary["difference"] = paired_difference(
        scores["base_model"], scores["finetuned_model"], samples=samples, seed=seed
    )
    if all(scores.get(key) for key in CONTROL_KEYS):
        summary.update({key: describe(key) for key in CONTROL_KEYS})
        control = control_auc(*(scores[key] for key in CONTROL_KEYS), samples=samples, seed=seed)
        auc = control["auc"]
        summary["control"] = {
            **control,
            "threshold": auc_threshold,
            "trusted": auc is not None and auc >= auc_threshold,
        }
    return summary


def control_verdict(summary: Mapping[str, Mapping[str, float | int | None]]) -> str:
    """One plain sentence on whether the judge's scores mean anything, from the controls."""
    control = summary.get("control")
    if not control:
        return "No controls were judged (judge.controls is 0): nothing shows that this judge can tell right from wrong."
    auc, threshold = control["auc"], control["threshold"]
    if auc is None:
        return "The judge gave no usable control scores: nothing shows that it can tell right from wrong."
    ref, mis = summary["reference_answer"]["mean"], summary["mismatched_answer"]["mean"]
    evidence = (
        f"control AUC {auc:.2f} (95% interval [{control['ci_low']:.2f}, {control['ci_high']:.2f}], "
        f"{control['entries']} entries; reference answers mean {ref:.1f}, mismatched answers mean {mis:.1f})"
    )
    if control["trusted"]:
        return f"The judge tells right from wrong: {evidence}, at or above the threshold {threshold:.2f}."
    return (
        f"The judge cannot tell right from wrong: {evidence}, below the threshold {threshold:.2f}. "
        "Its scores are no evidence of quality; promotion is refused."
    )


def summary_metrics(summary: Mapping[str, Mapping[str, float | int | None]]) -> dict[str, float]:
    """Flat MLflow metric names (``judge.finetuned_model.mean`` ...), leaving out what could not be computed."""
    return {
        f"judge.{group}.{name}": float(value)
        for group, stats in summary.items()
        for name, value in stats.items()
        if isinstance(value, (int, float)) and not math.isnan(value)
    }
