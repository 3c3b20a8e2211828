"""The Fabric training loop: schedule, batch order, resume after SIGKILL, bad input, multi-device launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from groundup.config import RuntimeConfig, TrainConfig
from groundup.errors import DeviceError
from groundup.model.gpt import GPTModel, config_from_preset
from groundup.model.io import CheckpointError
from groundup.train import launch
from groundup.train.loop import (
    EpochBatchSampler,
    TrainHooks,
    TrainingError,
    fit,
    lr_multiplier,
    resolve_runtime,
)
from groundup.train.state import LATEST_FILE, TRAINER_STATE_FILE
from tests.conftest import ROOT

VOCAB = 50


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: a second OpenMP thread only adds synchronisation, and on a busy machine a lot of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def progressions(n: int = 64, length: int = 17, seed: int = 0) -> TensorDataset:
    """Arithmetic progressions mod VOCAB: a next-token rule a tiny GPT learns within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    seqs = (start + stride * torch.arange(length)) % VOCAB
    return TensorDataset(seqs[:, :-1], seqs[:, 1:])


def settings(**overrides) -> TrainConfig:
    base = dict(epochs=3, batch_size=4, lr=3e-3, eval_freq=4, eval_iter=2, checkpoint_every=4, seed=7,
                runtime=RuntimeConfig(accelerator="cpu"))
    return TrainConfig(**{**base, **overrides})


def tiny_model(drop_rate: float = 0.1) -> GPTModel:
    torch.manual_seed(11)
    return GPTModel(config_from_preset("gpt-tiny", vocab_size=VOCAB, context_length=16, drop_rate=drop_rate))


