"""Runs: where MLflow keeps things, one run per stage with its params, metrics, datasets and artifacts, and
the Prefect flow run and git commit it came from.

Everything goes through ``MlflowClient`` with explicit run ids rather than MLflow's fluent "active run",
because Prefect runs tasks in worker threads and a stage must log into the run it was given, not into
whatever run another thread started.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from groundup.files import exclusive_lock

TAG = "groundup."
DEFAULT_EXPERIMENT = "groundup"
# The full sha256 of a dataset, on its input (MLflow keeps at most 36 characters of a digest).
SHA256_INPUT_TAG = TAG + "sha256"
# MLflow's own tag naming a run's parent run (the pipeline's run above a stage's run).
PARENT_RUN_TAG = "mlflow.parentRunId"


# ---------------------------------------------------------------------------------------------------------
# Where MLflow keeps things
# ---------------------------------------------------------------------------------------------------------


def default_tracking_uri(output_dir: str | Path = "artifacts") -> str:
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def configure(output_dir: str | Path = "artifacts", tracking_uri: str | None = None) -> str:
    """Point MLflow at ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite under ``output_dir``.

    Also exports the URI, because Lightning reads ``MLFLOW_TRACKING_URI`` when it is imported.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        # MLflow creates a new database's tables on first use, in steps: two processes doing it at once
        # (two first commands) fail with "duplicate column". One creates them while the other waits.
        with exclusive_lock(database.with_name(database.name + ".lock")):
            client().search_experiments(max_results=1)
    return uri


def client() -> MlflowClient:
    return MlflowClient(mlflow.get_tracking_uri())


