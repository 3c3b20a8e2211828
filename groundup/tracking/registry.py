"""Models: LoggedModels as the outputs and inputs of runs, registered versions, aliases and evaluations.

Each model a stage produces is a LoggedModel (its files, params, the run that produced it as an *output*)
registered as a new Model Registry version. The models a stage consumes (a base model, a model under
evaluation) are *inputs* of its run, so MLflow's own graph links model ↔ run ↔ dataset; tags carry only
what MLflow has no field for (an external parent such as ``hf:openai-community/gpt2``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag
from mlflow.entities.logged_model_status import LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from groundup.errors import ModelError
from groundup.tracking.runs import SHA256_INPUT_TAG, TAG, TrackedRun, client, flatten

# On a dataset input taken over from another run (the raw text behind the tokens): that run's id.
RECORDED_BY_INPUT_TAG = TAG + "recorded_by"

PARENT_TAG = TAG + "parent"
DATASET_TAG = TAG + "dataset."
# Set by MLflow on a LoggedModel when it is registered: [{"name": ..., "version": ...}].
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
# How a user finds the versions that do exist.
LIST_VERSIONS = "name one as name, name/version or name@alias; `groundup ui` lists the registered models"


def resolve_version(ref: str) -> ModelVersion:
    """``name`` (latest), ``name/3`` or ``name@alias`` -> the model version; ModelError if there is none."""
    c = client()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return c.get_model_version(name, version)
        versions = c.search_model_versions(f"name='{ref}'")
    except MlflowException as exc:
        detail = " ".join(str(exc.message).split())  # MLflow's message may span lines: the error is one line
        raise ModelError(f"no registered model version {ref!r} ({detail})", fix=LIST_VERSIONS) from None
    if not versions:
        raise ModelError(f"no registered model named {ref!r}", fix=LIST_VERSIONS)
    return max(versions, key=lambda v: int(v.version))


def registered_version(ref: str | None) -> ModelVersion | None:
    """The registered version ``ref`` names, or None for an external model (``hf:...``, ``dir:...``)."""
    if not ref or ":" in ref.split("/", 1)[0]:
        return None
    try:
        return resolve_version(ref)
    except ModelError:
        return None


def version_ref(version: ModelVersion) -> str:
    return f"{version.name}/{version.version}"


def model_id_of(version: ModelVersion) -> str | None:
    """The LoggedModel behind a registered version (its ``models:/<model_id>`` source)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/").split("/", 1)[0] if source.startswith("models:/m-") else None


def version_of_model(model_id: str) -> ModelVersion | None:
    """The registered version of a LoggedModel (what MLflow recorded on it when it was registered)."""
    c = client()
    try:
        model = c.get_logged_model(model_id)
    except MlflowException:
        return None
    registered = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]"))
    for entry in registered:
        try:
            return c.get_model_version(entry["name"], str(entry["version"]))
        except MlflowException:
            continue
    return None


