"""Stages placed on work pools: ``pipeline.placement: {finetune: groundup-gpu}``.

A placed stage runs as a flow run of the deployment ``groundup-stage/<pool>`` (one per work pool, registered
by ``groundup deploy --pool POOL``), started with ``run_deployment`` from a task of the pipeline run, so the
Prefect UI shows it as that task's child. The stage's task and its arguments travel as parameters: settings
as JSON (accelerator, devices and precision with them), and every file or directory argument as a URL in the
artifact store, since the worker shares no filesystem with the pipeline. On the worker, ``run_stage``
downloads those into its own cache, calls the task (cached on content like any other), publishes the
files and directories the task returned to the store and returns their URLs; the pipeline side fetches
them into its cache and hands local paths on to the next stage. Unplaced stages run in-process as before.

Cache hits hold on any worker: a finished placed stage records its published result in the store under a
digest of what defines it (the task, its code, its arguments as URLs and JSON), and a later run of the same
stage on any worker finds that record first and hands the URLs back (state ``Cached``) without computing
or even downloading anything. Prefect's own cache key of a task cannot do that across workers: it holds the
worker's output directory, and the result it caches holds that worker's local paths.

A worker that dies mid-stage (its machine gone, ``SIGKILL``) leaves its flow run Running; the cluster's
heartbeat automation marks it Crashed (``groundup.cluster``) and :func:`dispatch` then starts the stage
again, once, on whichever worker of the pool is up; finetuning resumes there from the checkpoint it kept
in the store (``tasks/finetune.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import typing
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.deployments.runner import EntrypointType
from prefect.states import Completed

from groundup import environment, store
from groundup.config import Settings
from groundup.errors import GroundupError, ModelError, SourceUnreachable
from groundup.tasks.common import UNKEYED, StageResult, fingerprint, retry_if_transient, source_digest

STAGE_FLOW = "groundup-stage"
# Where a worker keeps placed stages' outputs: the worker's own setting (a flow run's working directory is a
# temporary one chosen by Prefect), else ./groundup-work. The shared location is the artifact store.
WORK_DIR_ENV = "GROUNDUP_WORK_DIR"
WORKER_OUTPUT_DIR = "groundup-work"
# Parameters that say where things go on the machine that runs the stage: each side fills in its own.
LOCAL_PARAMETERS = {"output_dir"}
# A placed stage whose worker crashed runs again this many times (then the pipeline fails with the crash).
CRASH_RETRIES = 1
# How often the dispatching task reads its stage's flow run state (run_deployment's default is 5 s): the
# pipeline goes on at most this long after a placed stage ends.
DISPATCH_POLL_SECONDS = 1


def task_path(stage_task: Task) -> str:
    return f"{stage_task.fn.__module__}:{stage_task.fn.__name__}"


def load_task(path: str) -> Task:
    module, _, name = path.partition(":")
    found = getattr(importlib.import_module(module), name, None)
    if not isinstance(found, Task) or not module.startswith("groundup."):
        raise ModelError(f"{path!r} is not a groundup task", fix="place only pipeline stages")
    return found


def artifact_store(output_dir: str | Path) -> store.ArtifactStore:
    """The configured store; without one, a folder under ``output_dir`` (placement on one machine)."""
    configured = store.from_environment(output_dir)
    return configured or store.ArtifactStore(Path(output_dir) / "store", Path(output_dir) / "store-cache")


def transform(value: Any, leaf, rebuild=dataclasses.replace) -> Any:
    """``value`` with ``leaf`` applied to every string or path inside dicts, lists and stage results
    (dataclasses); ``rebuild(result, **fields)`` makes each result anew from its transformed fields (by
    default the same type)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: transform(getattr(value, f.name), leaf, rebuild) for f in dataclasses.fields(value) if f.init
        }
        return rebuild(value, **fields)
    if isinstance(value, dict):
        return {k: transform(v, leaf, rebuild) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [transform(v, leaf, rebuild) for v in value]
    return leaf(value)


def to_urls(value: Any, artifacts: store.ArtifactStore) -> Any:
    """Settings as JSON, existing local files and directories as store URLs."""

    def leaf(item: Any) -> Any:
        if isinstance(item, Settings):
            return item.model_dump(mode="json")
        if isinstance(item, str | Path) and os.path.isabs(item) and Path(item).exists():
            return artifacts.put(item)
        return item

    return transform(value, leaf)


def to_paths(value: Any, artifacts: store.ArtifactStore) -> Any:
    """Store URLs as local copies in this machine's cache."""
    return transform(value, lambda item: str(artifacts.get(item, wait=60)) if artifacts.owns(item) else item)


def missing_outputs(result: Any) -> list[str]:
    """Absolute paths in a task's result that do not exist here: a cached result from another machine."""
    missing: list[str] = []

    def leaf(item: Any) -> Any:
        if isinstance(item, str) and os.path.isabs(item) and "\n" not in item and not Path(item).exists():
            missing.append(item)
        return item

    transform(result, leaf)
    return missing


def bind(stage_task: Task, arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments received as JSON, with settings and stage results (an earlier stage's) rebuilt as such."""
    hints = typing.get_type_hints(stage_task.fn)
    bound = {}
    for name, value in arguments.items():
        hint = hints.get(name)
        if isinstance(hint, type) and isinstance(value, dict) and issubclass(hint, Settings):
            value = hint.model_validate(value)
        elif isinstance(hint, type) and isinstance(value, dict) and issubclass(hint, StageResult):
            value = hint(**value)
        bound[name] = value
    return bound


def to_json(value: Any) -> Any:
    """A stage result (URLs inside) as JSON: dataclasses tagged with their class, restored by :func:`from_json`."""

    def tagged(result: Any, /, **fields: Any) -> dict[str, Any]:
        kind = type(result)
        return {"__dataclass__": f"{kind.__module__}:{kind.__qualname__}", "fields": fields}

    return transform(value, lambda item: item, rebuild=tagged)


def from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__dataclass__" in value:
        module, _, name = value["__dataclass__"].partition(":")
        if not module.startswith("groundup."):
            raise ModelError(f"a stage record names the class {value['__dataclass__']!r}, not a groundup result")
        kind = getattr(importlib.import_module(module), name)
        return kind(**{k: from_json(v) for k, v in value["fields"].items()})
    if isinstance(value, dict):
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def stage_key(stage_task: Task, arguments: dict[str, Any]) -> str:
    """What defines a placed stage's result, on any machine: the task, its code and its arguments as they
    travel (store URLs are content-addressed, settings are JSON; where to log is left out). A local file a
    setting names (a shared filesystem) counts by its content, as in the task's own cache key."""
    keyed = {name: value for name, value in arguments.items() if name not in UNKEYED}
    payload = {"task": task_path(stage_task), "source": source_digest(stage_task.fn), "arguments": fingerprint(keyed)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def published_result(artifacts: store.ArtifactStore, key: str) -> Any | None:
    """The result a run of this stage published earlier, on any worker, if every artifact of it is still in
    the store; else None."""
    record = artifacts.read_record(f"stages/{key}")
    if record is None:
        return None
    urls: list[str] = []
    transform(record["result"], lambda item: urls.append(item) if artifacts.owns(item) else None)
    if not all(artifacts.exists(url) for url in urls):
        return None
    return from_json(record["result"])


@task(cache_policy=NO_CACHE)
def reuse_published(result: Any, key: str) -> Any:
    """Stands for the stage on a cache hit through the store, so its flow run shows the stage as Cached."""
    return Completed(data=result, name="Cached", message=f"outputs published earlier (stage record {key[:16]})")


@flow(name=STAGE_FLOW, log_prints=True)
def run_stage(stage: str, task_path: str, arguments: dict[str, Any], output_dir: str | None = None) -> dict:
    """One pipeline stage on this worker: its inputs fetched from the store, its outputs published there;
    a stage some worker already ran with these arguments is a cache hit without computing anything."""
    out = str(environment.prepare(output_dir or os.environ.get(WORK_DIR_ENV) or WORKER_OUTPUT_DIR))
    artifacts = artifact_store(out)
    stage_task = load_task(task_path)
    key = stage_key(stage_task, arguments)
    published = published_result(artifacts, key)
    if published is not None:
        reuse_published.with_options(task_run_name=stage)(published, key)
        return {"result": published, "state": "Cached"}
    inputs = bind(stage_task, to_paths(arguments, artifacts))
    inputs.update({name: out for name in LOCAL_PARAMETERS if name in inspect.signature(stage_task.fn).parameters})
    state = stage_task.with_options(task_run_name=stage)(**inputs, return_state=True)
    result = state.result()
    if missing_outputs(result):  # cached on another machine, whose files are not here: compute them
        get_run_logger().info("%s: cached outputs are not on this worker; computing them", stage)
        state = stage_task.with_options(task_run_name=stage, refresh_cache=True)(**inputs, return_state=True)
        result = state.result()
    published = to_urls(result, artifacts)
    artifacts.write_record(f"stages/{key}", {"stage": stage, "task": task_path, "result": to_json(published)})
    return {"result": published, "state": state.name}


@task(cache_policy=NO_CACHE, retries=CRASH_RETRIES, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def dispatch(stage: str, pool: str, task_path: str, arguments: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Run a stage as a flow run of ``groundup-stage/<pool>`` (a child of this task run) and wait for it;
    returns the stage's result (local paths) and where it ran (with the store URLs it exchanged)."""
    artifacts = artifact_store(output_dir)
    parameters = {"stage": stage, "task_path": task_path, "arguments": to_urls(arguments, artifacts)}
    flow_run = run_deployment(
        f"{STAGE_FLOW}/{pool}", parameters=parameters, timeout=None, as_subflow=True,
        flow_run_name=f"{stage} on {pool}", poll_interval=DISPATCH_POLL_SECONDS,
    )  # fmt: skip
    if flow_run.state.is_crashed():  # the worker died (no heartbeat): worth running again on another one
        raise SourceUnreachable(
            f"stage {stage} on work pool {pool}: the worker crashed ({flow_run.state.message})",
            fix=f"start a worker of {pool} again (prefect worker start --pool {pool})", transient=True,
        )  # fmt: skip
    if not flow_run.state.is_completed():
        raise GroundupError(f"stage {stage} on work pool {pool}: {flow_run.state.name}: {flow_run.state.message}")
    reply = flow_run.state.result()
    placement = {"pool": pool, "flow_run_id": str(flow_run.id), "state": reply["state"], "artifacts": reply["result"]}
    return {"result": to_paths(reply["result"], artifacts), "placement": placement}


def submit_placed(stage: str, pool: str, stage_task: Task, args: tuple, kwargs: dict, output_dir: str):
    """Submit ``stage_task(*args, **kwargs)`` to run on ``pool``; returns the dispatching task's future."""
    arguments = dict(inspect.signature(stage_task.fn).bind(*args, **kwargs).arguments)
    for name in LOCAL_PARAMETERS:
        arguments.pop(name, None)
    return dispatch.with_options(task_run_name=stage).submit(stage, pool, task_path(stage_task), arguments, output_dir)


def stage_deployment(pool: str, output_dir: str | None = None):
    """The deployment placed stages of ``pool`` run as (named after the pool)."""
    parameters = {"output_dir": output_dir} if output_dir else {}
    return run_stage.to_deployment(
        name=pool, parameters=parameters, description=f"Pipeline stages placed on the work pool {pool}.",
        tags=["groundup", "placement"], entrypoint_type=EntrypointType.MODULE_PATH,
    )  # fmt: skip
