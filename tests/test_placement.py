"""Placed stages without a cluster: a cache hit on a worker that never ran the stage, and a training run
killed on one machine resuming on another from the checkpoint it kept in the store (a local-folder store,
one directory per "machine"; tests/test_cluster.py does both on the S3 rehearsal)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from groundup.store import ArtifactStore
from groundup.train.loop import TrainHooks, fit
from tests.s3_fixtures import s3_bucket  # noqa: F401  (fixture)
from tests.test_store import store_url  # noqa: F401  (fixture: a folder, and a bucket on an S3 server)
from tests.test_train import Crash, progressions, settings, tiny_model


def test_a_run_killed_on_one_machine_resumes_on_another_from_the_snapshot_in_the_store(store_url, tmp_path):  # noqa: F811
    loader = DataLoader(progressions(), batch_size=4, shuffle=True, drop_last=True)
    machine_a = ArtifactStore(store_url, tmp_path / "cache-a")
    run_a = tmp_path / "machine-a" / "run-key"

    def crash_at_ten(done: int, total: int) -> None:
        if done == 10:
            raise Crash

    hooks = TrainHooks(
        on_progress=crash_at_ten,
        on_checkpoint=lambda _, progress: machine_a.publish_snapshot("checkpoints/run-key", run_a, step=progress.step),
    )
    with pytest.raises(Crash):
        fit(tiny_model(), loader, None, settings(), run_a, hooks=hooks)

    # Checkpoints at steps 4 and 8: only the newest snapshot stays in the store.
    assert len(machine_a.fs.glob(f"{machine_a.root}/sha256/*.json")) == 1

    machine_b = ArtifactStore(store_url, tmp_path / "cache-b")
    run_b = tmp_path / "machine-b" / "run-key"
    assert machine_b.restore_snapshot("checkpoints/unknown", run_b) is None and not run_b.exists()
    record = machine_b.restore_snapshot("checkpoints/run-key", run_b)
    assert record["step"] == 8 and record["url"].startswith(machine_b.url)
    resumed = fit(tiny_model(), loader, None, settings(), run_b)
    assert resumed.resumed_from == 8 and resumed.progress.step == 48
    # What a machine holds itself is never replaced by a snapshot.
    assert machine_b.restore_snapshot("checkpoints/run-key", run_b) is None
    assert (run_b / "final").is_dir()


def test_a_stage_one_worker_published_is_a_cache_hit_on_another(
    prefect_harness, mlflow_tracking, instruction_data_path, tmp_path, monkeypatch
):
    from groundup.config import InstructDataConfig
    from groundup.flows.placement import run_stage

    monkeypatch.setenv("GROUNDUP_STORE_URL", str(tmp_path / "store"))
    monkeypatch.delenv("GROUNDUP_STORE_CACHE", raising=False)
    stage, path = "split_instructions", "groundup.tasks.finetune:split_instructions"
    config = InstructDataConfig(source=str(instruction_data_path), limit=20).model_dump(mode="json")
    workers = [tmp_path / f"worker-{name}" for name in "abc"]

    first = run_stage(stage, path, {"config": config, "parent_run_id": None}, output_dir=str(workers[0]))
    assert first["state"] == "Completed"
    train_url = first["result"].train
    store = ArtifactStore(tmp_path / "store", tmp_path / "reader")
    assert store.owns(train_url) and store.exists(train_url)
    assert (workers[0] / "instruct").is_dir()

    # Another worker, another pipeline run (where to log is not what defines the stage): nothing computed.
    second = run_stage(stage, path, {"config": config, "parent_run_id": "another"}, output_dir=str(workers[1]))
    assert second == {"result": first["result"], "state": "Cached"}
    assert not (workers[1] / "instruct").exists() and not (workers[1] / "store-cache").exists()

    # A published output gone from the store: not a hit, computed again.
    digest = train_url.split("/sha256/", 1)[1].split("/", 1)[0]
    Path(store._manifest_path(digest)).unlink()
    third = run_stage(stage, path, {"config": config, "parent_run_id": None}, output_dir=str(workers[2]))
    assert third["state"] == "Completed" and (workers[2] / "instruct").is_dir()
    assert third["result"].train == train_url and store.exists(train_url)
    # Other settings are another stage.
    other = {**config, "limit": 12}
    fourth = run_stage(stage, path, {"config": other, "parent_run_id": None}, output_dir=str(workers[1]))
    assert fourth["state"] == "Completed" and fourth["result"].n_train != first["result"].n_train


def test_a_typed_stage_result_survives_its_record_in_the_store():
    from groundup.flows.placement import from_json, to_json
    from groundup.tasks.finetune import FinetuneResult

    result = FinetuneResult(
        engine="groundup", model_ref="finetuned-gpt2/1", model_dir="s3://b/store/sha256/ab/final", out_dir="x",
        loss_plot=None, base="gpt2-124M", base_dir="y", base_sha256="c", base_model_ref=None, train_sha256="d",
        prompt_style="alpaca", metrics={"val_loss": 1.5}, n_train=10, n_val=2, run_id="r",
        outputs={"adapter_dir": "s3://b/store/sha256/ab/final"},
    )  # fmt: skip
    import json

    back = from_json(json.loads(json.dumps(to_json({"result": result, "runs": [result]}))))
    assert back == {"result": result, "runs": [result]} and back["result"].adapter_dir == result.adapter_dir
