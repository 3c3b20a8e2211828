"""A real S3-protocol server on loopback (moto's standalone server), started and stopped by pid, and the
stop every test subprocess group gets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from groundup.serving import free_port


def moto_server_binary() -> str:
    candidate = Path(sys.executable).parent / "moto_server"
    found = str(candidate) if candidate.exists() else shutil.which("moto_server")
    if not found:
        pytest.skip("needs moto_server (pip install 'moto[server]', part of groundup[cluster])")
    return found


class MotoServer:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log

    def __enter__(self) -> MotoServer:
        with open(self.log, "wb") as fh:
            self.process = subprocess.Popen(
                [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"moto_server exited: {self.log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.5)
        raise TimeoutError(f"moto_server did not answer on {self.url}")

    def __exit__(self, *exc) -> None:
        stop_process_group(self.process, grace=20)


def stop_process_group(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM the process group a test started (``start_new_session``), SIGKILL it after ``grace`` s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def kill_machine(pid: int) -> int:
    """What a machine dying does to the process ``pid`` started with ``start_new_session`` (a worker):
    SIGKILL its process group and every process below it, which includes the flow runs a Prefect worker
    starts in sessions of their own (a group kill alone would leave them running). Returns how many died."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    os.killpg(pid, signal.SIGKILL)
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"
    return len(gone)


def s3_environment(endpoint: str) -> dict[str, str]:
    """What clients of the store need: the endpoint and (moto accepts any) credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=bucket)


def _credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """``s3://groundup-test`` on a moto server; the environment points boto3/s3fs/MLflow at it."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with MotoServer(log) as server:
        saved = {k: os.environ.get(k) for k in s3_environment(server.url)}
        os.environ.update(s3_environment(server.url))
        create_bucket(server.url, "groundup-test")
        try:
            yield "s3://groundup-test"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
