"""Dataset lineage on a real MLflow store (SQLite in a temp dir)."""

from __future__ import annotations

import hashlib

from groundup import tracking
from groundup.tracking.registry import RECORDED_BY_INPUT_TAG


def _recorded_by(run_id: str, digest: str) -> list[str]:
    inputs = tracking.client().get_run(run_id).inputs.dataset_inputs
    return [t.value for i in inputs if i.dataset.digest == digest[:16] for t in i.tags if t.key == RECORDED_BY_INPUT_TAG]


def test_a_dataset_adopted_from_an_adopter_points_at_the_first_recorder(mlflow_tracking, tmp_path):
    """Two pipelines on one store: the only stage run holding the text may have adopted it itself. The new
    run's input then names the run that recorded it first, once (MLflow refuses two tags of one name)."""
    text = tmp_path / "the-verdict.txt"
    text.write_text("I had always thought Jack Gisburn rather a cheap genius")
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.txt").write_text("w")

    with tracking.start_run("data", output_dir=mlflow_tracking, stage="data") as recorder:
        recorder.log_dataset(text, name="the-verdict", digest=digest)
    with tracking.start_run("pretrain-1", output_dir=mlflow_tracking, stage="pretrain") as first:
        first.register_directory(model, "gpt", datasets={"the-verdict": digest})
    assert _recorded_by(first.run_id, digest) == [recorder.run_id]

    # Only the adopter is left to find (as when the recorder's run is not yet visible, or was deleted).
    tracking.client().delete_run(recorder.run_id)
    with tracking.start_run("pretrain-2", output_dir=mlflow_tracking, stage="pretrain") as second:
        second.register_directory(model, "gpt", datasets={"the-verdict": digest})
    assert _recorded_by(second.run_id, digest) == [recorder.run_id]
