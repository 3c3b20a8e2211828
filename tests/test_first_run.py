"""The first ten minutes of a new user, as real `groundup` processes: unreachable sources fail fast with one
message that says what to do, a missing output directory does not hang Prefect, and commands reuse one
Prefect server instead of starting a temporary one each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from groundup import serving


def groundup(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``groundup ARGS`` as a user types it: the console script beside this interpreter, its own process."""
    script = Path(sys.executable).parent / "groundup"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "groundup.cli"]
    return subprocess.run([*argv, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _prefect_servers(out: Path) -> list[int]:
    """Pids of the Prefect server processes running with their home under ``out``."""
    pids, home = [], f"PREFECT_HOME={out / 'prefect'}".encode()
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environment = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if b"server" in command and b"start" in command and home in environment:
            pids.append(int(proc.name))
    return pids


def closed_port_url(path: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/{path}"


@pytest.mark.parametrize("host", ["closed-port", "unresolvable"])
def test_run_against_unreachable_sources_fails_fast_with_one_message(host, tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    text = closed_port_url("the-verdict.txt") if host == "closed-port" else "http://nonexistent.invalid/x"
    hub = closed_port_url("").rstrip("/")
    # The harness's API server stands in for the one a user's earlier command left running.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    settings = [f"data.source={text}", f"instruct.source={text}", f"weights.hf_endpoint={hub}"]
    started = time.monotonic()
    done = groundup(
        "run", "--output-dir", str(tmp_path / "out"), *(a for s in settings for a in ("--set", s)),
        env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started

    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"  # the bound for failing fast, with a wide margin
    ours = [line for line in output.splitlines() if line.startswith("groundup: ")]
    assert len(ours) == 1 and text in ours[0] and "--sources-dir DIR" in ours[0], output[-3000:]
    cause = "connection refused" if host == "closed-port" else "host name does not resolve"
    assert cause in ours[0]
    assert "Traceback" not in output and "retrying" not in output.lower(), output[-3000:]


@pytest.mark.slow
def test_a_missing_output_dir_with_mlflow_tracking_uri_set_does_not_hang(tmp_path, verdict_path):
    # MLflow points elsewhere, so nothing else creates the output dir before Prefect's temporary server
    # wants its home in it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'own.db'}", GROUNDUP_PREFECT_SERVER="ephemeral")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    done = groundup("data", "--source", str(verdict_path), "--output-dir", "not-yet-there", env=env, cwd=tmp_path)

    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    parquet, tokens = done.stdout.strip().splitlines()[-1].split("\t")
    assert Path(parquet).is_file() and Path(parquet).is_relative_to(tmp_path / "not-yet-there")
    assert tokens == "5145 tokens"
    assert (tmp_path / "own.db").is_file() and not (tmp_path / "not-yet-there" / "mlflow.db").exists()


@pytest.mark.slow
def test_commands_share_one_background_prefect_server_until_ui_stop(tmp_path, verdict_path):
    out = tmp_path / "artifacts"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["GROUNDUP_PREFECT_SERVER"] = "background"
    try:
        # Two first commands at once (two terminals, a schedule and a person): one server between them.
        with ThreadPoolExecutor(2) as pool:
            firsts = list(pool.map(
                lambda _: groundup("data", "--source", str(verdict_path), "--output-dir", str(out), env=env, cwd=tmp_path),
                range(2),
            ))  # fmt: skip
        assert all(first.returncode == 0 for first in firsts), [first.stderr[-3000:] for first in firsts]
        assert [first.stderr.count("starting a Prefect server") for first in firsts] in ([1, 0], [0, 1])
        server = serving.running_servers(out)["prefect"]
        assert len(_prefect_servers(out)) == 1
        assert server.alive() and os.getpgid(server.pid) == server.pid  # outlives the command, in its own group

        second = groundup("data", "--source", str(verdict_path), "--output-dir", str(out), env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "starting a Prefect server" not in second.stderr
        assert serving.running_servers(out)["prefect"].pid == server.pid
        assert f"View at {server.url}/runs/flow-run/" in second.stdout + second.stderr
    finally:
        stop = groundup("ui", "--stop", "--output-dir", str(out), env=env, cwd=tmp_path)
    assert f"stopped the prefect server (pid {server.pid}" in stop.stdout
    assert not server.alive() and serving.running_servers(out) == {}
