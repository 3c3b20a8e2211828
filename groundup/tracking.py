"""The one place that talks to MLflow: runs, datasets, models, the registry and lineage tags.

Everything goes through ``MlflowClient`` with explicit run ids rather than MLflow's fluent "active run",
because Prefect runs tasks in worker threads and a stage must log into the run it was given, not into
whatever run another thread started.

Layout in MLflow:

- one experiment per pipeline (``groundup`` by default), artifacts under ``<output_dir>/mlartifacts``;
- one parent run per Prefect flow run, tagged with the flow run id and URL, the git commit and the hash of
  the configuration;
- one nested run per stage (``groundup.stage`` tag), holding that stage's params, metrics, datasets
  (inputs with content digests), plots and tables;
- every model the pipeline produces registered as a LoggedModel of its output directory plus a Model
  Registry version whose tags carry its lineage: producing run, config hash, commit, flow run, input
  dataset digests and the parent model version (``groundup.parent``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.entities.logged_model_status import LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

TAG = "groundup."
DEFAULT_EXPERIMENT = "groundup"


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
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
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
    root = Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrackedRun:
    """A handle on one MLflow run; every method logs into exactly this run."""

    run_id: str
    experiment_id: str
    _client: MlflowClient = field(default_factory=client, repr=False)

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
        import time

        from mlflow.entities import Metric

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
        """Record a file as an input dataset of this run, identified by its content digest (sha256)."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        origin = source or str(Path(path).resolve())
        src = (
            HTTPDatasetSource(origin)
            if origin.startswith(("http://", "https://"))
            else LocalArtifactDatasetSource(str(Path(path).resolve()))
        )
        # MLflow keeps at most 36 characters of a dataset digest; the full sha256 goes into the tags.
        dataset = MetaDataset(source=src, name=name, digest=digest[:16])
        inputs = [dataset._to_mlflow_entity()]
        from mlflow.entities import DatasetInput, InputTag

        tags = [InputTag("mlflow.data.context", context), InputTag(TAG + "sha256", digest)]
        try:
            self._client.log_inputs(self.run_id, datasets=[DatasetInput(inputs[0], tags)])
        except MlflowException as exc:
            # MLflow creates a dataset with a check-then-insert: another run logging the same dataset at
            # the same moment (two pipelines on one store) wins the insert; the dataset is there now.
            if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc):
                raise
            self._client.log_inputs(self.run_id, datasets=[DatasetInput(inputs[0], tags)])
        self.set_tags({f"{TAG}dataset.{name}": digest})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_table(self, frame, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table artifact (shown in the UI's evaluation view)."""
        self._client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def register_directory(
        self,
        directory: str | Path,
        name: str,
        *,
        parent: str | None = None,
        datasets: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        model_type: str = "groundup",
    ) -> ModelVersion:
        """Log ``directory`` as a LoggedModel of this run and register it as a new version of ``name``.

        ``parent`` is the model it was derived from (``"gpt2-124m/1"`` for a registered version, or an
        external id such as ``"hf:microsoft/phi-2"``); ``datasets`` maps dataset names to sha256 digests.
        Both become tags of the LoggedModel and the model version, so the chain can be walked back.
        """
        lineage = self.lineage_tags(parent=parent, datasets=datasets, extra=tags)
        model = self._client.create_logged_model(
            experiment_id=self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags=lineage,
            params={k: str(v)[:6000] for k, v in flatten(params or {}).items()},
            model_type=model_type,
        )
        try:
            self._client.log_model_artifacts(model.model_id, str(directory))
        except Exception:
            self._client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        version = mlflow.register_model(
            f"models:/{model.model_id}", name, tags={**lineage, TAG + "model_id": model.model_id}
        )
        self.set_tags({f"{TAG}registered.{name}": version.version})
        return version

    def lineage_tags(
        self,
        parent: str | None = None,
        datasets: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        run = self._client.get_run(self.run_id)
        keep = ("config_hash", "git_commit", "flow_run_id", "flow_run_url", "stage", "pipeline_run_id")
        tags = {k: v for k, v in run.data.tags.items() if k.removeprefix(TAG) in keep and k.startswith(TAG)}
        tags[TAG + "run_id"] = self.run_id
        if parent:
            tags[TAG + "parent"] = parent
        for dname, digest in (datasets or {}).items():
            tags[f"{TAG}dataset.{dname}"] = digest
        tags.update({k: str(v) for k, v in (extra or {}).items()})
        return tags

    def log_figure(self, figure, artifact_file: str) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file)


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
        all_tags["mlflow.parentRunId"] = parent_run_id
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
    tracked = TrackedRun(run.info.run_id, exp_id, c)
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
    return TrackedRun(run_id, run.info.experiment_id, c)


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


# ---------------------------------------------------------------------------------------------------------
# Registry: versions, aliases, lineage
# ---------------------------------------------------------------------------------------------------------


def resolve_version(ref: str) -> ModelVersion:
    """``name`` (latest), ``name/3`` or ``name@alias`` -> the model version; LookupError if there is none."""
    c = client()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return c.get_model_version(name, version)
    except MlflowException as exc:
        raise LookupError(f"no registered model version {ref!r} ({exc.message})") from None
    versions = c.search_model_versions(f"name='{ref}'")
    if not versions:
        raise LookupError(f"no registered model named {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def version_ref(version: ModelVersion) -> str:
    return f"{version.name}/{version.version}"


def set_alias(name: str, alias: str, version: str | int) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def alias_target(name: str, alias: str) -> ModelVersion | None:
    """The version ``name@alias`` points at, or None when the alias (or the model) does not exist."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_version_tags(ref: str, tags: Mapping[str, Any]) -> None:
    version = resolve_version(ref)
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(version.name, version.version, key, str(value))


def model_directory(ref: str, dst: str | Path | None = None) -> Path:
    """Download (or find locally) the files of a registered model version."""
    version = resolve_version(ref)
    dst = Path(dst or tempfile.mkdtemp(prefix="groundup-model-"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))


def record_evaluation(ref: str, run: TrackedRun, metrics: Mapping[str, float]) -> None:
    """Attach an evaluation to a model version: metrics on its LoggedModel, the run id in its tags."""
    version = resolve_version(ref)
    c = client()
    model_id = version.tags.get(TAG + "model_id")
    for key, value in metrics.items():
        if value is None:
            continue
        if model_id:
            mlflow.log_metrics({key: float(value)}, run_id=run.run_id, model_id=model_id)
        else:
            run.log_metrics({key: value})
    previous = version.tags.get(TAG + "evaluated_by", "")
    runs = [r for r in previous.split(",") if r] + [run.run_id]
    c.set_model_version_tag(version.name, version.version, TAG + "evaluated_by", ",".join(runs))
    run.set_tags({TAG + "evaluates": version_ref(version)})


def lineage(ref: str) -> dict[str, Any]:
    """The chain behind a model version: its run, config, commit, flow run, datasets, evaluations, parent."""
    c = client()
    version = resolve_version(ref)
    tags = version.tags
    node: dict[str, Any] = {
        "model": version_ref(version),
        "aliases": list(getattr(version, "aliases", []) or []),
        "run_id": tags.get(TAG + "run_id", version.run_id),
        "stage": tags.get(TAG + "stage"),
        "config_hash": tags.get(TAG + "config_hash"),
        "git_commit": tags.get(TAG + "git_commit"),
        "flow_run_id": tags.get(TAG + "flow_run_id"),
        "flow_run_url": tags.get(TAG + "flow_run_url"),
        "datasets": {k.removeprefix(TAG + "dataset."): v for k, v in tags.items() if k.startswith(TAG + "dataset.")},
        "evaluations": [],
        "promotion": tags.get(TAG + "promotion"),
        "promotion_reason": tags.get(TAG + "promotion.reason"),
        "parent": None,
    }
    for run_id in filter(None, tags.get(TAG + "evaluated_by", "").split(",")):
        try:
            run = c.get_run(run_id)
        except MlflowException:
            continue
        node["evaluations"].append({"run_id": run_id, "name": run.info.run_name, "metrics": dict(run.data.metrics)})
    parent = tags.get(TAG + "parent")
    if parent:
        try:
            node["parent"] = lineage(parent)
        except (MlflowException, LookupError):
            node["parent"] = {"model": parent, "external": True}
    return node


def format_lineage(node: dict[str, Any], indent: str = "") -> str:
    """A lineage chain as an indented tree, newest model first."""
    lines = []
    title = node["model"] + (f"  @{', @'.join(node['aliases'])}" if node.get("aliases") else "")
    lines.append(f"{indent}{title}" + ("  (external)" if node.get("external") else ""))
    pad = indent + "  "
    if not node.get("external"):
        for key in ("stage", "run_id", "config_hash", "git_commit", "flow_run_id", "flow_run_url"):
            if node.get(key):
                lines.append(f"{pad}{key}: {node[key]}")
        for name, digest in sorted(node.get("datasets", {}).items()):
            lines.append(f"{pad}dataset {name}: sha256 {digest}")
        if node.get("promotion"):
            lines.append(f"{pad}promotion: {node['promotion']} ({node.get('promotion_reason')})")
        for ev in node.get("evaluations", []):
            # Means first: with many metrics, they are the ones worth a line.
            ranked = sorted(ev["metrics"].items(), key=lambda kv: (not kv[0].endswith(".mean"), kv[0]))
            shown = ", ".join(f"{k}={v:.4g}" for k, v in ranked[:6])
            lines.append(f"{pad}evaluated by {ev['name']} ({ev['run_id']}): {shown}")
    if node.get("parent"):
        lines.append(f"{pad}derived from:")
        lines.append(format_lineage(node["parent"], pad + "  "))
    return "\n".join(lines)
