"""``groundup cluster up|down``: a rehearsal of a multi-machine deployment, every process on 127.0.0.1.

``up`` starts, each in its own process group with its log under ``<dir>/logs/``:

- PostgreSQL (``initdb``/``postgres`` from the machine; as the ``postgres`` user when run as root, since
  PostgreSQL refuses to run as root) with the databases ``prefect`` and ``mlflow``;
- an S3-protocol server (moto's, in memory; MinIO or AWS S3 in production) with the bucket;
- a Prefect server on PostgreSQL, with a ``remote-file-system`` block on the bucket for flow results;
- an MLflow server on PostgreSQL whose clients write artifacts straight to the bucket (``s3://`` URIs);
- the process work pools ``groundup-cpu`` and ``groundup-gpu``, each with a worker in its own directory;
- crash detection: flow runs heartbeat every ``heartbeat_seconds`` (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``),
  and an automation (Prefect's "detect zombie flows") marks a run Crashed when none came for
  ``crash_after_seconds``: a worker killed with its machine leaves no run Running forever;
- workers that ask their pool for runs every ``worker_poll_seconds`` (``PREFECT_WORKER_QUERY_SECONDS``).

Pids, ports and the environment clients need are recorded in ``<dir>/cluster.json``; ``down`` ends exactly
those process groups. On real machines each line of :func:`client_environment` is what a worker's machine
exports before ``prefect worker start`` (see the README, "Scaling out").
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from groundup import serving
from groundup.cluster_prefect import (
    CRASH_AFTER_SECONDS,
    HEARTBEAT_SECONDS,
    POOLS,
    RESULTS_BLOCK,
    WORKER_POLL_SECONDS,
    ClusterError,
    configure_prefect,
    start_worker,
    wait_for_workers,
)
from groundup.errors import SettingsError
from groundup.files import write_json
from groundup.serving import HOST, Server, free_port, terminate, wait_until_healthy

STATE_FILE = "cluster.json"
DB_USER = "groundup"
# moto accepts any credentials; a real store's come from the machine's usual AWS configuration.
REHEARSAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "groundup", "AWS_SECRET_ACCESS_KEY": "groundup", "AWS_DEFAULT_REGION": "us-east-1"}


def state_path(directory: str | Path) -> Path:
    return Path(directory).resolve() / STATE_FILE


def read_state(directory: str | Path) -> dict:
    path = state_path(directory)
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def client_environment(state: dict) -> dict[str, str]:
    """What every client and worker of the cluster needs in its environment."""
    return dict(state.get("environment", {}))


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------------


def _postgres_user() -> str | None:
    """The account PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True, capture_output=True)
    return "postgres"


def _as(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _postgres_data_dir(directory: Path, user: str | None) -> Path:
    """``<dir>/postgres``, or when root owns a path the postgres account cannot traverse (pytest's 0700
    temp dirs), a directory of its own in the system temp dir, recorded in the state file."""
    data = directory / "postgres"
    if user is None:
        return data
    probe = subprocess.run(_as(user, ["test", "-x", str(directory)]), capture_output=True)
    if probe.returncode == 0:
        data.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, user)
        return data
    data = Path(tempfile.mkdtemp(prefix="groundup-postgres-"))
    shutil.chown(data, user)
    return data


def start_postgres(directory: Path, logs: Path) -> tuple[Server, str]:
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not (initdb and postgres):
        raise ClusterError("initdb/postgres not on PATH", fix="install PostgreSQL (apt-get install postgresql)")
    user = _postgres_user()
    data = _postgres_data_dir(directory, user)
    if not (data / "PG_VERSION").is_file():
        done = subprocess.run(
            _as(user, [initdb, "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8"]),
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise ClusterError(f"initdb {data} failed: {done.stderr.strip()[-1500:]}")
    port = free_port(5432)
    argv = _as(user, [postgres, "-D", str(data), "-p", str(port), "-h", HOST, "-k", str(data)])
    log = logs / "postgres.log"
    server, process = serving._launch("postgres", argv, dict(os.environ), log, f"postgresql://{HOST}:{port}", "", f"-p {port}")
    try:
        deadline = time.monotonic() + 120
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"PostgreSQL did not start on port {port}:\n{serving._tail(log)}")
            time.sleep(0.5)
        _create_databases(port, ("prefect", "mlflow"))
    except BaseException:
        terminate(server)
        raise
    return server, str(data)


