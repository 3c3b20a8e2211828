"""Promotion on a real MLflow registry (SQLite in a temp dir): candidate and champion aliases, recorded."""

from __future__ import annotations

import pytest

from groundup import tracking
from groundup.tasks.promote import (
    BASIS_TAG,
    CANDIDATE,
    CHAMPION,
    PROMOTION_TAG,
    SCORE_TAG,
    Promotion,
    promote,
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One MLflow store for the module (creating its tables takes seconds); each test has its own model."""
    import mlflow

    out = tmp_path_factory.mktemp("promote") / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(out)
        yield out
    mlflow.set_tracking_uri(None)


@pytest.fixture
def model(request) -> str:
    return "finetuned-" + request.node.name.replace("[", "-").replace("]", "").replace(".", "")


def _register(tmp_path, out, name: str, tag: str) -> str:
    """A new version of model ``name`` made from a tiny directory, as a stage would register it."""
    directory = tmp_path / tag
    directory.mkdir()
    (directory / "weights.txt").write_text(tag)
    with tracking.start_run(f"finetune-{tag}", output_dir=out) as run:
        return tracking.version_ref(run.register_directory(directory, name))


def _promote(ref: str, score: float | None, out, basis: str = "judge-a") -> Promotion:
    return promote.fn(ref, score, basis, output_dir=str(out))


def _tags(ref: str) -> dict[str, str]:
    return tracking.resolve_version(ref).tags


def test_first_version_becomes_candidate_and_champion(registry, prefect_harness, tmp_path, model):
    v1 = _register(tmp_path, registry, model, "v1")
    result = _promote(v1, 41.5, registry)
    assert result.promoted and result.aliases == [CANDIDATE, CHAMPION]
    assert tracking.version_ref(tracking.resolve_version(f"{model}@{CHAMPION}")) == v1
    assert tracking.version_ref(tracking.resolve_version(f"{model}@{CANDIDATE}")) == v1
    tags = _tags(v1)
    assert float(tags[SCORE_TAG]) == 41.5 and tags[BASIS_TAG] == "judge-a"
    assert tags[PROMOTION_TAG] == "champion" and tags[PROMOTION_TAG + ".reason"] == "no champion yet"
    run = tracking.client().get_run(tags[PROMOTION_TAG + ".run_id"])
    assert run.data.metrics["candidate_score"] == 41.5 and run.data.metrics["promoted"] == 1.0
    # the promoted model is an input of the promote run; the description records the decision
    version = tracking.resolve_version(v1)
    assert [m.model_id for m in run.inputs.model_inputs] == [version.source.removeprefix("models:/")]
    assert "- Promotion: champion (no champion yet)" in version.description


def test_a_better_version_takes_over_and_the_comparison_is_recorded(registry, prefect_harness, tmp_path, model):
    v1, v2 = _register(tmp_path, registry, model, "v1"), _register(tmp_path, registry, model, "v2")
    _promote(v1, 40.0, registry)
    result = _promote(v2, 55.0, registry)
    assert result.promoted and result.champion_before == v1 and result.champion_score == 40.0
    assert tracking.version_ref(tracking.resolve_version(f"{model}@{CHAMPION}")) == v2
    tags = _tags(v2)
    assert tags[PROMOTION_TAG + ".champion_before"] == v1
    assert "55 beats the champion's 40" in tags[PROMOTION_TAG + ".reason"]
    metrics = tracking.client().get_run(tags[PROMOTION_TAG + ".run_id"]).data.metrics
    assert metrics["champion_score"] == 40.0 and metrics["score_delta"] == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("score", "basis", "reason"),
    [
        (40.0, "judge-a", "does not beat"),  # a tie keeps the champion
        (30.0, "judge-a", "does not beat"),
        (90.0, "judge-b", "another basis"),  # scores from another judge are not comparable
    ],
)
def test_the_champion_stays_unless_beaten_on_the_same_basis(registry, prefect_harness, tmp_path, model, score, basis, reason):
    v1, v2 = _register(tmp_path, registry, model, "v1"), _register(tmp_path, registry, model, "v2")
    _promote(v1, 40.0, registry)
    result = _promote(v2, score, registry, basis=basis)
    assert not result.promoted and result.aliases == [CANDIDATE]
    assert reason in result.reason
    assert tracking.version_ref(tracking.resolve_version(f"{model}@{CHAMPION}")) == v1
    assert tracking.version_ref(tracking.resolve_version(f"{model}@{CANDIDATE}")) == v2
    assert _tags(v2)[PROMOTION_TAG] == "candidate"


def test_rejudging_the_champion_keeps_it(registry, prefect_harness, tmp_path, model):
    v1 = _register(tmp_path, registry, model, "v1")
    _promote(v1, 40.0, registry)
    result = _promote(v1, 38.0, registry)
    assert result.promoted and result.reason == "already the champion" and result.champion_score == 40.0
    assert float(_tags(v1)[SCORE_TAG]) == 38.0


def test_an_unjudged_version_is_only_a_candidate(registry, prefect_harness, tmp_path, model):
    v1, v2 = _register(tmp_path, registry, model, "v1"), _register(tmp_path, registry, model, "v2")
    _promote(v1, 40.0, registry)
    result = _promote(v2, None, registry)
    assert not result.promoted and result.reason == "not judged"
    assert SCORE_TAG not in _tags(v2)
    assert tracking.version_ref(tracking.resolve_version(f"{model}@{CHAMPION}")) == v1


def test_an_untrusted_judge_promotes_nothing_and_says_why(registry, prefect_harness, tmp_path, model):
    v1 = _register(tmp_path, registry, model, "v1")
    refusal = "the judge cannot tell right from wrong (control AUC 0.46 < 0.80); its scores promote nothing"
    result = promote.fn(v1, 90.0, "judge-a", refusal, output_dir=str(registry))
    assert not result.promoted and result.aliases == [CANDIDATE] and result.reason == refusal
    assert _tags(v1)[PROMOTION_TAG + ".reason"] == refusal
    with pytest.raises(Exception, match="champion"):
        tracking.resolve_version(f"{model}@{CHAMPION}")


def test_a_champion_without_a_recorded_score_is_not_displaced(registry, prefect_harness, tmp_path, model):
    v1, v2 = _register(tmp_path, registry, model, "v1"), _register(tmp_path, registry, model, "v2")
    tracking.set_alias(model, CHAMPION, v1.split("/")[1])  # chosen by hand
    result = _promote(v2, 99.0, registry)
    assert not result.promoted and "no recorded score" in result.reason


def test_an_unknown_model_is_an_error(registry, prefect_harness):
    with pytest.raises(Exception, match="nope"):
        _promote("nope/1", 1.0, registry)
