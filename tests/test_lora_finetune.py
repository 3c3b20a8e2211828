"""Instruction finetuning of our GPT with LoRA: the library function on a tiny random GPT-2-vocabulary model,
and the Prefect task with MLflow registration and lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from groundup.config import FinetuneConfig, LoRAConfig, RuntimeConfig
from groundup.files import sha256_file
from groundup.instruct.engines import gpt2_size
from groundup.instruct.groundup_engine import FinetuneError, finetune_gpt
from groundup.model.gpt import GPTModel, config_from_preset, init_weights
from groundup.model.io import load_checkpoint, save_checkpoint
from groundup.model.loading import load_model
from groundup.model.lora import read_adapter_config
from groundup.train.loop import TrainHooks

N_ENTRIES = 24


@pytest.fixture(scope="module")
def train_json(instruction_data_path, tmp_path_factory) -> Path:
    """A slice of the workshop's instruction data, as the split stage writes train.json."""
    entries = json.loads(instruction_data_path.read_text(encoding="utf-8"))[:N_ENTRIES]
    path = tmp_path_factory.mktemp("instruct") / "train.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random GPT with GPT-2's vocabulary and a tied head, like the converted GPT-2 checkpoints."""
    cfg = config_from_preset("gpt-tiny", vocab_size=50257, tie_weights=True, qkv_bias=True)
    return save_checkpoint(init_weights(GPTModel(cfg), seed=0), tmp_path_factory.mktemp("base") / "gpt-tiny")


def tiny_config(**overrides) -> FinetuneConfig:
    settings = dict(
        base="unused",
        epochs=2,
        micro_batch_size=4,
        global_batch_size=4,
        lr=3e-3,
        weight_decay=0.0,
        eval_interval=4,
        max_seq_length=64,
        lora=LoRAConfig(r=8, alpha=16, dropout=0.0, query=True, value=True, head=True),
        runtime=RuntimeConfig(accelerator="cpu"),
    )
    return FinetuneConfig(**{**settings, **overrides})


def test_gpt2_size_names():
    assert [gpt2_size(b) for b in ("gpt2-124M", "gpt2-355m", "355M", "gpt2-medium")] == [
        "124M",
        "355M",
        "355M",
        "355M",
    ]
    assert gpt2_size("/ckpts/my-model") is None and gpt2_size("pretrained") is None


@pytest.fixture(scope="module")
def finetuned(tiny_base, train_json, tmp_path_factory):
    """One uninterrupted run (12 steps), the evaluations its hook saw, and the base's digest before it."""
    seen, base_digest = [], sha256_file(tiny_base / "model.safetensors")
    result = finetune_gpt(
        tiny_base,
        train_json,
        tiny_config(),
        tmp_path_factory.mktemp("ft") / "run",
        val_fraction=0.1,
        seed=123,
        base_model_ref="gpt2-tiny/1",
        hooks=TrainHooks(on_eval=seen.append),
    )
    return result, seen, base_digest


def test_finetuning_reduces_the_loss_and_trains_only_the_adapter(finetuned, tiny_base, train_json):
    result, seen, base_digest = finetuned
    evals = result.progress.evals
    # 22 entries train in 6 batches of up to 4 per epoch: 12 steps; evaluations at steps 1, 5, 9, 12.
    assert (result.n_train, result.n_val, result.progress.step) == (22, 2, 12)
    assert [p.step for p in evals] == [1, 5, 9, 12] and seen == evals
    assert evals[-1].train_loss < evals[0].train_loss - 0.5
    assert evals[-1].val_loss < evals[0].val_loss
    assert len(result.progress.samples) == 2  # one answer to a validation prompt per epoch
    # r=8 on query and value (64 -> 64) of 2 layers and on the head (64 -> 50257): A and B only.
    assert result.trainable_parameters == 2 * 2 * (8 * 64 + 64 * 8) + (8 * 64 + 50257 * 8)

    # The base checkpoint is untouched; the adapter names it and loads on top of it.
    assert sha256_file(tiny_base / "model.safetensors") == base_digest
    adapter = read_adapter_config(result.adapter_dir)
    assert adapter["base"] == {
        "path": str(tiny_base.resolve()),
        "weights_sha256": base_digest,
        "model_ref": "gpt2-tiny/1",
    }
    assert adapter["prompt_style"] == "alpaca" and adapter["tokenizer"] == "gpt2"
    assert len(json.loads(result.val_file.read_text())) == 2 and result.loss_plot.stat().st_size > 0

    x = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(load_model(result.adapter_dir)(x), load_checkpoint(tiny_base)(x), atol=1e-3)

    # A finished run directory is returned as it is, not trained again.
    again = finetune_gpt(
        tiny_base,
        train_json,
        tiny_config(),
        result.out_dir,
        val_fraction=0.1,
        seed=123,
        base_model_ref="gpt2-tiny/1",
    )
    assert again.already_finished and again.progress.step == 12


class Interrupted(RuntimeError):
    pass


