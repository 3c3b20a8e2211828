"""Long-running processes: the Prefect and MLflow servers behind ``groundup ui``.

``start_background_prefect`` starts the Prefect server alone, the first time a command needs Prefect, and
later commands reuse it: each then starts in seconds instead of waiting 20-60 s for a temporary server.
``start_ui`` launches both servers on 127.0.0.1, each in its own process group with its log under
``<output_dir>/servers/``, and records their pids and URLs in ``<output_dir>/servers.json``.
``groundup.environment.prepare`` reads that file, so every later run (CLI, served deployment, worker on
this machine) reports to those servers instead of the embedded defaults. ``stop_ui`` ends exactly the
process groups it recorded. Nothing here imports Prefect or MLflow: the servers are their own CLIs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from groundup.errors import GroundupError
from groundup.files import exclusive_lock, write_json

STATE_FILE = "servers.json"
HOST = "127.0.0.1"
# The tools' usual ports when they are free, so URLs stay the same between sessions.
PREFERRED_PORTS = {"prefect": 4200, "mlflow": 5000}


class ServerError(GroundupError, RuntimeError):
    """A server that did not come up (its log tail is in the message)."""


@dataclass
class Server:
    name: str
    pid: int
    url: str
    health_url: str
    log: str
    # Part of the recorded command line: a pid reused by another program is never signalled.
    marker: str

    def alive(self) -> bool:
        return self.marker in (_command_of(self.pid) or "")


# ---------------------------------------------------------------------------------------------------------
# State file
# ---------------------------------------------------------------------------------------------------------


def _lock_path(out: Path) -> Path:
    return out / "servers" / ".lock"


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / STATE_FILE


def recorded_servers(output_dir: str | Path) -> dict[str, Server]:
    """The servers ``start_ui`` recorded for ``output_dir`` (alive or not)."""
    path = state_path(output_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: Server(**entry) for name, entry in data.items()}
    except (json.JSONDecodeError, TypeError) as exc:
        raise ServerError(f"{path}: not a groundup server state file ({exc}); delete it") from None


def running_servers(output_dir: str | Path) -> dict[str, Server]:
    return {name: server for name, server in recorded_servers(output_dir).items() if server.alive()}


def server_environment(output_dir: str | Path) -> dict[str, str]:
    """Environment that points Prefect and MLflow clients at the running ``groundup ui`` servers."""
    servers = running_servers(output_dir)
    env = {}
    if "prefect" in servers:
        env["PREFECT_API_URL"] = servers["prefect"].url.rstrip("/") + "/api"
    if "mlflow" in servers:
        env["MLFLOW_TRACKING_URI"] = servers["mlflow"].url
    return env


def link_flow_runs(node: dict | None, output_dir: str | Path) -> None:
    """Give a lineage tree's flow runs a URL on the running ``groundup ui`` Prefect server, where the run
    recorded none (runs on the embedded API have no UI to link to)."""
    prefect = running_servers(output_dir).get("prefect")
    while prefect and node:
        if node.get("flow_run_id") and not node.get("flow_run_url"):
            node["flow_run_url"] = f"{prefect.url}/runs/flow-run/{node['flow_run_id']}"
        node = node.get("parent")


# ---------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------


def _command_of(pid: int) -> str | None:
    """The command line of a live process, or None (``ps`` works on Linux and macOS alike)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    result = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
    return result.stdout.strip() or None


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None) -> int:
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: str | Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_healthy(server: Server, process: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(server.health_url):
            return
        if process is not None and process.poll() is not None:
            raise ServerError(f"the {server.name} server exited with code {process.returncode}:\n{_tail(server.log)}")
        time.sleep(1.0)
    raise ServerError(f"the {server.name} server did not answer {server.health_url} in {timeout:.0f} s:\n{_tail(server.log)}")


def _launch(name: str, argv: list[str], env: dict[str, str], log: Path, url: str, health: str, marker: str):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        # A session of its own: the server and everything it spawns form one process group to end.
        process = subprocess.Popen(
            argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return Server(name, process.pid, url, health, str(log), marker), process


def _bin(tool: str) -> str:
    """The console script installed beside this interpreter (the venv's), else whatever PATH has."""
    candidate = Path(sys.executable).parent / tool
    return str(candidate) if candidate.exists() else tool


def launch_prefect(out: Path, port: int) -> tuple[Server, subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # The same PREFECT_HOME as embedded runs use, so the UI shows their history too.
    env.setdefault("PREFECT_HOME", str(out / "prefect"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    url = f"http://{HOST}:{port}"
    # The browser UI asks this URL for the API; Prefect assumes port 4200 unless told.
    env["PREFECT_UI_API_URL"] = f"{url}/api"
    argv = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return _launch("prefect", argv, env, out / "servers" / "prefect.log", url, f"{url}/api/health", f"--port {port}")


def launch_mlflow(out: Path, port: int) -> tuple[Server, subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The server's job runner needs extra services and is not used here.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    url = f"http://{HOST}:{port}"
    argv = [
        _bin("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{(out / 'mlflow.db').as_posix()}",
        "--artifacts-destination", (out / "mlartifacts").as_uri(),
    ]  # fmt: skip
    return _launch("mlflow", argv, env, out / "servers" / "mlflow.log", url, f"{url}/health", f"--port {port}")


def start_ui(output_dir: str | Path = "artifacts", timeout: float = 300.0) -> dict[str, Server]:
    """Start whichever of the two servers is not already running for ``output_dir``; record both."""
    out = Path(output_dir).resolve()
    with exclusive_lock(_lock_path(out)):  # two commands at once start one set of servers
        return _start_ui(out, timeout)


def _start_ui(out: Path, timeout: float) -> dict[str, Server]:
    servers = running_servers(out)
    started: list[tuple[Server, subprocess.Popen]] = []
    try:
        for name, launch in (("prefect", launch_prefect), ("mlflow", launch_mlflow)):
            if name not in servers:
                started.append(launch(out, free_port(PREFERRED_PORTS[name])))
        for server, process in started:
            wait_until_healthy(server, process, timeout)
            servers[server.name] = server
    except BaseException:
        for server, _ in started:
            terminate(server)
        raise
    write_json(state_path(out), {name: asdict(server) for name, server in servers.items()})
    return servers


def terminate(server: Server, grace: float = 20.0) -> bool:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
    if not server.alive():
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # reap it if this process started it
                os.waitpid(server.pid, os.WNOHANG)
            if not server.alive():  # gone, or a zombie of a parent that has not reaped it yet
                return True
            time.sleep(0.2)
    return True


def start_background_prefect(
    output_dir: str | Path = "artifacts", timeout: float = 300.0, announce: Callable[[], None] | None = None
) -> tuple[Server, bool]:
    """The Prefect server recorded for ``output_dir`` (by ``groundup ui`` or an earlier command), else a new
    one started in the background and recorded beside the others; returns it and whether it is new.

    It outlives this process on purpose (``groundup ui --stop`` ends it), so the next command connects to it
    instead of starting Prefect's temporary server again. ``announce`` is called just before a start."""
    out = Path(output_dir).resolve()
    # Two first commands at once (a schedule and a person, two terminals): the second waits for the first
    # one's server instead of starting another and recording it over the first.
    with exclusive_lock(_lock_path(out)):
        return _start_background_prefect(out, timeout, announce)


def _start_background_prefect(out: Path, timeout: float, announce: Callable[[], None] | None) -> tuple[Server, bool]:
    servers = running_servers(out)
    if "prefect" in servers:
        return servers["prefect"], False
    if announce:
        announce()
    # A port the kernel picks, not Prefect's usual 4200: another server that takes 4200 meanwhile (a second
    # checkout's) would answer our health checks while ours fails to bind, and be recorded as ours.
    server, process = launch_prefect(out, free_port())
    try:
        wait_until_healthy(server, process, timeout)
    except BaseException:
        terminate(server)
        raise
    # Re-read: another command may have recorded an MLflow server meanwhile.
    servers = {**running_servers(out), "prefect": server}
    write_json(state_path(out), {name: asdict(s) for name, s in servers.items()})
    return server, True


def stop_ui(output_dir: str | Path = "artifacts") -> list[Server]:
    """End the servers ``start_ui`` recorded for ``output_dir``; returns those that were running."""
    stopped = [server for server in recorded_servers(output_dir).values() if terminate(server)]
    state_path(output_dir).unlink(missing_ok=True)
    return stopped