def train_synthetic(run_dir: str, step_delay: float = 0.0, devices: int = 1, **overrides):
    """One training run on the progressions; also the body of the subprocesses below."""
    config = settings(runtime=RuntimeConfig(accelerator="cpu", devices=devices), **overrides)
    data = progressions()
    train = DataLoader(data, batch_size=config.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(progressions(16, seed=1), batch_size=config.batch_size)
    hooks = TrainHooks(on_progress=lambda done, total: time.sleep(step_delay))
    result = fit(tiny_model(), train, val, config, run_dir, sample=lambda m: "sample", hooks=hooks,
                 identity={"data": "progressions"})
    if not result.is_global_zero:
        return None
    return {"checkpoint": str(result.checkpoint), "steps": result.progress.step,
            "tokens_seen": result.progress.tokens_seen, "resumed_from": result.resumed_from}


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------


def test_warmup_then_cosine_decay_to_min_lr():
    config = settings(lr=1e-3, warmup_steps=4, cosine_decay=True, min_lr=1e-4)
    factors = [lr_multiplier(step, settings=config, total_steps=20) for step in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(0.1)  # min_lr / lr
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    constant = settings(lr=1e-3)
    assert {lr_multiplier(s, settings=constant, total_steps=20) for s in range(20)} == {1.0}


def test_batch_order_is_fixed_by_seed_and_epoch_and_can_start_mid_epoch():
    sampler = EpochBatchSampler(10, 3, shuffle=True, drop_last=True, seed=1)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 3 and all(len(b) == 3 for b in epoch0)
    assert list(sampler) == epoch0
    sampler.set_position(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_position(1, start=2)
    assert list(sampler) == epoch1[2:]
    ranks = [list(EpochBatchSampler(10, 2, shuffle=True, drop_last=False, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    flat = [[i for b in batches for i in b] for batches in ranks]
    assert len(flat[0]) == len(flat[1]) == 5 and not set(flat[0]) & set(flat[1])


def test_runtime_defaults_and_an_absent_accelerator():
    cpu = resolve_runtime(RuntimeConfig(accelerator="cpu"))
    assert (cpu.accelerator, cpu.precision, cpu.world_size) == ("cpu", "32-true", 1)
    if not torch.cuda.is_available():
        assert resolve_runtime(RuntimeConfig()).accelerator in ("cpu", "mps")
        with pytest.raises(DeviceError, match="train.runtime.accelerator='cuda': no cuda device is available"):
            resolve_runtime(RuntimeConfig(accelerator="cuda"))
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="train.runtime.accelerator='mps': no mps device"):
            resolve_runtime(RuntimeConfig(accelerator="mps"))


# ---------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------


def test_loss_falls_and_a_finished_run_is_not_trained_again(tmp_path, caplog):
    caplog.set_level("INFO", logger="groundup.train.loop")
    samples = []
    evals = []
    config = settings()
    train = DataLoader(progressions(), batch_size=4, shuffle=True, drop_last=True)
    val = DataLoader(progressions(16, seed=1), batch_size=4)
    checkpoints = []
    hooks = TrainHooks(on_eval=evals.append, on_sample=samples.append,
                       on_checkpoint=lambda path, progress: checkpoints.append((path.name, progress.step)))
    result = fit(tiny_model(), train, val, config, tmp_path / "run", sample=lambda m: "text", hooks=hooks)
    p = result.progress
    assert checkpoints == [(f"step-{s:06d}", s) for s in range(4, 48, 4)]  # the last step is the final model
    assert (p.step, p.tokens_seen, p.finished) == (48, 48 * 4 * 16, True)
    assert [s["epoch"] for s in samples] == [1, 2, 3] and p.samples == samples
    assert [e.step for e in evals] == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 48]
    # The final evaluation belongs to the last of the 3 epochs, not to a 4th.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ep ") and "loss" in r.getMessage()]
    assert logged[0].startswith("Ep 1 (Step 000001)") and logged[-1].startswith("Ep 3 (Step 000048)")
    assert [e.epoch_number for e in evals] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    assert evals[-1].val_loss < evals[0].val_loss - 1.0 and evals[-1].train_loss < evals[0].train_loss - 1.0
    assert sorted(path.name for path in result.checkpoint.iterdir()) == [
        "config.json", "model.safetensors", "progress.json"
    ]
    assert not (tmp_path / "run" / "steps").exists()  # optimizer state is dropped once the model is final

    again = fit(tiny_model(), train, val, config, tmp_path / "run")
    assert again.already_finished and again.progress.step == 48 and again.progress.evals == p.evals
    with pytest.raises(CheckpointError, match=r"another run \(settings.lr: 0.003 -> 0.002\)"):
        fit(tiny_model(), train, val, settings(lr=2e-3), tmp_path / "run")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = progressions(16)
    results = {}
    for batch, accum in ((8, 1), (4, 2)):
        config = settings(epochs=1, batch_size=batch, grad_accum_steps=accum, eval_freq=100)
        loader = DataLoader(data, batch_size=batch, shuffle=False, drop_last=True)
        result = fit(tiny_model(drop_rate=0.0), loader, None, config, tmp_path / f"run-{batch}")
        results[batch] = result
        assert result.progress.step == 2 and result.progress.tokens_seen == 16 * 16
    a, b = weights(results[8].checkpoint), weights(results[4].checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


def test_only_trainable_parameters_change_and_ignored_targets_do_not_count(tmp_path):
    model = tiny_model()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("trf_blocks.1.")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("trf_blocks.1.")}
    trainable_before = model.trf_blocks[1].ff.layers[0].weight.detach().clone()
    data = progressions(16)
    targets = data.tensors[1].clone()
    targets[:, :8] = -100  # e.g. a masked prompt
    loader = DataLoader(TensorDataset(data.tensors[0], targets), batch_size=4, shuffle=True, drop_last=True)
    result = fit(model, loader, None, settings(epochs=2, eval_freq=2), tmp_path / "run")
    assert all(point.train_loss == point.train_loss for point in result.progress.evals)  # no NaN
    after = weights(result.checkpoint)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not torch.equal(after["trf_blocks.1.ff.layers.0.weight"], trainable_before)


def test_max_steps_stops_mid_epoch_with_a_sample(tmp_path):
    loader = DataLoader(progressions(), batch_size=4, shuffle=True, drop_last=True)
    result = fit(tiny_model(), loader, None, settings(max_steps=6), tmp_path / "run", sample=lambda m: "s")
    assert result.progress.step == 6 and result.progress.samples == [{"epoch": 1, "step": 6, "text": "s"}]
    assert [e.step for e in result.progress.evals] == [1, 5, 6]


def test_bad_input_is_an_error_before_training(tmp_path):
    short = DataLoader(progressions(3), batch_size=4, shuffle=True, drop_last=True)
    with pytest.raises(TrainingError, match="the training data gives no batch: 3 windows for batch_size 4"):
        fit(tiny_model(), short, None, settings(), tmp_path / "short")
    loader = DataLoader(progressions(), batch_size=4, shuffle=True, drop_last=True)
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(TrainingError, match="has no parameter with requires_grad=True"):
        fit(frozen, loader, None, settings(), tmp_path / "frozen")
    two = settings(runtime=RuntimeConfig(accelerator="cpu", devices=2))
    with pytest.raises(TrainingError, match="must run through groundup.train.launch.run_launched"):
        fit(tiny_model(), loader, None, two, tmp_path / "two")
    assert not (tmp_path / "two").exists()


class Crash(Exception):
    pass


def crash_at(step: int) -> TrainHooks:
    def on_progress(done: int, total: int) -> None:
        if done == step:
            raise Crash

    return TrainHooks(on_progress=on_progress)


@pytest.mark.parametrize("damaged", [TRAINER_STATE_FILE, "model.safetensors", "progress.json"])
def test_a_corrupted_checkpoint_is_an_error_naming_the_file(tmp_path, damaged):
    loader = DataLoader(progressions(), batch_size=4, shuffle=True, drop_last=True)
    with pytest.raises(Crash):
        fit(tiny_model(), loader, None, settings(), tmp_path / "run", hooks=crash_at(6))
    latest = tmp_path / "run" / json.loads((tmp_path / "run" / LATEST_FILE).read_text())["checkpoint"]
    assert latest.name == "step-000004"
    path = latest / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=damaged.replace(".", r"\.")):
        fit(tiny_model(), loader, None, settings(), tmp_path / "run")


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    reference = train_synthetic(str(tmp_path / "reference"))
    run_dir = tmp_path / "killed"
    code = f"from tests.test_train import train_synthetic; train_synthetic({str(run_dir)!r}, step_delay=0.15)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    latest = run_dir / LATEST_FILE
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if latest.is_file() and json.loads(latest.read_text())["step"] >= 8:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the child finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists()

    resumed = train_synthetic(str(run_dir))
    assert resumed["resumed_from"] >= 8 and resumed["resumed_from"] % 4 == 0
    assert (resumed["steps"], resumed["tokens_seen"]) == (reference["steps"], reference["tokens_seen"]) == (48, 3072)
    a = json.loads((Path(reference["checkpoint"]) / "progress.json").read_text())
    b = json.loads((Path(resumed["checkpoint"]) / "progress.json").read_text())
    assert [e["step"] for e in a["evals"]] == [e["step"] for e in b["evals"]]
    assert [e["val_loss"] for e in b["evals"]] == pytest.approx([e["val_loss"] for e in a["evals"]], abs=1e-4)
    assert b["samples"] == a["samples"]
    wa, wb = weights(reference["checkpoint"]), weights(resumed["checkpoint"])
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Multi-device launch
# ---------------------------------------------------------------------------------------------------------


def test_launch_command_reexecutes_only_the_job(tmp_path):
    command = launch.launch_command("tests.test_train:train_synthetic", tmp_path / "job.json", tmp_path / "out.json")
    assert command == [sys.executable, "-m", "groundup.train.launch", "tests.test_train:train_synthetic",
                       str(tmp_path / "job.json"), str(tmp_path / "out.json")]
    with pytest.raises(ValueError, match="has no function 'nope'"):
        launch.run_launched("tests.test_train:nope", {}, tmp_path)
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        launch.run_launched("tests.test_train", {}, tmp_path)


def wait_in_a_launched_process(pid_file: str) -> None:
    """The body of the launched process below: note its pid, report one event, then wait to be ended."""
    Path(pid_file).write_text(str(os.getpid()))
    launch.send_event("started", {"pid": os.getpid()})
    time.sleep(120)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux) to see the process end")
def test_a_launched_process_reports_as_it_goes_and_ends_with_its_parent(tmp_path):
    # The parent stands for a work-pool worker that is killed mid-run: its launched run must not go on.
    parent_code = (
        "import sys; from groundup.train import launch; "
        "launch.run_launched('tests.test_train:wait_in_a_launched_process', {'pid_file': sys.argv[1]}, "
        "sys.argv[2], on_event=lambda kind, payload: print(kind, payload['pid'], flush=True))"
    )
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(pid_file), str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert parent.stdout.readline().split()[0] == "started"  # the event reached the parent
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _is_running(child):
            time.sleep(0.2)
        assert not _is_running(child), "the launched process outlived its parent"
    finally:
        parent.kill()


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left to collect


@pytest.mark.slow
def test_two_cpu_processes_train_with_ddp_through_the_launcher(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the launched command imports this test module
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = launch.run_launched(
        "tests.test_train:train_synthetic", {"run_dir": str(tmp_path / "run"), "devices": 2}, tmp_path, timeout=300
    )
    # 64 windows over 2 ranks in batches of 4: 8 steps per epoch, each seeing 2 x 4 x 16 tokens.
    assert (result["steps"], result["tokens_seen"]) == (24, 24 * 2 * 4 * 16)
    assert (Path(result["checkpoint"]) / "model.safetensors").is_file()
