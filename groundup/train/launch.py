"""Multi-device training in a subprocess of its own.

Lightning Fabric starts the extra processes of a multi-device run by re-executing the current command
(``sys.argv``) once per device. Run from a Prefect flow, a CLI command or pytest, that would re-run the
flow, the command or the test suite. So a multi-device job runs as ``python -m groundup.train.launch
module:function job.json result.json``: a command whose re-execution is exactly "run this function with
these keyword arguments", on every rank. The function returns a JSON-able result on global rank zero and
``None`` elsewhere; the parent reads the result file.

``num_nodes > 1`` needs the same command started on every node by a cluster launcher (SLURM, torchrun
environment variables); this module covers the devices of one node.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from groundup.errors import GroundupError
from groundup.files import write_json

LAUNCHED_ENV = "GROUNDUP_LAUNCHED"


class LaunchError(GroundupError, RuntimeError):
    """The launched training process failed; its own output (above) says why."""


def is_launched() -> bool:
    """True inside a process started by :func:`run_launched` (and the ranks Fabric starts from it)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def launch_command(target: str, job_file: Path, result_file: Path) -> list[str]:
    return [sys.executable, "-m", "groundup.train.launch", target, str(job_file), str(result_file)]


def run_launched(target: str, kwargs: Mapping[str, Any], work_dir: str | Path, timeout: float | None = None) -> Any:
    """Run ``target`` (``"package.module:function"``) with ``kwargs`` in a fresh process; return its result."""
    _resolve(target)  # a typo fails here, not in a child process
    work_dir = Path(work_dir)
    job_file, result_file = work_dir / "launch-job.json", work_dir / "launch-result.json"
    write_json(job_file, dict(kwargs))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    completed = subprocess.run(launch_command(target, job_file, result_file), env=env, timeout=timeout, check=False)
    if completed.returncode != 0:
        raise LaunchError(f"{target} exited with status {completed.returncode} (see its output above)")
    if not result_file.is_file():
        raise LaunchError(f"{target} finished without writing {result_file}")
    return json.loads(result_file.read_text(encoding="utf-8"))


def _resolve(target: str):
    module_name, sep, function_name = target.partition(":")
    if not sep:
        raise ValueError(f"launch target {target!r} must look like 'package.module:function'")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"launch target {target!r}: {module_name} has no function {function_name!r}")
    return function


def main(argv: list[str] | None = None) -> int:
    target, job_file, result_file = argv if argv is not None else sys.argv[1:]
    kwargs = json.loads(Path(job_file).read_text(encoding="utf-8"))
    result = _resolve(target)(**kwargs)
    if result is not None:
        write_json(result_file, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