def _accepts(port: int) -> bool:
    import psycopg2

    try:
        psycopg2.connect(host=HOST, port=port, user=DB_USER, dbname="postgres", connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def _create_databases(port: int, names: tuple[str, ...]) -> None:
    import psycopg2

    connection = psycopg2.connect(host=HOST, port=port, user=DB_USER, dbname="postgres")
    connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with connection.cursor() as cursor:
        for name in names:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()


# Every server and worker runs on this interpreter (``-m``), so workers' flow runs import this groundup.

# ---------------------------------------------------------------------------------------------------------
# S3, Prefect, MLflow, workers
# ---------------------------------------------------------------------------------------------------------


def start_s3(logs: Path, bucket: str, env: dict[str, str]) -> Server:
    port = free_port(9000)
    url = f"http://{HOST}:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    server, process = serving._launch("s3", argv, env, logs / "s3.log", url, f"{url}/moto-api/", f"-p {port}")
    try:
        wait_until_healthy(server, process, 120)
        _create_bucket(url, bucket, env)
    except BaseException:
        terminate(server)
        raise
    return server


def _create_bucket(url: str, bucket: str, env: dict[str, str]) -> None:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=url, region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    client.create_bucket(Bucket=bucket)


def start_prefect(directory: Path, logs: Path, database: str, env: dict[str, str]) -> Server:
    port = free_port(4200)
    url = f"http://{HOST}:{port}"
    env = {
        **env, "PREFECT_HOME": str(directory / "prefect-server"), "PREFECT_API_DATABASE_CONNECTION_URL": database,
        "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    server, process = serving._launch("prefect", argv, env, logs / "prefect.log", url, f"{url}/api/health", f"--port {port}")
    _healthy_or_stopped(server, process, 300)
    return server


def _healthy_or_stopped(server: Server, process: subprocess.Popen, timeout: float) -> None:
    try:
        wait_until_healthy(server, process, timeout)
    except BaseException:
        terminate(server)
        raise


def start_mlflow(logs: Path, database: str, artifacts: str, env: dict[str, str]) -> Server:
    port = free_port(5000)
    url = f"http://{HOST}:{port}"
    # Clients write artifacts to the bucket themselves: URIs stay s3://, and gigabytes of checkpoints never
    # pass through the tracking server.
    argv = [
        sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", database, "--default-artifact-root", artifacts, "--no-serve-artifacts",
    ]  # fmt: skip
    server, process = serving._launch("mlflow", argv, env, logs / "mlflow.log", url, f"{url}/health", f"--port {port}")
    _healthy_or_stopped(server, process, 300)
    return server


# ---------------------------------------------------------------------------------------------------------
# up / down
# ---------------------------------------------------------------------------------------------------------


def up(
    directory: str | Path,
    bucket: str = "groundup",
    worker_dirs: dict[str, str | Path] | None = None,
    heartbeat_seconds: int = HEARTBEAT_SECONDS,
    crash_after_seconds: float = CRASH_AFTER_SECONDS,
    worker_poll_seconds: float = WORKER_POLL_SECONDS,
) -> dict:
    """Start everything (see the module docstring); returns the recorded state."""
    if heartbeat_seconds < HEARTBEAT_SECONDS or crash_after_seconds <= heartbeat_seconds:
        raise SettingsError(
            f"heartbeat every {heartbeat_seconds} s, crashed after {crash_after_seconds} s",
            fix=f"beat every {HEARTBEAT_SECONDS} s or more (Prefect's minimum), crash after several beats",
        )
    if worker_poll_seconds < 1:
        raise SettingsError(f"workers polling every {worker_poll_seconds} s", fix="poll every 1 s or more")
    directory = Path(directory).resolve()
    if any(Server(**s).alive() for s in read_state(directory).get("servers", {}).values()):
        raise SettingsError(f"a cluster is already running for {directory}", fix="groundup cluster down first")
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    state: dict = {"directory": str(directory), "servers": {}}
    try:
        postgres, state["postgres_data"] = start_postgres(directory, logs)
        servers["postgres"] = postgres
        port = postgres.url.rsplit(":", 1)[1]
        base_env = {**REHEARSAL_CREDENTIALS, **os.environ}  # real credentials, when exported, win
        # MLflow's job runner needs services the rehearsal does not have (and costs CPU).
        base_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        servers["s3"] = start_s3(logs, bucket, base_env)
        s3 = {"AWS_ENDPOINT_URL": servers["s3"].url, "MLFLOW_S3_ENDPOINT_URL": servers["s3"].url}
        base_env.update(s3)
        servers["prefect"] = start_prefect(
            directory, logs, f"postgresql+asyncpg://{DB_USER}@{HOST}:{port}/prefect", base_env
        )
        servers["mlflow"] = start_mlflow(
            logs, f"postgresql+psycopg2://{DB_USER}@{HOST}:{port}/mlflow", f"s3://{bucket}/mlflow", base_env
        )
        environment = {
            **REHEARSAL_CREDENTIALS, **s3,
            "PREFECT_API_URL": f"{servers['prefect'].url}/api",
            "MLFLOW_TRACKING_URI": servers["mlflow"].url,
            "GROUNDUP_STORE_URL": f"s3://{bucket}/store",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{RESULTS_BLOCK}",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds),
            "PREFECT_WORKER_QUERY_SECONDS": str(worker_poll_seconds),
        }  # fmt: skip
        state["environment"] = environment
        configure_prefect({**base_env, **environment}, f"s3://{bucket}/prefect-results", crash_after_seconds)
        state["worker_dirs"] = {
            pool: str(Path((worker_dirs or {}).get(pool) or directory / "workers" / pool).resolve()) for pool in POOLS
        }
        for pool, workdir in state["worker_dirs"].items():
            servers[f"worker-{pool}"] = start_worker(pool, Path(workdir), logs, {**base_env, **environment})
        wait_for_workers(environment["PREFECT_API_URL"], POOLS, servers)
    except BaseException:
        for server in reversed(servers.values()):
            terminate(server)
        raise
    state["servers"] = {name: asdict(server) for name, server in servers.items()}
    write_json(state_path(directory), state)
    return state


def restart_worker(directory: str | Path, pool: str, workdir: str | Path | None = None) -> Server:
    """Start ``pool``'s worker again (after its machine died), in ``workdir`` when given (a fresh machine:
    nothing of the old one's files), and record its pid there for ``down``."""
    state = read_state(directory)
    name = f"worker-{pool}"
    if name not in state.get("servers", {}):
        raise SettingsError(f"no cluster with a {pool} worker is recorded in {state_path(directory)}",
                            fix="groundup cluster up first")  # fmt: skip
    old = Server(**state["servers"][name])
    if old.alive():
        terminate(old)
    workdir = Path(workdir or state["worker_dirs"][pool]).resolve()
    env = {**REHEARSAL_CREDENTIALS, **os.environ, **client_environment(state)}
    started = time.time()
    worker = start_worker(pool, workdir, Path(state["directory"]) / "logs", env)
    state["servers"][name], state["worker_dirs"][pool] = asdict(worker), str(workdir)
    write_json(state_path(directory), state)  # recorded before the wait, so down stops it whatever happens
    wait_for_workers(state["environment"]["PREFECT_API_URL"], (pool,), {name: worker}, since=started)
    return worker


def down(directory: str | Path, remove_data: bool = False) -> list[Server]:
    """Stop every recorded process (workers first, PostgreSQL last); ``remove_data``: also its database."""
    state = read_state(directory)
    servers = [Server(**entry) for entry in state.get("servers", {}).values()]
    stopped = [server for server in reversed(servers) if terminate(server)]
    if remove_data and state.get("postgres_data"):
        shutil.rmtree(state["postgres_data"], ignore_errors=True)
    state_path(directory).unlink(missing_ok=True)
    return stopped


__all__ = ["up", "down", "restart_worker", "client_environment", "read_state"]