def test_an_interrupted_run_resumes_from_its_adapter_checkpoint(finetuned, tiny_base, train_json, tmp_path):
    """Killed after step 10: the rerun resumes from the step-8 checkpoint (adapter + optimizer state) and
    ends with exactly the adapter of the uninterrupted run."""
    uninterrupted = finetuned[0]

    def stop_at_step_10(done: int, total: int) -> None:
        if done == 10:
            raise Interrupted

    args = (tiny_base, train_json, tiny_config(), tmp_path / "ft")
    kwargs = dict(val_fraction=0.1, seed=123, base_model_ref="gpt2-tiny/1")
    with pytest.raises(Interrupted):
        finetune_gpt(*args, **kwargs, hooks=TrainHooks(on_progress=stop_at_step_10))
    checkpoint = tmp_path / "ft" / "run" / "steps" / "step-000008"
    assert {"adapter.safetensors", "trainer_state.pt"} <= {p.name for p in checkpoint.iterdir()}

    resumed = finetune_gpt(*args, **kwargs)
    assert resumed.resumed_from == 8 and resumed.progress.step == 12
    expected = load_file(str(uninterrupted.adapter_dir / "adapter.safetensors"))
    for key, tensor in load_file(str(resumed.adapter_dir / "adapter.safetensors")).items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)


def test_settings_the_engine_cannot_run(tiny_base, train_json, tmp_path):
    with pytest.raises(FinetuneError, match="multiple of micro_batch_size"):
        finetune_gpt(tiny_base, train_json, tiny_config(global_batch_size=6), tmp_path / "a")
    with pytest.raises(FinetuneError, match="litgpt.quantize='bnb.nf4' is a LitGPT"):
        finetune_gpt(tiny_base, train_json, tiny_config(litgpt={"quantize": "bnb.nf4"}), tmp_path / "b")
    small_vocab = save_checkpoint(
        GPTModel(config_from_preset("gpt-tiny", vocab_size=100)), tmp_path / "small"
    )
    with pytest.raises(FinetuneError, match="vocabulary of 100 tokens"):
        finetune_gpt(small_vocab, train_json, tiny_config(), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_finetune_flow_with_the_groundup_engine(
    instruction_data_path, tmp_path, mlflow_tracking, prefect_harness, capsys
):
    """split → GPT-2 weights (a tiny GPT-2 in Hugging Face format as weights.from_dir) → finetune_groundup:
    the adapter is registered with the GPT-2 version as parent and the train data digest; `groundup generate`
    and `load_model` use it, also after its base checkpoint directory is gone (found through the registry)."""
    import shutil

    from groundup import tracking
    from groundup.cli import main
    from groundup.config import InstructDataConfig, WeightsConfig
    from groundup.flows.finetune import finetune
    from tests.gpt2_fixtures import save_hf, tiny_gpt2

    out = str(mlflow_tracking)
    hf_dir = save_hf(tiny_gpt2(), tmp_path / "hf-gpt2")
    config = tiny_config(base="gpt2-124M", max_steps=3, eval_interval=2)
    data = InstructDataConfig(source=str(instruction_data_path), limit=N_ENTRIES)
    kwargs = dict(config=config, data=data, output_dir=out, weights=WeightsConfig(from_dir=str(hf_dir)))

    result = finetune(**kwargs)
    tuned = result.finetune
    assert tuned.engine == "groundup" and tuned.metrics["steps"] == 3
    node = tracking.lineage(tuned.model_ref)
    assert node["stage"] == "finetune_groundup"
    assert node["datasets"]["instruct-train"] == sha256_file(result.split.train)
    assert node["parent"]["model"] == tuned.base_model_ref and node["parent"]["stage"] == "gpt2_weights"
    assert tuned.model_ref.startswith("finetuned-" + tuned.base_model_ref.split("/")[0])
    history = tracking.client().get_metric_history(tuned.run_id, "val_loss")
    assert [m.step for m in history] == [1, 3]

    # Same inputs again: every stage is a cache hit, no new training run.
    assert finetune(**kwargs).finetune.run_id == tuned.run_id

    # The registered files are the adapter alone; loading them rebuilds base + adapter.
    registered = tracking.model_directory(tuned.model_ref, tmp_path / "download")
    assert {"adapter.json", "adapter.safetensors"} <= {p.name for p in registered.iterdir()}
    assert "model.safetensors" not in {p.name for p in registered.iterdir()}
    x = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(tuned.adapter_dir)(x)
        shutil.rmtree(tuned.base_dir)  # only the registry has the base now
        torch.testing.assert_close(load_model(registered)(x), expected)

    assert (
        main(["generate", tuned.model_ref, "Name a color.", "--max-new-tokens", "4", "--output-dir", out])
        == 0
    )
    assert capsys.readouterr().out.startswith("Name a color.")


@pytest.mark.slow
def test_two_devices_train_in_launched_processes(tiny_base, train_json, tmp_path):
    """devices=2 (two CPU processes, DDP): the run goes through groundup.train.launch and hands back the
    same kind of result; both ranks share the batches, so an epoch takes half the steps."""
    config = tiny_config(epochs=1, runtime=RuntimeConfig(accelerator="cpu", devices=2))
    result = finetune_gpt(tiny_base, train_json, config, tmp_path / "ddp", val_fraction=0.1, seed=123)
    # 22 training entries over 2 ranks: 11 each, 3 batches of up to 4 per rank.
    assert (result.n_train, result.progress.step) == (22, 3)
    assert result.progress.evals[-1].train_loss < result.progress.evals[0].train_loss
    assert (result.adapter_dir / "adapter.safetensors").is_file() and result.loss_plot.is_file()
    assert read_adapter_config(result.adapter_dir)["base"]["path"] == str(tiny_base.resolve())
