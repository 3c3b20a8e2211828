"""groundup installed from a wheel, not from the checkout: the deployment declarations and profiles come
with the package, so `groundup serve`, `groundup deploy` and `groundup run` work anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.pipeline_fixtures import sources_dir, tiny_gpt2_dir, tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}\n{(done.stdout + done.stderr)[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no network, no dependencies fetched): the test venv's packages
    are visible through a .pth file (a venv cannot be made with --system-site-packages from a venv)."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(ROOT)], cwd=root)
    [wheel] = (root / "dist").glob("groundup-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip()
    ours = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))}
    # Lines of a .pth file are added to sys.path as they are: the checkout's editable-install hook in the
    # test venv (itself a .pth) is not run, so `groundup` can only come from the wheel.
    Path(purelib, "test-venv-packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return venv


def test_a_wheel_install_serves_deploys_and_runs_offline(
    wheel_venv, tmp_path, prefect_harness, verdict_path, instruction_data_path, gpt2_vocab_dir
):
    from prefect.settings import PREFECT_API_URL

    groundup = str(wheel_venv / "bin" / "groundup")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the test server stands in for `groundup ui`'s
    where = _run([str(wheel_venv / "bin" / "python"), "-c", "import groundup; print(groundup.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(wheel_venv), where  # not the checkout

    assert "--limit" in _run([groundup, "serve", "--help"], tmp_path, env)

    sources = sources_dir(
        tmp_path / "sources", verdict_path, instruction_data_path, gpt2_vocab_dir, tiny_gpt2_dir(tmp_path / "hf")
    )
    out = tmp_path / "out"
    deployed = _run([groundup, "deploy", "--pool", "wheel-pool", "--output-dir", str(out), "--sources-dir", str(sources)], tmp_path, env)
    assert "registered groundup-pipeline/weekly for work pool wheel-pool" in deployed

    overrides = [o for o in tiny_overrides(out, "http://127.0.0.1:9/v1") if not o.startswith("judge.")]
    settings = [arg for o in overrides for arg in ("--set", o)]  # and no judge/ in the sources: no judge
    report = _run([groundup, "run", "--sources-dir", str(sources), *settings], tmp_path, env)
    assert "promotion    " in report and "judge_responses" in report and "skipped: no judge/ in --sources-dir" in report
