"""Pretraining on the-verdict: the workshop's initial loss, loss falling, bad input, the Prefect flow with
MLflow tracking and registration, and `groundup pretrain` / `groundup generate` end to end."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from groundup.config import ConfigError, PretrainConfig, load_config
from groundup.errors import DeviceError
from groundup.model.io import load_checkpoint
from groundup.train.loop import TrainingError, lm_loss
from groundup.train.pretrain import build_model, gpt_config, pretrain_gpt, window_settings


@pytest.fixture(autouse=True)
def one_thread():
    # Small models: a second OpenMP thread only adds synchronisation, and on a busy machine a lot of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def verdict_parquet(tmp_path_factory, verdict_path, gpt2_vocab_dir):
    from groundup.text.store import write_tokens

    path = tmp_path_factory.mktemp("data") / "the-verdict.parquet"
    write_tokens(verdict_path, path, "gpt2", vocab_dir=gpt2_vocab_dir)
    return path


def small_config(vocab_dir, *overrides: str) -> PretrainConfig:
    """A model small enough to train for a few dozen steps in seconds on a CPU."""
    return load_config(PretrainConfig, "quickstart", [
        "model.preset=gpt-tiny", "model.context_length=32", "model.drop_rate=0.0",
        "train.batch_size=8", "train.lr=0.003", "train.eval_freq=6", "train.eval_iter=2",
        "train.sample_tokens=8", "train.checkpoint_every=10", "train.runtime.accelerator=cpu",
        f"data.vocab_dir={vocab_dir}", *overrides,
    ])  # fmt: skip


@pytest.mark.slow
def test_workshop_profile_reproduces_the_workshops_initial_losses(verdict_path, verdict_parquet):
    from torch.utils.data import DataLoader

    from groundup.text.tokenizers import get_tokenizer
    from groundup.text.windows import GPTWindowDataset, create_dataloaders

    config = load_config(PretrainConfig, "workshop")
    cfg = gpt_config(config)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.drop_rate) == (768, 12, 12, 256, 0.1)
    model = build_model(cfg, config).eval()

    def mean_loss(loader, batches=None) -> float:
        with torch.no_grad():
            losses = [lm_loss(model(x), y).item() for x, y in islice(loader, batches)]
        return sum(losses) / len(losses)

    # The workshop splits the text at 90% of its characters; with that split the numbers are its own.
    tokenizer = get_tokenizer("gpt2")
    text = verdict_path.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    halves = [GPTWindowDataset(tokenizer.encode(part), 256, 256) for part in (text[:cut], text[cut:])]
    assert [len(h) for h in halves] == [18, 2]
    assert mean_loss(DataLoader(halves[0], batch_size=2)) == pytest.approx(10.987583, abs=1e-4)
    assert mean_loss(DataLoader(halves[1], batch_size=2)) == pytest.approx(10.981106, abs=1e-4)

    # The pipeline splits the tokens instead: slightly other text in each half, the same ~10.98 start.
    max_length, stride = window_settings(config, cfg)
    train, val = create_dataloaders(verdict_parquet, max_length=max_length, stride=stride, batch_size=2,
                                    train_ratio=config.data.train_ratio, seed=config.train.seed)
    assert mean_loss(train, batches=3) == pytest.approx(10.98, abs=0.1)
    assert mean_loss(val) == pytest.approx(10.98, abs=0.1)


def test_loss_falls_on_the_verdict_and_a_finished_run_is_reused(verdict_parquet, gpt2_vocab_dir, tmp_path):
    config = small_config(gpt2_vocab_dir, "train.epochs=2")
    result = pretrain_gpt(verdict_parquet, config, tmp_path)
    first, last = result.evals[0], result.evals[-1]
    assert result.steps == 2 * 18  # 90% of 5,145 tokens: 144 windows of 32, 18 batches of 8
    assert last["train_loss"] < first["train_loss"] - 2.5 and last["val_loss"] < first["val_loss"] - 2.0
    assert [s["epoch"] for s in result.samples] == [1, 2]
    assert all(s["text"].startswith("Every effort moves you") for s in result.samples)
    assert open(result.loss_plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    model = load_checkpoint(result.checkpoint)
    assert model.cfg.context_length == 32 and model.num_parameters() == result.parameters
    assert json.loads(open(f"{result.checkpoint}/config.json").read())["tokenizer"] == "gpt2"

    again = pretrain_gpt(verdict_parquet, config, tmp_path)
    assert again.already_finished and again.checkpoint == result.checkpoint and again.evals == result.evals


@pytest.mark.slow
def test_two_devices_pretrain_in_a_launched_subprocess(verdict_parquet, gpt2_vocab_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = small_config(gpt2_vocab_dir, "train.max_steps=3", "train.eval_freq=2", "train.runtime.devices=2")
    result = pretrain_gpt(verdict_parquet, config, tmp_path)
    assert result.steps == 3 and result.tokens_seen == 3 * 2 * 8 * 32  # both ranks' batches count
    assert [e["step"] for e in result.evals] == [1, 3]
    assert load_checkpoint(result.checkpoint).cfg.context_length == 32


def test_cpu_pretraining_off_the_main_thread_runs_in_its_own_process_and_reports_back(
    verdict_parquet, gpt2_vocab_dir, tmp_path
):
    # A Prefect task trains on a worker thread, where glibc would map large blocks afresh every step
    # (test_cpu_memory); the run moves to a launched process and its hooks still fire here, as it goes.
    import threading

    from groundup.train.loop import TrainHooks

    calls: list[tuple] = []
    hooks = TrainHooks(
        on_eval=lambda point: calls.append(("eval", point.step, threading.current_thread().name)),
        on_sample=lambda sample: calls.append(("sample", sample["epoch"])),
        on_progress=lambda done, total: calls.append(("progress", done, total)),
        on_checkpoint=lambda path, progress: calls.append(("checkpoint", path.is_dir(), progress.step)),
    )
    config = small_config(gpt2_vocab_dir, "train.max_steps=7", "train.eval_freq=3", "train.checkpoint_every=5")
    results: list = []
    worker = threading.Thread(
        target=lambda: results.append(pretrain_gpt(verdict_parquet, config, tmp_path, hooks=hooks)), name="task"
    )
    worker.start()
    worker.join()
    (result,) = results
    events = (tmp_path / "checkpoints").glob("*/launch-events.jsonl")
    assert len(list(events)) == 1  # it ran launched
    assert [c for c in calls if c[0] == "progress"] == [("progress", step, 7) for step in range(1, 8)]
    assert [c for c in calls if c[0] == "eval"] == [("eval", e["step"], "task") for e in result.evals]
    assert [e["step"] for e in result.evals] == [1, 4, 7]
    assert ("checkpoint", True, 5) in calls and ("sample", 1) in calls
    assert result.steps == 7 and load_checkpoint(result.checkpoint).cfg.context_length == 32

    # On the main thread, or with the setting off, it trains in this process.
    from groundup.train.loop import needs_own_process, resolve_runtime

    runtime = resolve_runtime(config.train.runtime)
    assert not needs_own_process(config.train.runtime, runtime)
    outcome: list[bool] = []
    released = config.train.runtime.model_copy(update={"keep_freed_memory": False})
    worker = threading.Thread(target=lambda: outcome.extend(
        [needs_own_process(config.train.runtime, runtime), needs_own_process(released, runtime)]
    ))  # fmt: skip
    worker.start()
    worker.join()
    assert outcome == [True, False]


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["model.preset=gpt-huge"], TrainingError, "unknown model preset 'gpt-huge'"),
        (["model.emb_dim=65"], TrainingError, r"emb_dim \(65\) must be divisible by n_heads \(2\)"),
        (["model.vocab_size=1000"], TrainingError, "vocab_size 1000 is smaller than the gpt2 tokenizer's 50257"),
        (["train.max_length=64"], TrainingError, r"max_length \(64\) is longer than the model's context_length \(32\)"),
        (["train.batch_size=200"], ValueError, "fewer than one batch of 200"),
        (["model.context_length=1024", "train.max_length=1000"], ValueError, "too few for one window of max_length 1000"),
    ],
)
def test_bad_settings_fail_before_any_training(verdict_parquet, gpt2_vocab_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        pretrain_gpt(verdict_parquet, small_config(gpt2_vocab_dir, *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_an_absent_accelerator_fails_before_any_training(verdict_parquet, gpt2_vocab_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(DeviceError, match="train.runtime.accelerator='cuda': no cuda device is available"):
        pretrain_gpt(verdict_parquet, small_config(gpt2_vocab_dir, "train.runtime.accelerator=cuda"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_settings_are_rejected_when_loaded():
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(PretrainConfig, "quickstart", ["train.epoch=3"])


# ---------------------------------------------------------------------------------------------------------
# Prefect flow, MLflow, CLI
# ---------------------------------------------------------------------------------------------------------


def flow_config(verdict_path, vocab_dir) -> PretrainConfig:
    return small_config(vocab_dir, f"data.source={verdict_path}", "train.max_steps=8", "train.eval_freq=3")


@pytest.mark.slow
def test_flow_tracks_registers_and_is_cached(prefect_harness, mlflow_tracking, verdict_path, gpt2_vocab_dir):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from groundup import tracking
    from groundup.flows.pretrain import pretrain
    from groundup.tasks.pretrain import PretrainedModel
    from groundup.tasks.pretrain import pretrain as pretrain_task

    config = flow_config(verdict_path, gpt2_vocab_dir)
    state = pretrain(config=config, output_dir=str(mlflow_tracking), experiment="pretrain-test", return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result.pretrain.model_version == "groundup-gpt/1" and result.pretrain.steps == 8
    evals_steps = [1, 4, 7, 8]

    client = tracking.client()
    experiment = client.get_experiment_by_name("pretrain-test")
    [run] = client.search_runs([experiment.experiment_id], "tags.`groundup.stage` = 'pretrain'")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == evals_steps
    assert run.data.metrics["final_val_loss"] == pytest.approx(result.pretrain.final_val_loss)
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.preset"] == "gpt-tiny"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "samples.json", "config.json"} <= artifacts
    # The token file is the run's own dataset; the model's text (recorded by the data stage) is linked too.
    datasets = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert datasets["pretrain-tokens"].digest == result.data.tokens.parquet_sha256[:16]

    version = client.get_model_version("groundup-gpt", "1")
    # Lineage lives in MLflow's graph: the version's run holds the token file and the text it came from.
    assert version.run_id == run.info.run_id and len(datasets) == 2
    assert json.loads(version.tags["groundup.gpt_config"])["context_length"] == 32
    registered = load_checkpoint(tracking.model_directory("groundup-gpt/1"))
    trained = load_checkpoint(result.pretrain.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(registered.state_dict().values(), trained.state_dict().values(), strict=True))

    with get_client(sync_client=True) as prefect:
        # The harness is shared by the whole session: other flows' summaries are there too.
        [summary] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pretrain-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
        ))
    assert "groundup-gpt/1" in summary.data and "data:image/png;base64," in summary.data

    again = pretrain(config=config, output_dir=str(mlflow_tracking), experiment="pretrain-test")
    assert again.pretrain.model_version == "groundup-gpt/1" and again.pretrain.checkpoint == result.pretrain.checkpoint

    @flow
    def without_prefects_cache() -> PretrainedModel:
        return pretrain_task.with_options(refresh_cache=True)(
            result.data.tokens.parquet, config, output_dir=str(mlflow_tracking), experiment="pretrain-test"
        )

    rerun = without_prefects_cache()  # the task body runs again: it finds the finished run, trains nothing
    assert rerun.model_version == "groundup-gpt/1" and rerun.steps == 8
    latest = client.get_run(rerun.run_id)
    assert latest.data.params["already_finished"] == "True"
    assert len(client.search_model_versions("name='groundup-gpt'")) == 1
    # The reusing run names the model it reused as its output, as the training run does.
    registered = tracking.model_id_of(tracking.resolve_version("groundup-gpt/1"))
    assert [o.model_id for o in latest.outputs.model_outputs] == [registered]


@pytest.mark.slow
def test_cli_pretrains_and_generates_from_the_registered_model(
    prefect_harness, mlflow_tracking, verdict_path, gpt2_vocab_dir, capsys
):
    from groundup.cli import main

    out = str(mlflow_tracking)
    sets = [f"data.source={verdict_path}", f"data.vocab_dir={gpt2_vocab_dir}", "model.preset=gpt-tiny",
            "model.context_length=32", "train.max_steps=4", "train.eval_freq=2", "train.sample_tokens=4",
            "train.runtime.accelerator=cpu"]
    args = ["pretrain", "--profile", "quickstart", "--output-dir", out]
    assert main([*args, *(arg for s in sets for arg in ("--set", s))]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{\n"):])
    assert result["pretrain"]["model_version"] == "groundup-gpt/1" and result["pretrain"]["steps"] == 4

    assert main(["generate", "groundup-gpt", "Every effort moves you", "--max-new-tokens", "5", "--output-dir", out]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you\n")

    assert main(["pretrain", "--profile", "quickstart", "--output-dir", out, "--set", "model.preset=nope"]) == 2  # a settings error
    assert "unknown model preset 'nope'" in capsys.readouterr().err
