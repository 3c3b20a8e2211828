"""Multi-device training in a subprocess of its own.

Lightning Fabric starts the extra processes of a multi-device run by re-executing the current command
(``sys.argv``) once per device. Run from a Prefect flow, a CLI command or pytest, that would re-run the
flow, the command or the test suite. So a multi-device job runs as ``python -m groundup.train.launch
module:function job.json result.json``: a command whose re-execution is exactly "run this function with
these keyword arguments", on every rank. The function returns a JSON-able result on global rank zero and
``None`` elsewhere; the parent reads the result file.

A single-device CPU run started from a worker thread (a Prefect task) goes the same way, so that it trains
on a main thread, where glibc keeps freed memory (:mod:`groundup.train.cpu_memory`).

The launched process reports as it goes: :func:`send_event` appends a JSON line to a file the parent
follows, and ``run_launched(..., on_event=...)`` hands each line to the parent's callback while the child
runs (training's hooks: evaluations, progress, checkpoints).

``num_nodes > 1`` needs the same command started on every node by a cluster launcher (SLURM, torchrun
environment variables); this module covers the devices of one node.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from groundup.errors import GroundupError
from groundup.files import write_json

LAUNCHED_ENV = "GROUNDUP_LAUNCHED"
EVENTS_ENV = "GROUNDUP_LAUNCH_EVENTS"  # the file send_event appends to


class LaunchError(GroundupError, RuntimeError):
    """The launched training process failed; its own output (above) says why."""


def is_launched() -> bool:
    """True inside a process started by :func:`run_launched` (and the ranks Fabric starts from it)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def launch_command(target: str, job_file: Path, result_file: Path) -> list[str]:
    return [sys.executable, "-m", "groundup.train.launch", target, str(job_file), str(result_file)]


def run_launched(
    target: str,
    kwargs: Mapping[str, Any],
    work_dir: str | Path,
    timeout: float | None = None,
    on_event: Callable[[str, Any], None] | None = None,
) -> Any:
    """Run ``target`` (``"package.module:function"``) with ``kwargs`` in a fresh process; return its result.

    ``on_event(kind, payload)`` is called here, while the child runs, for each :func:`send_event` there."""
    _resolve(target)  # a typo fails here, not in a child process
    work_dir = Path(work_dir)
    job_file, result_file = work_dir / "launch-job.json", work_dir / "launch-result.json"
    events_file = work_dir / "launch-events.jsonl"
    write_json(job_file, dict(kwargs))
    result_file.unlink(missing_ok=True)
    events_file.write_text("", encoding="utf-8")
    env = {**os.environ, LAUNCHED_ENV: "1", EVENTS_ENV: str(events_file)}
    events = _EventFollower(events_file, on_event)
    child = subprocess.Popen(launch_command(target, job_file, result_file), env=env)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while child.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(child.args, timeout)
            events.deliver()
            time.sleep(0.2)
    finally:
        if child.poll() is None:  # timed out, a hook raised, or the parent is interrupted: end the run too
            child.kill()
            child.wait()
    events.deliver()
    if child.returncode != 0:
        raise LaunchError(f"{target} exited with status {child.returncode} (see its output above)")
    if not result_file.is_file():
        raise LaunchError(f"{target} finished without writing {result_file}")
    return json.loads(result_file.read_text(encoding="utf-8"))


def send_event(kind: str, payload: Any) -> None:
    """In a launched process: report ``payload`` (JSON-able) to the parent's ``on_event``; elsewhere nothing."""
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as events:
            events.write(json.dumps({"kind": kind, "payload": payload}) + "\n")


class _EventFollower:
    """Reads the complete lines the child has appended since the last call and hands them on."""

    def __init__(self, path: Path, on_event: Callable[[str, Any], None] | None) -> None:
        self.path, self.on_event, self.offset = path, on_event, 0

    def deliver(self) -> None:
        if self.on_event is None:
            return
        with open(self.path, "rb") as events:
            events.seek(self.offset)
            data = events.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            event = json.loads(line)
            self.on_event(event["kind"], event["payload"])


def _resolve(target: str):
    module_name, sep, function_name = target.partition(":")
    if not sep:
        raise ValueError(f"launch target {target!r} must look like 'package.module:function'")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"launch target {target!r}: {module_name} has no function {function_name!r}")
    return function


def _exit_with_parent() -> None:
    """End this process when the one that started it is gone (a worker killed mid-run): an orphaned run
    would go on writing the run directory that the resumed run is about to use."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    target, job_file, result_file = argv if argv is not None else sys.argv[1:]
    _exit_with_parent()
    kwargs = json.loads(Path(job_file).read_text(encoding="utf-8"))
    result = _resolve(target)(**kwargs)
    if result is not None:
        write_json(result_file, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
