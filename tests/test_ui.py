"""`groundup ui`: real Prefect and MLflow servers on loopback, found by later runs, stopped by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from groundup import serving


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"null")


def _prepared_environment(output_dir) -> dict[str, str]:
    """What `environment.prepare` sets up, observed in a fresh process (it changes os.environ)."""
    code = (
        "import json, os, sys; from groundup import environment; environment.prepare(sys.argv[1]); "
        "print(json.dumps({k: os.environ.get(k) for k in ('PREFECT_API_URL', 'MLFLOW_TRACKING_URI')}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    out = subprocess.run([sys.executable, "-c", code, str(output_dir)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _live_group_members(pgid: int) -> list[str]:
    """Processes of a group that still run (zombies wait for their parent and use nothing)."""
    table = subprocess.run(["ps", "-eo", "pgid=,stat=,pid="], capture_output=True, text=True).stdout.split("\n")
    rows = [line.split() for line in table if line.strip()]
    return [pid for group, stat, pid in rows if int(group) == pgid and not stat.startswith("Z")]


def test_without_servers_runs_use_the_embedded_defaults(tmp_path):
    assert serving.running_servers(tmp_path) == {}
    env = _prepared_environment(tmp_path)
    assert env["PREFECT_API_URL"] is None
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    assert serving.stop_ui(tmp_path) == []


def test_a_stale_state_file_is_ignored(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = {
        "prefect": {"name": "prefect", "pid": dead.pid, "url": "http://127.0.0.1:9", "health_url": "http://127.0.0.1:9",
                    "log": "x", "marker": "--port 9"},
    }  # fmt: skip
    serving.state_path(tmp_path).write_text(json.dumps(state))
    assert serving.running_servers(tmp_path) == {}
    assert _prepared_environment(tmp_path)["PREFECT_API_URL"] is None
    assert serving.stop_ui(tmp_path) == []
    assert not serving.state_path(tmp_path).exists()


def test_a_corrupt_state_file_is_named(tmp_path):
    serving.state_path(tmp_path).write_text("{not json")
    with pytest.raises(serving.ServerError, match="servers.json"):
        serving.recorded_servers(tmp_path)


@pytest.mark.slow
def test_ui_starts_both_servers_later_runs_use_them_and_stop_ends_exactly_them(tmp_path):
    out = tmp_path / "artifacts"
    servers = serving.start_ui(out)
    try:
        assert set(servers) == {"prefect", "mlflow"}
        for server in servers.values():
            assert server.url.startswith("http://127.0.0.1:")
            assert server.alive()
            assert os.getpgid(server.pid) == server.pid  # a process group of its own
        assert _get_json(servers["prefect"].url + "/api/health") is True
        # The browser UI must talk to this server, not to Prefect's default port.
        assert _get_json(servers["prefect"].url + "/ui-settings")["api_url"] == servers["prefect"].url + "/api"
        assert urllib.request.urlopen(servers["mlflow"].url + "/health", timeout=10).status == 200

        # A second call finds them running instead of starting more.
        assert {s.pid for s in serving.start_ui(out).values()} == {s.pid for s in servers.values()}

        env = _prepared_environment(out)
        assert env == {"PREFECT_API_URL": servers["prefect"].url + "/api", "MLFLOW_TRACKING_URI": servers["mlflow"].url}

        # The MLflow server stores into artifacts/mlflow.db, where embedded runs go too.
        code = (
            "import sys; from groundup import environment, tracking; environment.prepare(sys.argv[1]); "
            "tracking.experiment_id('groundup', sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True,
                       env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})  # fmt: skip
        experiments = _get_json(servers["mlflow"].url + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=groundup")
        assert experiments["experiment"]["name"] == "groundup"
        assert (out / "mlflow.db").is_file()
    finally:
        stopped = serving.stop_ui(out)
    assert {s.pid for s in stopped} == {s.pid for s in servers.values()}
    for server in servers.values():
        assert not server.alive()
        assert _live_group_members(server.pid) == []  # nothing of its process group is left
    assert not serving.state_path(out).exists()
    assert serving.stop_ui(out) == []