def set_alias(name: str, alias: str, version: str | int) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def alias_target(name: str, alias: str) -> ModelVersion | None:
    """The version ``name@alias`` points at, or None when the alias (or the model) does not exist."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_version_tags(ref: str, tags: Mapping[str, Any]) -> None:
    from groundup.tracking.lineage import refresh_description

    version = resolve_version(ref)
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(version.name, version.version, key, str(value))
    refresh_description(version_ref(version))


def model_directory(ref: str, dst: str | Path | None = None) -> Path:
    """Download (or find locally) the files of a registered model version."""
    version = resolve_version(ref)
    dst = Path(dst or tempfile.mkdtemp(prefix="groundup-model-"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))


def _adopt_datasets(run: TrackedRun, datasets: Mapping[str, str]) -> dict[str, str]:
    """Make the model's datasets inputs of ``run``: one another run of the experiment recorded (the raw text
    behind the tokens the pretraining read) is logged on ``run`` as it was there. Returns those no run
    recorded, which stay tags of the version."""
    c = run._client
    inputs = c.get_run(run.run_id).inputs.dataset_inputs
    have = {i.dataset.digest for i in inputs} | {t.value for i in inputs for t in i.tags if t.key == SHA256_INPUT_TAG}
    unrecorded = {}
    for name, digest in datasets.items():
        if digest in have or digest[:16] in have:
            continue
        # Stage runs only: parent runs list every dataset of their stages.
        query = f"dataset.digest = '{digest[:16]}' AND tags.`{TAG}stage` LIKE '%'"
        found = [r for r in c.search_runs([run.experiment_id], query) if r.info.run_id != run.run_id]
        recorded = [(r.info.run_id, i) for r in found for i in r.inputs.dataset_inputs if i.dataset.digest == digest[:16]]
        if recorded:
            recorder, entry = recorded[-1]  # search_runs lists the newest first: the first run that recorded it
            # That run may itself have adopted it (another pipeline on this store at the same moment): point at
            # the run that recorded it first, and give the input one recorded_by tag (MLflow's key is unique).
            recorder = next((t.value for t in entry.tags if t.key == RECORDED_BY_INPUT_TAG), recorder)
            tags = [*(t for t in entry.tags if t.key != RECORDED_BY_INPUT_TAG), InputTag(RECORDED_BY_INPUT_TAG, recorder)]
            run.log_dataset_inputs([DatasetInput(entry.dataset, tags)])
        else:
            unrecorded[name] = digest
    return unrecorded


def register_directory(
    run: TrackedRun,
    directory: str | Path,
    name: str,
    *,
    parent: str | None = None,
    datasets: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    model_type: str = "groundup",
) -> ModelVersion:
    """Log ``directory`` as an output LoggedModel of ``run`` and register it as a new version of ``name``.

    ``parent`` is the model it was derived from: a registered version (``"gpt2-124m/1"``), which becomes a
    model input of the run, or an external id (``"hf:microsoft/phi-2"``). ``datasets`` (names to sha256
    digests) become dataset inputs of the run. The version's description links the whole chain.
    """
    from groundup.tracking.lineage import refresh_description

    c = run._client
    parent_version = registered_version(parent)
    if parent_version is not None:
        run.log_model_inputs([model_id_of(parent_version)])
    unrecorded = _adopt_datasets(run, datasets or {})
    model_tags = {
        **({PARENT_TAG: parent} if parent else {}),
        **{DATASET_TAG + k: v for k, v in unrecorded.items()},
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    model = c.create_logged_model(
        experiment_id=run.experiment_id,
        name=name,
        source_run_id=run.run_id,
        tags=model_tags,
        params={k: str(v)[:6000] for k, v in flatten(params or {}).items()},
        model_type=model_type,
    )
    try:
        c.log_model_artifacts(model.model_id, str(directory))
    except Exception:
        c.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    run.log_model_outputs([model.model_id])
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=model_tags)
    run.set_tags({f"{TAG}registered.{name}": version.version})
    refresh_description(version_ref(version))
    if parent_version is not None:
        refresh_description(version_ref(parent_version))  # it lists the models derived from it
    return version


def log_versions_used(run: TrackedRun, refs: list[str | None]) -> None:
    """Make the registered versions ``refs`` (``name/3``; ``None`` skipped) model inputs of ``run``."""
    run.log_model_inputs([model_id_of(resolve_version(ref)) for ref in refs if ref])


def record_evaluation(ref: str, run: TrackedRun, metrics: Mapping[str, float]) -> None:
    """Attach an evaluation to a model version: the model an input of ``run``, the metrics on the model."""
    from groundup.tracking.lineage import refresh_description

    version = resolve_version(ref)
    model_id = model_id_of(version)
    values = {key: float(value) for key, value in metrics.items() if value is not None}
    if model_id:
        run.log_model_inputs([model_id])
        if values:
            mlflow.log_metrics(values, run_id=run.run_id, model_id=model_id)
    else:  # registered before LoggedModels: the run alone keeps the numbers
        run.log_metrics(values)
    run.set_tags({TAG + "evaluates": version_ref(version)})
    refresh_description(version_ref(version))
    parent = registered_version(version.tags.get(PARENT_TAG))
    if parent is not None:
        refresh_description(version_ref(parent))  # it lists how the models derived from it scored
