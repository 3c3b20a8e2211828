"""The rehearsal of a multi-machine setup, end to end on loopback: `groundup cluster up` (real PostgreSQL
behind both servers, a real S3-protocol server, two workers in directories of their own), the pipeline
triggered through Prefect's REST API with finetuning and responses placed on the `groundup-gpu` pool,
and `groundup cluster down` stopping every process by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groundup import cluster
from groundup.cluster_prefect import WORKER_POLL_SECONDS
from groundup.serving import Server
from tests.pipeline_fixtures import judge_reply, sources_dir, tiny_config, tiny_gpt2_dir
from tests.s3_fixtures import kill_machine, stop_process_group
from tests.test_e2e_servers import PrefectAPI

# Minutes on a loaded 2-core machine: a cluster start, pipelines through worker processes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PLACED = {"finetune": "groundup-gpu", "generate_responses": "groundup-gpu"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The cluster, its client environment, and the directories nothing else shares."""
    for tool in ("initdb", "postgres"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
            pytest.skip(f"needs PostgreSQL's {tool} on PATH")
    pytest.importorskip("moto.server", reason="needs moto[server] (the cluster extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the cluster extra)")
    directory = tmp_path_factory.mktemp("cluster")
    workers = {pool: tmp_path_factory.mktemp(f"cwd-{pool}") for pool in cluster.POOLS}
    state = cluster.up(directory, bucket="rehearsal", worker_dirs=workers)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(cluster.client_environment(state), PREFECT_HOME=str(tmp_path_factory.mktemp("client-prefect")))
    try:
        yield directory, state, env
    finally:
        started = [Server(**entry) for entry in cluster.read_state(directory)["servers"].values()]
        cluster.down(directory, remove_data=True)
        assert not [server.name for server in started if server.alive()]


def _groundup(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "groundup.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def _bucket_objects(env: dict[str, str], bucket: str = "rehearsal", prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    keys, token = [], {}
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = {"ContinuationToken": page["NextContinuationToken"]}


def test_cluster_up_runs_both_servers_on_postgresql_and_the_store_on_s3(rehearsal):
    import psycopg2
    from mlflow import MlflowClient

    directory, state, env = rehearsal
    assert set(state["servers"]) == {"postgres", "s3", "prefect", "mlflow", "worker-groundup-cpu", "worker-groundup-gpu"}
    dead = {name: entry["log"] for name, entry in state["servers"].items() if not Server(**entry).alive()}
    assert not dead, {name: Path(log).read_text(errors="replace")[-1500:] for name, log in dead.items()}
    assert json.loads((directory / "cluster.json").read_text())["servers"]["prefect"]["pid"] == state["servers"]["prefect"]["pid"]
    port = int(state["servers"]["postgres"]["url"].rsplit(":", 1)[1])
    tables = {}
    for database in ("prefect", "mlflow"):
        with psycopg2.connect(host="127.0.0.1", port=port, user="groundup", dbname=database) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                tables[database] = {row[0] for row in cursor.fetchall()}
    assert {"flow_run", "work_pool", "deployment"} <= tables["prefect"]
    assert {"experiments", "runs", "registered_models"} <= tables["mlflow"]

    api = PrefectAPI(env["PREFECT_API_URL"])
    for pool in cluster.POOLS:
        assert api.call("GET", f"/work_pools/{pool}")["type"] == "process"
        # Each worker asks for runs every WORKER_POLL_SECONDS, not Prefect's 10 s.
        worker_environ = Path(f"/proc/{state['servers'][f'worker-{pool}']['pid']}/environ").read_bytes()
        assert f"PREFECT_WORKER_QUERY_SECONDS={WORKER_POLL_SECONDS}".encode() in worker_environ.split(b"\0")
        workers = api.call("POST", f"/work_pools/{pool}/workers/filter", {})
        assert [w["status"] for w in workers] == ["ONLINE"]
    # MLflow clients write run artifacts straight to the bucket.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("smoke"))
    assert run.info.artifact_uri.startswith("s3://rehearsal/mlflow/")


@pytest.fixture(scope="module")
def deployed(rehearsal, tmp_path_factory):
    """The deployments registered as on real machines: everything for the CPU pool (outputs under a
    directory of the test), only the placed-stage deployment for the GPU pool."""
    directory, state, env = rehearsal
    root = tmp_path_factory.mktemp("pipeline")
    sources = sources_dir(
        root / "sources", *(Path(p) for p in _shared_inputs()), tiny_gpt2_dir(root / "hf")
    )
    out = root / "artifacts"
    elsewhere = tmp_path_factory.mktemp("deploying-from-here")
    _groundup("deploy", "--pool", "groundup-cpu", "--output-dir", str(out), "--sources-dir", str(sources),
              env=env, cwd=elsewhere)  # fmt: skip
    _groundup("deploy", "--pool", "groundup-gpu", "--stages-only", env=env, cwd=elsewhere)
    assert not list(elsewhere.iterdir())
    return sources, out


def _shared_inputs() -> tuple[Path, Path, Path]:
    from tests.conftest import shared_file

    return (
        shared_file("data", "the-verdict.txt"), shared_file("data", "instruction-data.json"),
        shared_file("vocab", "gpt2"),
    )  # fmt: skip


def _trigger(api: PrefectAPI, config, timeout: float = 1500) -> dict:
    deployment = api.call("GET", "/deployments/name/groundup-pipeline/weekly")
    run = api.wait(api.trigger(deployment["id"], {"config": config.model_dump(mode="json")}), timeout)
    assert run["state_type"] == "COMPLETED", run["state"]
    return run


def _children(api: PrefectAPI, flow_run_id: str) -> dict[str, dict]:
    runs = api.call("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
    return {run["name"].split(" on ")[0]: run for run in runs}


def test_the_pipeline_runs_across_pools_with_artifacts_in_the_bucket(rehearsal, deployed):
    from mlflow import MlflowClient

    from tests.chat_server import ChatServer

    directory, state, env = rehearsal
    sources, out = deployed
    api = PrefectAPI(env["PREFECT_API_URL"])
    placement = [f"placement.{stage}={pool}" for stage, pool in PLACED.items()]
    with ChatServer(judge_reply) as judge:
        config = tiny_config(sources, out, judge.base_url, placement)
        first = _trigger(api, config)
        assert first["work_pool_name"] == "groundup-cpu"
        states = api.task_states(first["id"])
        assert set(states.values()) == {"Completed"} and {"finetune", "generate_responses", "pretrain"} <= set(states)
        children = _children(api, first["id"])
        assert set(children) == set(PLACED)
        for stage, run in children.items():
            assert run["work_pool_name"] == "groundup-gpu" and run["state_type"] == "COMPLETED"
            assert api.task_states(run["id"]) == {stage: "Completed"}
        objects = _bucket_objects(env)
        # What the placed stages were handed and handed back lives in the bucket, by content.
        stored = {key.split("/")[3] for key in objects if key.startswith("store/sha256/") and key.count("/") >= 3}
        assert {"train.json", "test.json"} <= stored, stored
        assert any(name.startswith("responses") for name in stored), stored
        # The workers kept nothing in the test's directories and nothing in each other's.
        gpu_dir = Path(state["worker_dirs"]["groundup-gpu"])
        assert (gpu_dir / "store-cache").is_dir() and (gpu_dir / "groundup-work").is_dir()
        assert not (out / "finetune").exists() and (gpu_dir / "groundup-work" / "finetune").is_dir()

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        versions = client.search_model_versions()
        assert versions and all(v.source.startswith(("s3://rehearsal/", "models:/")) for v in versions)
        for version in versions:
            assert client.get_model_version_download_uri(version.name, version.version).startswith("s3://rehearsal/")
        finetuned = next(v for v in versions if v.name.startswith("finetuned"))
        tree = _groundup("lineage", f"{finetuned.name}/{finetuned.version}", env=env, cwd=out.parent)
        assert "stage: finetune" in tree and "derived from:" in tree and "stage: gpt2_weights" in tree, tree

        again = _trigger(api, config)
        states = api.task_states(again["id"])
        cached = {name for name, s in states.items() if s == "Cached"}
        assert {"tokenize_to_parquet", "pretrain", "split_instructions", "judge_responses"} <= cached, states
        for stage, run in _children(api, again["id"]).items():
            assert run["work_pool_name"] == "groundup-gpu"
            assert api.task_states(run["id"]) == {stage: "Cached"}


def test_a_served_interval_schedule_writes_only_to_the_configured_output_dir(rehearsal, deployed, tmp_path):
    directory, state, env = rehearsal
    sources, _ = deployed
    declarations = tmp_path / "deployments.yaml"
    declarations.write_text(
        "deployments:\n"
        "  - name: every-20s\n"
        "    entrypoint: groundup.flows.data.prepare_data\n"
        "    schedules:\n"
        "      - interval: 20\n",
        encoding="utf-8",
    )
    out, cwd = tmp_path / "served-outputs", tmp_path / "serving-from-here"
    cwd.mkdir()
    api = PrefectAPI(env["PREFECT_API_URL"])
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "groundup.cli", "serve", "--file", str(declarations), "--output-dir", str(out),
             "--sources-dir", str(sources)],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deployment = api.deployment("prepare-data/every-20s", serve)
        assert deployment["parameters"]["output_dir"] == str(out)
        deadline = time.monotonic() + 600
        while True:
            runs = api.call("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
            done = [r for r in runs if r["state_type"] == "COMPLETED" and r["auto_scheduled"]]
            if done:
                break
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text(errors="replace")[-4000:]
            time.sleep(3)
    finally:
        stop_process_group(serve)
    assert list(out.glob("data/**/*.parquet")), sorted(str(p) for p in out.rglob("*"))[:40]
    assert not list(cwd.iterdir()), sorted(str(p) for p in cwd.rglob("*"))[:40]


def test_two_pipelines_at_once_on_one_store_both_finish(rehearsal, deployed):
    """Both on the CPU pool's worker at once, the same settings, one output location and one bucket."""
    from tests.chat_server import ChatServer

    directory, state, env = rehearsal
    sources, out = deployed
    api = PrefectAPI(env["PREFECT_API_URL"])
    deployment = api.call("GET", "/deployments/name/groundup-pipeline/weekly")
    with ChatServer(judge_reply) as judge:
        config = tiny_config(sources, out, judge.base_url, ["train.max_steps=6", "finetune.max_steps=3",
                                                            "placement.finetune=groundup-gpu"])  # fmt: skip
        parameters = {"config": config.model_dump(mode="json")}
        ids = [api.trigger(deployment["id"], parameters) for _ in range(2)]
        runs = [api.wait(flow_run_id, timeout=1500) for flow_run_id in ids]
    assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"], [run["state"] for run in runs]
    for run in runs:
        states = api.task_states(run["id"])
        assert set(states.values()) <= {"Completed", "Cached"}, states


def test_a_gpu_worker_killed_mid_finetune_and_restarted_elsewhere_resumes_from_the_bucket(
    rehearsal, deployed, tmp_path_factory
):
    """The GPU machine dies during finetuning (SIGKILL to its worker and the flow run under it); the heartbeat
    automation marks the stage's run Crashed, the pipeline's dispatch of it tries again, and a worker started
    on a fresh machine (a directory with nothing of the old one) resumes from the checkpoint in the bucket."""
    from mlflow import MlflowClient

    from tests.chat_server import ChatServer

    directory, state, env = rehearsal
    sources, out = deployed
    api = PrefectAPI(env["PREFECT_API_URL"])
    deployment = api.call("GET", "/deployments/name/groundup-pipeline/weekly")
    steps = 24  # a checkpoint (and its snapshot in the bucket) after every one
    resumable = ["placement.finetune=groundup-gpu", "finetune.epochs=12", f"finetune.max_steps={steps}",
                 "finetune.eval_interval=1"]  # fmt: skip
    with ChatServer(judge_reply) as judge:
        config = tiny_config(sources, out, judge.base_url, resumable)
        records = "store/records/checkpoints/finetune/"
        earlier = set(_bucket_objects(env, prefix=records))  # checkpoints of the other tests' finetuning
        flow_run_id = api.trigger(deployment["id"], {"config": config.model_dump(mode="json")})
        deadline = time.monotonic() + 1200
        while not set(_bucket_objects(env, prefix=records)) - earlier:
            run = api.call("GET", f"/flow_runs/{flow_run_id}")
            assert run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED") and time.monotonic() < deadline, run
            time.sleep(0.5)
        gpu = Server(**cluster.read_state(directory)["servers"]["worker-groundup-gpu"])
        assert kill_machine(gpu.pid) >= 2  # the worker and the flow run it started, at least
        fresh = tmp_path_factory.mktemp("cwd-groundup-gpu-restarted")
        # The command an operator runs on the replacement machine.
        from groundup.cli import main

        assert main(["cluster", "restart-worker", "--dir", str(directory), "--workdir", str(fresh)]) == 0
        restarted = Server(**cluster.read_state(directory)["servers"]["worker-groundup-gpu"])
        assert restarted.pid != gpu.pid and restarted.alive()
        run = api.wait(flow_run_id, timeout=1500)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert api.task_states(flow_run_id)["finetune"] == "Completed"
    children = api.call("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}},
                                                      "sort": "EXPECTED_START_TIME_ASC"})  # fmt: skip
    assert [(c["name"], c["state_type"]) for c in children] == [
        ("finetune on groundup-gpu", "CRASHED"), ("finetune on groundup-gpu", "COMPLETED")
    ]
    assert "heartbeat" in children[0]["state"]["message"]
    assert (fresh / "groundup-work" / "finetune").is_dir()

    # The finetuning run of the retry started from the snapshot in the bucket, past step 0, and its
    # history has every evaluation of both sessions; its model is the registered one.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    [resumed] = client.search_runs(experiments, "params.checkpoint_restored_from LIKE 's3://rehearsal/store/%'")
    assert 0 < int(resumed.data.params["resumed_from"]) < steps
    history = sorted({m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")})
    assert history == list(range(1, steps + 1))
    assert resumed.data.metrics["final_steps"] == steps
    registered = [v.name for v in client.search_model_versions() if v.run_id == resumed.info.run_id]
    assert registered and registered[0].startswith("finetuned-"), registered
