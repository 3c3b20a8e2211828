"""End to end on real servers: `groundup ui` starts a Prefect server and an MLflow server on loopback,
`groundup serve` serves the deployments, the pipeline deployment is triggered through Prefect's REST API
with parameters (tiny models, local sources, a loopback judge), and the results are checked in both
servers and with `groundup lineage`. Both servers and the serving process are stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest

from groundup import serving
from tests.pipeline_fixtures import judge_reply, settled_states, sources_dir, tiny_config, tiny_gpt2_dir
from tests.s3_fixtures import stop_process_group
from tests.test_pipeline import ALWAYS, CACHED, check_mlflow_graph

pytestmark = pytest.mark.slow

PIPELINE = "groundup-pipeline/weekly"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class PrefectAPI:
    """The few REST calls the test makes, with plain urllib (what any HTTP client of Prefect would do)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: dict | None = None, attempts: int = 6):
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(attempts):
            request = urllib.request.Request(
                f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as exc:
                # Prefect on SQLite answers 503 while its database is busy; its own client retries too.
                if exc.code not in (429, 503) or attempt == attempts - 1:
                    raise
            time.sleep(2**attempt)

    def deployment(self, name: str, server: subprocess.Popen | None = None, timeout: float = 300.0) -> dict:
        """The deployment, once the serving process has registered it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.call("GET", f"/deployments/name/{name}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"the serving process exited with code {server.returncode}")
            time.sleep(2)

    def trigger(self, deployment_id: str, parameters: dict) -> str:
        return self.call("POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters})["id"]

    def wait(self, flow_run_id: str, timeout: float = 900.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.call("GET", f"/flow_runs/{flow_run_id}")
            if run["state_type"] in TERMINAL:
                return run
            time.sleep(3)
        raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout:.0f} s")

    def task_states(self, flow_run_id: str, expected: Iterable[str] = ()) -> dict[str, str]:
        """Task run name -> state name, once the server has recorded them (see ``settled_states``)."""
        query = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return settled_states(
            lambda: {run["name"]: run["state_name"] for run in self.call("POST", "/task_runs/filter", query)}, expected
        )


def _groundup(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "groundup.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def client_environment(tmp_path: Path) -> dict[str, str]:
    """The client processes find the servers through artifacts/servers.json, as after `groundup ui`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-client"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.fixture
def servers(tmp_path):
    out = tmp_path / "artifacts"
    started = serving.start_ui(out)
    yield out, started
    stopped = serving.stop_ui(out)
    assert {s.pid for s in stopped} == {s.pid for s in started.values()}
    assert not any(s.alive() for s in started.values())


def test_pipeline_deployment_on_real_servers(
    servers, tmp_path, verdict_path, instruction_data_path, gpt2_vocab_dir, monkeypatch
):
    from tests.chat_server import ChatServer

    out, started = servers
    api = PrefectAPI(started["prefect"].url + "/api")
    sources = sources_dir(
        tmp_path / "sources", verdict_path, instruction_data_path, gpt2_vocab_dir, tiny_gpt2_dir(tmp_path / "hf")
    )
    env = client_environment(tmp_path)

    with ChatServer(judge_reply) as judge, served(out, sources, [], env, tmp_path / "serve.log") as serve:
        check_deployments_and_runs(api, serve, out, sources, judge.base_url, env)


@contextlib.contextmanager
def served(out: Path, sources: Path, overrides: list[str], env: dict[str, str], log_path: Path):
    """``groundup serve`` in its own process group, ended by pid; its log is printed if the body fails."""
    settings = [arg for override in overrides for arg in ("--set", override)]
    argv = [sys.executable, "-m", "groundup.cli", "serve", "--output-dir", str(out), "--sources-dir", str(sources)]
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [*argv, *settings], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield serve
    except BaseException:
        print(log_path.read_text(errors="replace")[-6000:])
        raise
    finally:
        stop_process_group(serve)


def check_deployments_and_runs(api: PrefectAPI, serve, out: Path, sources: Path, judge_url: str, env) -> None:
    deployment = api.deployment(PIPELINE, serve)
    assert deployment["enforce_parameter_schema"] is True
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
    assert all(s["active"] for s in deployment["schedules"])
    # The profile (plus --sources-dir) filled the default settings of the form.
    assert deployment["parameters"]["config"]["data"]["source"] == str(sources / "the-verdict.txt")
    assert api.deployment("prepare-data/daily-refresh")["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    # Enforced schema: a setting of the wrong type is refused by the server.
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.trigger(deployment["id"], {"config": {"train": {"lr": "fast"}}})
    assert refused.value.code in (409, 422)

    parameters = {"config": tiny_config(sources, out, judge_url).model_dump(mode="json")}
    first = api.wait(api.trigger(deployment["id"], parameters))
    assert first["state_type"] == "COMPLETED", first["state"]
    states = api.task_states(first["id"], CACHED | ALWAYS)
    assert set(states) == CACHED | ALWAYS and set(states.values()) == {"Completed"}

    check_mlflow(out, env, first["id"])

    again = api.wait(api.trigger(deployment["id"], parameters))
    assert again["state_type"] == "COMPLETED", again["state"]
    states = api.task_states(again["id"], CACHED | ALWAYS)
    assert {n for n, s in states.items() if s == "Cached"} == CACHED

    parameters["config"]["generation"]["max_new_tokens"] = 4
    changed = api.wait(api.trigger(deployment["id"], parameters))
    assert changed["state_type"] == "COMPLETED", changed["state"]
    states = api.task_states(changed["id"], CACHED | ALWAYS)
    assert {n for n, s in states.items() if s != "Cached"} == ALWAYS | {"generate_responses", "judge_responses"}

    # `groundup deploy` registers the same deployments for a work pool's workers.
    _groundup("deploy", "--pool", "e2e-pool", "--output-dir", str(out), "--sources-dir", str(sources), env=env)
    assert api.call("GET", "/work_pools/e2e-pool")["type"] == "process"
    assert api.deployment(PIPELINE)["work_pool_name"] == "e2e-pool"


def check_mlflow(out: Path, env: dict[str, str], flow_run_id: str) -> None:
    """What the MLflow server holds after the first run: runs, datasets, metrics, versions, aliases, lineage."""
    from mlflow import MlflowClient

    client = MlflowClient(serving.running_servers(out)["mlflow"].url)
    experiment = client.get_experiment_by_name("pipeline-test")
    parents = client.search_runs([experiment.experiment_id], f"tags.`groundup.flow_run_id` = '{flow_run_id}'")
    pipeline_run = next(r for r in parents if r.data.tags["mlflow.runName"] == "groundup-pipeline")
    assert pipeline_run.data.tags["groundup.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")
    assert "judge.finetuned_model.mean" in pipeline_run.data.metrics
    stages = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{pipeline_run.info.run_id}'")
    by_stage = {r.data.tags["groundup.stage"]: r for r in stages}
    assert {d.dataset.name for d in by_stage["data"].inputs.dataset_inputs} >= {"the-verdict.txt"}
    assert "final_val_loss" in by_stage["pretrain"].data.metrics
    check_mlflow_graph(client, pipeline_run.info.run_id, pipeline_run.data.tags["groundup.model.weights"])

    finetuned = pipeline_run.data.tags["groundup.model.finetune"]
    name = finetuned.split("/")[0]
    assert {"groundup-gpt", name} <= {v.name for v in client.search_model_versions()}
    champion = client.get_model_version_by_alias(name, "champion")
    assert f"{name}/{champion.version}" == finetuned
    assert client.get_model_version_by_alias(name, "candidate").version == champion.version
    assert champion.tags["groundup.promotion"] == "champion"

    tree = _groundup("lineage", f"{name}@champion", "--output-dir", str(out), env=env)
    parent = champion.tags["groundup.parent"]
    for expected in (f"{finetuned}  @candidate, @champion", "stage: finetune_groundup", "promotion: champion",
                     f"flow_run_url: {pipeline_run.data.tags['groundup.flow_run_url']}", "dataset instruct-train",
                     "evaluated by judge_responses", "judge.finetuned_model.mean=", "derived from:",
                     f"    {parent}", "stage: gpt2_weights", "dataset model.safetensors"):  # fmt: skip
        assert expected in tree, tree
