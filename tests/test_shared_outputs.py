"""Two pipelines at once on one output location (a scheduled run overlapping a manual one), in one process
on the embedded Prefect API: both finish, every stage either computed its output or reused the other's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.pipeline_fixtures import tiny_config
from tests.test_pipeline import judge, run_pipeline, sources  # noqa: F401  (fixtures)


@pytest.mark.slow
def test_two_pipelines_at_once_on_one_output_dir_both_finish(sources, judge, mlflow_tracking, prefect_harness):  # noqa: F811
    out = mlflow_tracking
    config = tiny_config(sources, out, judge.base_url, ["train.max_steps=6"])
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_pipeline(config), range(2)))
    for state, states in runs:
        assert state.is_completed(), state.message
        assert set(states.values()) <= {"Completed", "Cached"}
    first, second = (state.result() for state, _ in runs)
    assert first.pretrain.checkpoint == second.pretrain.checkpoint
    assert first.finetune.model_dir == second.finetune.model_dir
    # One final model per training directory, no leftovers of the other run's attempt.
    pretrain_dir = out / "checkpoints"
    assert not [p for p in pretrain_dir.rglob(".final.*")]