def experiment_id(name: str = DEFAULT_EXPERIMENT, output_dir: str | Path = "artifacts") -> str:
    c = client()
    existing = c.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    uri = mlflow.get_tracking_uri()
    # A remote tracking server stores artifacts itself; a local SQLite store keeps them beside the db.
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        location = (Path(output_dir).resolve() / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another task
        return c.get_experiment_by_name(name).experiment_id


@functools.cache
def git_commit() -> str:
    """The commit of the groundup source tree, with ``-dirty`` if it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from groundup import __version__

        return f"release-{__version__}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def dataset_entity(path: str | Path, name: str, digest: str, source: str | None = None):
    """An MLflow dataset for a file: its source (URL or local path) and the head of its sha256."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    origin = source or str(Path(path).resolve())
    src = HTTPDatasetSource(origin) if origin.startswith(("http://", "https://")) else LocalArtifactDatasetSource(origin)
    return MetaDataset(source=src, name=name, digest=digest[:16])._to_mlflow_entity()


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrackedRun:
    """A handle on one MLflow run; every method logs into exactly this run."""

    run_id: str
    experiment_id: str
    _client: MlflowClient = field(default_factory=client, repr=False)
    # The pipeline's (or stage flow's) run above this one: it shows every dataset its stages read.
    parent_run_id: str | None = None

    @property
    def url_path(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if value is not None:
                self._client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_metric_history(self, key: str, values: list[tuple[int, float]]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(v), now, int(s)) for s, v in values]
        for start in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_dataset(
        self,
        path: str | Path,
        *,
        name: str,
        digest: str,
        context: str = "training",
        source: str | None = None,
    ) -> None:
        """Record a file as an input dataset of this run (and of its parent run), identified by its content
        digest (sha256; MLflow shows its first 16 characters, the input's ``groundup.sha256`` tag all)."""
        self.log_dataset_inputs([DatasetInput(dataset_entity(path, name, digest, source), self._input_tags(digest, context))])

    @staticmethod
    def _input_tags(digest: str, context: str) -> list[InputTag]:
        return [InputTag("mlflow.data.context", context), InputTag(SHA256_INPUT_TAG, digest)]

    def log_dataset_inputs(self, inputs: list[DatasetInput]) -> None:
        for run_id in filter(None, (self.run_id, self.parent_run_id)):
            try:
                self._client.log_inputs(run_id, datasets=inputs)
            except MlflowException as exc:
                # MLflow creates a dataset with a check-then-insert: another run logging the same dataset at
                # the same moment (two pipelines on one store) wins the insert; the dataset is there now.
                if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc):
                    raise
                self._client.log_inputs(run_id, datasets=inputs)

    def log_model_inputs(self, model_ids: list[str]) -> None:
        """Record LoggedModels this run consumed (a base model, a model under evaluation)."""
        if model_ids := [m for m in dict.fromkeys(model_ids) if m]:
            self._client.log_inputs(self.run_id, models=[LoggedModelInput(m) for m in model_ids])

    def log_model_outputs(self, model_ids: list[str]) -> None:
        """Record LoggedModels this run produced, or found already produced and reused (a cached checkpoint
        an earlier run registered), so the run's outputs name the model either way."""
        if model_ids := [m for m in dict.fromkeys(model_ids) if m]:
            self._client.log_outputs(self.run_id, [LoggedModelOutput(m, 0) for m in model_ids])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_table(self, frame, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table artifact (shown in the UI's evaluation view)."""
        self._client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file)

    def register_directory(self, directory: str | Path, name: str, **lineage: Any):
        """Log ``directory`` as this run's output LoggedModel and register it (see
        :func:`groundup.tracking.registry.register_directory`)."""
        from groundup.tracking.registry import register_directory

        return register_directory(self, directory, name, **lineage)


@contextlib.contextmanager
def start_run(
    name: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    output_dir: str | Path = "artifacts",
    parent_run_id: str | None = None,
    stage: str | None = None,
    config: Any | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[TrackedRun]:
    """Open a run (nested under ``parent_run_id`` if given) and close it FINISHED, or FAILED on error.

    ``config`` (a pydantic settings model or a mapping) is logged as params, as ``config.json`` and as the
    ``groundup.config_hash`` tag.
    """
    c = client()
    exp_id = experiment_id(experiment, output_dir)
    all_tags: dict[str, str] = {TAG + "git_commit": git_commit(), "mlflow.runName": name}
    if stage:
        all_tags[TAG + "stage"] = stage
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
        all_tags[TAG + "pipeline_run_id"] = parent_run_id
        # Stages inherit the flow run's identity so every run can be traced back to Prefect.
        parent_tags = c.get_run(parent_run_id).data.tags
        for key in ("flow_run_id", "flow_run_url", "flow_name"):
            if TAG + key in parent_tags:
                all_tags[TAG + key] = parent_tags[TAG + key]
    config_data = None
    if config is not None:
        config_data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        from groundup.config import config_digest

        all_tags[TAG + "config_hash"] = config_digest(config_data)
    all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
    run = c.create_run(exp_id, run_name=name, tags=all_tags)
    tracked = TrackedRun(run.info.run_id, exp_id, c, parent_run_id)
    if config_data is not None:
        tracked.log_params(config_data)
        tracked.log_dict(config_data, "config.json")
    try:
        yield tracked
    except BaseException:
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    c.set_terminated(run.info.run_id, status="FINISHED")


def open_run(run_id: str) -> TrackedRun:
    """A handle on an existing run (e.g. the pipeline's parent run, from inside a task)."""
    c = client()
    run = c.get_run(run_id)
    return TrackedRun(run_id, run.info.experiment_id, c, run.data.tags.get(PARENT_RUN_TAG))


def flow_run_tags() -> dict[str, str]:
    """Tags naming the current Prefect flow run, if there is one. Reads Prefect's context lazily, so the
    library keeps working (and importing) without Prefect running."""
    try:
        from prefect.context import FlowRunContext
        from prefect.settings import PREFECT_UI_URL
    except ImportError:
        return {}
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    tags = {TAG + "flow_run_id": str(ctx.flow_run.id), TAG + "flow_name": ctx.flow.name}
    ui = PREFECT_UI_URL.value()
    if ui:
        tags[TAG + "flow_run_url"] = f"{ui.rstrip('/')}/runs/flow-run/{ctx.flow_run.id}"
    return tags
