"""Every CLI verb on one bad input of its kind: a non-zero exit, one ``groundup:`` line that names the
input, and no traceback anywhere (the real command in a subprocess, Prefect's own logs included)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

ENTRY = {"instruction": "Say hi.", "input": "", "output": "hi"}


def closed_loopback_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bad_inputs(tmp_path) -> list[tuple[list[str], str]]:
    """``(argv, what the error line must name)`` for every verb that takes input."""
    import json

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    malformed = tmp_path / "malformed.json"
    malformed.write_text('[{"instruction": "a", "input": ""', encoding="utf-8")
    good = tmp_path / "instructions.json"
    good.write_text(json.dumps([ENTRY] * 10), encoding="utf-8")
    absent = tmp_path / "absent"
    url = f"http://127.0.0.1:{closed_loopback_port()}/the-verdict.txt"
    cases = [
        (["pretrain", "--set", "train.nope=1"], "train.nope"),  # unknown setting
        (["run", "--sources-dir", str(absent)], str(absent)),  # missing files
        (["data", "--source", url], url),  # unreachable URL
        (["instruct", "split", "--source", str(malformed)], "malformed.json"),  # malformed data
        (["gpt2", "--from", str(absent)], str(absent)),
        (["respond", str(absent / "test.json"), str(empty_dir), str(empty_dir)], "test.json"),
        (["judge", str(absent / "responses.jsonl")], "responses.jsonl"),
        (["evaluate", str(malformed), str(empty_dir), str(empty_dir)], "malformed.json"),
        (["lineage", "no-such-model"], "no-such-model"),
    ]
    if not torch.cuda.is_available():  # absent accelerator
        cases += [
            (["generate", str(empty_dir), "Hi", "--accelerator", "cuda"], "--accelerator='cuda'"),
            (
                ["finetune", "--base", str(empty_dir), "--set", f"instruct.source={good}",
                 "--set", "runtime.accelerator=cuda"],
                "finetune.runtime.accelerator='cuda'",
            ),  # fmt: skip
        ]
    return cases


@pytest.mark.slow
def test_each_verb_refuses_a_bad_input_in_one_line(prefect_harness, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from prefect.settings import PREFECT_API_URL

    # The subprocesses report to this session's Prefect API instead of starting one each.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")

    def refusal(case: tuple[int, tuple[list[str], str]]) -> str | None:
        number, (argv, named) = case
        out = tmp_path / f"artifacts-{number}"  # each its own: two at a time, each verb its own MLflow store
        done = subprocess.run(
            [sys.executable, "-m", "groundup.cli", *argv, "--output-dir", str(out)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if line.startswith("groundup:")]
        if done.returncode == 0 or len(lines) != 1 or named not in lines[0] or "Traceback" in done.stderr + done.stdout:
            return f"{argv[0]}: exit {done.returncode}, lines {lines}\n{done.stderr[-2000:]}"
        return None

    # Two at a time: most of each command is Python importing its modules, one core's work.
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(refusal, enumerate(bad_inputs(tmp_path))) if f]
    assert not failures, "\n\n".join(failures)


def test_cluster_up_refuses_settings_it_cannot_keep_before_starting_anything(tmp_path):
    from groundup import cluster
    from groundup.errors import SettingsError

    for settings, named in [
        ({"heartbeat_seconds": 5}, "heartbeat every 5 s"),
        ({"crash_after_seconds": 30}, "crashed after 30 s"),
        ({"worker_poll_seconds": 0}, "polling every 0 s"),
    ]:
        with pytest.raises(SettingsError, match=named):
            cluster.up(tmp_path, **settings)
    assert not list(tmp_path.iterdir())


def test_restarting_the_worker_of_a_cluster_that_is_not_up_says_so_in_one_line(tmp_path, capsys):
    from groundup.cli import main

    assert main(["cluster", "restart-worker", "--dir", str(tmp_path / "none"), "--pool", "groundup-gpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no cluster with a groundup-gpu worker" in err[0] and "groundup cluster up" in err[0]
