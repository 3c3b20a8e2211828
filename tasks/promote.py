"""Promotion: the judged model version becomes ``candidate``, and ``champion`` when it beats the champion.

Scores are only comparable when they were produced the same way (same judge, same generation settings,
same test set); that recipe is the *basis*, a digest the pipeline computes. A champion scored on another
basis is not displaced automatically: the decision says so and a person moves the alias. Every decision is
recorded on the candidate version (tags) and in a ``promote`` run (metrics), so the registry shows why a
version is or is not the champion.
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.artifacts import create_markdown_artifact

from groundup import tracking
from groundup.instruct.promotion import Champion, decide
from groundup.tasks.common import StageResult, stage_run

CANDIDATE = "candidate"
CHAMPION = "champion"
SCORE_TAG = tracking.TAG + "score"
BASIS_TAG = tracking.TAG + "score_basis"
PROMOTION_TAG = tracking.TAG + "promotion"


@dataclasses.dataclass
class Promotion(StageResult):
    """The decision on a model version: the aliases it now has, and why (``instruct.promotion.Decision``)."""

    model: str  # name/version
    aliases: list[str]
    promoted: bool  # became the champion
    reason: str
    champion_before: str | None
    champion_score: float | None


def registered_champion(version: tracking.ModelVersion | None) -> Champion | None:
    """The champion version as the promotion rule sees it: its ref, recorded score and basis."""
    if version is None:
        return None
    raw = version.tags.get(SCORE_TAG)
    return Champion(tracking.version_ref(version), None if raw is None else float(raw), version.tags.get(BASIS_TAG))


@task(name="promote", retries=2, retry_delay_seconds=5)
def promote(
    model: str,
    score: float | None,
    basis: str,
    refusal: str | None = None,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> Promotion:
    """Alias ``model`` (``name/version``) as candidate; as champion too if its ``score`` beats the champion's.

    Not cached on purpose: the decision depends on the registry's current state, not only on the inputs.
    ``score`` None (no judge ran) makes it a candidate and leaves the champion alone, and so does a
    ``refusal`` (why the judge is not trusted, from ``promotion.judge_refusal``). The rule:
    ``groundup.instruct.promotion.decide``.
    """
    version = tracking.resolve_version(model)
    ref = tracking.version_ref(version)
    with stage_run(
        "promote",
        config={"model": ref, "score": score, "basis": basis, "refusal": refusal},
        parent_run_id=parent_run_id,
        output_dir=output_dir,
        experiment=experiment,
    ) as run:
        run.log_model_inputs([tracking.model_id_of(version)])
        tracking.set_alias(version.name, CANDIDATE, version.version)
        champion = registered_champion(tracking.alias_target(version.name, CHAMPION))
        decision = decide(ref, score, basis, champion, refusal=refusal)
        if score is not None:
            tracking.set_version_tags(ref, {SCORE_TAG: score, BASIS_TAG: basis})
        if decision.promoted:
            tracking.set_alias(version.name, CHAMPION, version.version)
        record = {
            PROMOTION_TAG: "champion" if decision.promoted else "candidate",
            PROMOTION_TAG + ".reason": decision.reason,
            PROMOTION_TAG + ".run_id": run.run_id,
        }
        if decision.champion_before:
            record[PROMOTION_TAG + ".champion_before"] = decision.champion_before
        tracking.set_version_tags(ref, record)
        run.set_tags(record)
        run.log_metrics(
            {
                "candidate_score": score,
                "champion_score": decision.champion_score,
                "score_delta": None if score is None or decision.champion_score is None else score - decision.champion_score,
                "promoted": float(decision.promoted),
            }
        )
    aliases = [CANDIDATE] + ([CHAMPION] if decision.promoted else [])
    create_markdown_artifact(
        key="promotion",
        markdown=f"**{ref}** → {', '.join('@' + a for a in aliases)}: {decision.reason}",
        description="Model promotion",
    )
    return Promotion(model=ref, aliases=aliases, **dataclasses.asdict(decision))
