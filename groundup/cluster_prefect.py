"""The Prefect side of ``groundup cluster``: the work pools, the result storage block, the automation that
marks flow runs of dead workers Crashed, and the workers themselves.

On real machines, :func:`configure_prefect` is the one-time setup of a Prefect server for groundup (with
the environment of :func:`groundup.cluster.client_environment`), and :func:`start_worker`'s command line
is what each worker machine runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from groundup import serving
from groundup.errors import GroundupError
from groundup.serving import Server

POOLS = ("groundup-cpu", "groundup-gpu")
RESULTS_BLOCK = "groundup-results"
CRASH_AUTOMATION = "groundup: crash flow runs without heartbeats"
# Prefect's smallest heartbeat interval; a run is declared crashed after three missed beats.
HEARTBEAT_SECONDS = 30
CRASH_AFTER_SECONDS = 90
# How often a worker asks its pool for runs (Prefect's default is 10 s). A triggered pipeline and each stage
# it places wait for the next query, so every hand-over cost 5 s on average; one small request every 2 s
# per worker is nothing to a server.
WORKER_POLL_SECONDS = 2


class ClusterError(GroundupError):
    """A part of the rehearsal that could not start (its log tail is in the message)."""


def configure_prefect(env: dict[str, str], results: str, crash_after_seconds: float = CRASH_AFTER_SECONDS) -> None:
    """The work pools, the result storage block and the crash automation, through the Prefect server's API
    (a subprocess, so this process's own Prefect settings stay untouched). The automation is the one of
    Prefect's guide to zombie flow runs: after a heartbeat, expect another heartbeat or a final state within
    ``crash_after_seconds``, per flow run, else set that run Crashed."""
    script = f"""
from datetime import timedelta
from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.filesystems import RemoteFileSystem
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from groundup.store import storage_options
RemoteFileSystem(basepath={results!r}, settings=storage_options({results!r})).save({RESULTS_BLOCK!r}, overwrite=True)
with get_client(sync_client=True) as client:
    for pool in {POOLS!r}:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
try:
    Automation.read(name={CRASH_AUTOMATION!r}).delete()
except (ObjectNotFound, ValueError):
    pass
Automation(
    name={CRASH_AUTOMATION!r},
    trigger=EventTrigger(
        after={{"prefect.flow-run.heartbeat"}},
        expect={{"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}},
        match=ResourceSpecification({{"prefect.resource.id": ["prefect.flow-run.*"]}}),
        for_each={{"prefect.resource.id"}}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds={float(crash_after_seconds)!r}),
    ),
    actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat for {crash_after_seconds:.0f} s: its worker is gone")],
).create()
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ClusterError(f"configuring the Prefect server failed:\n{done.stderr[-2000:]}")


def start_worker(pool: str, workdir: Path, logs: Path, env: dict[str, str]) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **env, "PREFECT_HOME": str(workdir / ".prefect"), "GROUNDUP_STORE_CACHE": str(workdir / "store-cache"),
        "GROUNDUP_WORK_DIR": str(workdir / "groundup-work"),
    }  # fmt: skip
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", f"{pool}-worker"]
    log = logs / f"worker-{pool}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        process = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return Server(f"worker-{pool}", process.pid, "", "", str(log), f"--pool {pool}")


def wait_for_workers(
    api_url: str, pools: tuple[str, ...], servers: dict[str, Server], timeout: float = 300.0, since: float = 0.0
) -> None:
    """Until every pool has an online worker (a worker heartbeats once it has started); ``since``: a
    heartbeat after this time (a restarted worker, whose record the dead one left ONLINE for a while)."""
    import urllib.request
    from datetime import datetime

    deadline = time.monotonic() + timeout
    waiting = set(pools)
    while waiting:
        for pool in list(waiting):
            request = urllib.request.Request(
                f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as response:
                workers = json.loads(response.read())
                if any(
                    w["status"] == "ONLINE" and w["last_heartbeat_time"] and datetime.fromisoformat(w["last_heartbeat_time"]).timestamp() > since
                    for w in workers
                ):
                    waiting.discard(pool)
        worker = next((servers[f"worker-{p}"] for p in waiting if not servers[f"worker-{p}"].alive()), None)
        if worker:
            raise ClusterError(f"the {worker.name} exited:\n{serving._tail(worker.log)}")
        if waiting and time.monotonic() > deadline:
            raise ClusterError(f"no worker of {sorted(waiting)} came online in {timeout:.0f} s")
        time.sleep(2)
