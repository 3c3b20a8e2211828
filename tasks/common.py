"""What every Prefect task shares: content-addressed cache keys, tracked stage runs, artifacts, progress.

Tasks are thin: they call a library function with paths and settings, and add caching, retries,
MLflow runs and Prefect artifacts around it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from groundup import tracking
from groundup.errors import SourceUnreachable
from groundup.files import sha256_file, sha256_tree
from groundup.model import loading

# Adapters whose base checkpoint exists only as a registered version fetch it through the tracking layer.
loading.use_registry(tracking.model_directory)

# Parameters that say where to log, not what to compute: never part of a cache key.
UNKEYED = {"parent_run_id", "experiment", "tracking_uri"}
# Parameters that say where outputs go: keyed by their path. Their contents change with every run (mlflow.db,
# results) and may be gigabytes, so hashing them would make every call a slow cache miss.
LOCATIONS = {"output_dir", "out_dir"}


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A task's ``retry_condition_fn``: retry only a source that failed for a reason that may pass (a
    timeout, a 5xx); a name that does not resolve, a refused connection or bad input fails the same way again."""
    try:
        state.result()
    except SourceUnreachable as exc:
        return exc.transient
    except Exception:
        return False
    return False


def fingerprint(value: Any) -> Any:
    """Content for paths that exist (so a changed byte is a miss and a moved file a hit), values otherwise."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a stage result: its paths' contents
        return fingerprint(dataclasses.asdict(value))
    if isinstance(value, Path) or (isinstance(value, str) and "\n" not in value and len(value) < 4096):
        path = Path(value)
        try:
            if path.is_file():
                return {"file_sha256": sha256_file(path)}
            if path.is_dir():
                return {"tree_sha256": sha256_tree(path)}
        except OSError:
            pass
        return str(value)
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [fingerprint(v) for v in value]
    return value


def source_digest(fn: Callable[..., Any]) -> str:
    """sha256 of a task function's source (its name where the source cannot be read): changed code, a miss."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = fn.__qualname__
    return hashlib.sha256(source.encode()).hexdigest()


def content_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key from the task's source code and the *contents* of its inputs (files hashed, not paths)."""
    payload = {
        "task": context.task.name,
        "source": source_digest(context.task.fn),
        "inputs": {
            k: str(Path(v).resolve()) if k in LOCATIONS and v is not None else fingerprint(v)
            for k, v in sorted(parameters.items())
            if k not in UNKEYED
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    config: Any = None,
    parent_run_id: str | None = None,
    output_dir: str | Path = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> Iterator[tracking.TrackedRun]:
    """A nested MLflow run for one stage, tagged with the current Prefect flow run."""
    with tracking.start_run(
        stage,
        experiment=experiment,
        output_dir=output_dir,
        parent_run_id=parent_run_id,
        stage=stage,
        config=config,
        tags=tracking.flow_run_tags(),
    ) as run:
        yield run


def png_markdown(png: str | Path, alt: str = "plot") -> str:
    """Inline a PNG into markdown (Prefect artifacts have no file storage of their own)."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def progress_reporter(description: str, min_interval: float = 2.0) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that keeps a Prefect progress artifact up to date (throttled)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(progress=0.0, description=description)
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval:
            return
        last[0] = now
        update_progress_artifact(artifact_id, progress=100.0 * done / max(total, 1))

    return report


def content_key_with(*fields: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """:func:`content_key` that also hashes the files or directories named by settings fields, given as
    ``"parameter.field"`` (e.g. ``"config.source"``): inside a settings model a path is just a string to
    ``content_key``, so an edited local file would otherwise be a cache hit."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        named = {}
        for dotted in fields:
            parameter, _, attribute = dotted.partition(".")
            value = parameters.get(parameter)
            for part in filter(None, attribute.split(".")):
                value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
            named[f"content of {dotted}"] = value
        return content_key(context, {**parameters, **named})

    return key


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What every stage of a flow run shares: the output root, the MLflow experiment and the parent run the
    stage runs nest under. Tasks take them as three parameters (``output_dir`` is where outputs go on the
    machine that runs the task, so placement swaps it per worker; ``experiment`` and ``parent_run_id`` stay
    out of cache keys); flows build one context and pass ``**context.kwargs``."""

    output_dir: str
    experiment: str
    parent_run_id: str | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "experiment": self.experiment, "parent_run_id": self.parent_run_id}


@dataclasses.dataclass
class StageResult:
    """Base of the typed results tasks hand to flows (and flows to their callers): locations (paths,
    registered versions), run ids and numbers, never in-memory objects, so a result means the same in
    another process or on another machine. Defined at module level: Prefect pickles persisted results."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (nested results as dicts), for ``--json`` output and flow run pages."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, StageResult):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def hf_token(secret_name: str | None) -> str | None:
    """The Hugging Face token: the named Prefect Secret block if one is configured, else ``$HF_TOKEN``."""
    if secret_name:
        from prefect.blocks.system import Secret

        return Secret.load(secret_name).get()
    return os.environ.get("HF_TOKEN") or None
