"""``bench/gpu.sh``, rehearsed on the CPU (``DEVICE=cpu``): the benches a GPU run takes, at toy sizes and
without compilation, needing only what a lent GPU machine has, so that the one short run such a machine
allows is not spent on a broken script."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"
# Not on the lent GPU machines' Python (nor needed by the benches): the orchestration and tracking layers.
ABSENT_ON_GPU_MACHINES = {"prefect", "mlflow", "litgpt"}


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "WHEELS": str(tmp_path / "no-wheels"),
        "DEVICE": "cpu",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900
    )


def imported_packages(log: str) -> set[str]:
    """Top-level names from ``PYTHONPROFILEIMPORTTIME`` lines: ``import time: self | cumulative | name``."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in log.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def write_wheel(directory: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of one empty package: the format pip installs, built without a build backend."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": "",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*files, f"{dist}.dist-info/RECORD"])
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            archive.writestr(path, text)
    return wheel


@pytest.mark.slow
def test_rehearsal_runs_every_bench_without_the_packages_gpu_machines_lack(tmp_path):
    result = run_script(tmp_path, PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "REHEARSAL" in result.stdout and "!!" not in result.stdout and "done in" in result.stdout
    out = tmp_path / "out"
    train = (out / "train.md").read_text()
    assert "| reference (workshop style), fp32 |" in train and "| groundup, fp32 |" in train
    peers = (out / "peers.md").read_text()
    for row in (
        "| generate 12 tokens, greedy, KV cache |",
        "| … both with prompt lookup (4 drafted tokens a pass) |",
        "| generate for 3 prompts at once, 12 tokens each (tok/s, all rows) |",
        "| train, batch 2 × 64, fp32 |",
    ):
        assert row in peers
    assert "greedy tokens identical (every groundup and transformers generate row): yes in 1/1 rounds" in peers
    assert "outputs identical: yes" in (out / "generate.md").read_text()
    for bench in ("train", "peers", "generate"):
        imported = imported_packages((out / f"{bench}.log").read_text())
        assert {"torch", "groundup"} <= imported, bench
        assert not imported & ABSENT_ON_GPU_MACHINES, f"bench.{bench} imports {imported & ABSENT_ON_GPU_MACHINES}"
    assert "transformers" in imported_packages((out / "peers.log").read_text())


def test_carried_wheels_go_ahead_of_the_machines_own_packages(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # iniconfig (pytest's) is installed here at 2.x: the carried 99.0 must be the one Python finds.
    write_wheel(wheels, "iniconfig", "99.0")
    result = run_script(tmp_path, WHEELS=str(wheels), BENCHES="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from the carried wheels, ahead of this machine's packages: iniconfig 99.0" in result.stdout
    assert "== " not in result.stdout  # BENCHES="": the check alone


@pytest.mark.parametrize(
    ("env", "code", "line"),
    [
        ({"DEVICE": "gpu"}, 2, "DEVICE=gpu: use DEVICE=cuda (the measurement, the default) or DEVICE=cpu"),
        ({"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}, 1, "no CUDA device visible to torch"),
    ],
)
def test_a_wrong_device_is_one_line_before_any_bench(tmp_path, env, code, line):
    result = run_script(tmp_path, **env)
    assert result.returncode == code
    assert line in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "train.md").exists()
