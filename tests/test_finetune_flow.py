"""The ``finetune`` flow end to end with LitGPT: a tiny checkpoint finetuned for a few steps on CPU on a slice
of the workshop's instruction data, through real Prefect, MLflow (SQLite) and a real LitGPT subprocess."""

from __future__ import annotations

import json

import pytest

from groundup import tracking
from groundup.config import FinetuneConfig, InstructDataConfig, load_config

pytestmark = pytest.mark.slow


def finetune_overrides(base) -> list[str]:
    return [
        "engine=litgpt",
        f"base={base}",
        "epochs=1",
        "max_steps=3",
        "global_batch_size=4",
        "micro_batch_size=2",
        "eval_interval=2",
        "log_interval=1",
        "lora.r=4",
        "lora.alpha=8",
        "runtime.accelerator=cpu",
    ]


def stage_runs(name: str) -> list:
    experiment = tracking.client().get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = tracking.client().search_runs([experiment.experiment_id], f"tags.`groundup.stage` = '{name}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def test_finetune_flow_trains_tracks_registers_and_caches(
    prefect_harness, mlflow_tracking, tiny_litgpt_dir, instruction_data_path
):
    import litgpt

    from groundup.cli import main
    from groundup.flows.finetune import finetune

    out = str(mlflow_tracking)
    config = load_config(
        FinetuneConfig, "quickstart", finetune_overrides(tiny_litgpt_dir), section="finetune"
    )
    data = load_config(
        InstructDataConfig, "quickstart", [f"source={instruction_data_path}", "limit=40"], "instruct"
    )

    first = finetune(config=config, data=data, output_dir=out)
    split, result = first.split, first.finetune

    # The split: 34/6 of the first 40 entries; the val share (0.1 of train) is held out for finetuning.
    assert (split.n_train, split.n_test) == (34, 6)
    assert (result.n_train, result.n_val) == (31, 3)

    # The merged model is a complete LitGPT checkpoint that loads and generates.
    llm = litgpt.LLM.load(result.model_dir)
    assert isinstance(llm.generate("Name a color.", max_new_tokens=4, temperature=0.0), str)
    assert result.lora_weights.endswith("final/lit_model.pth.lora")
    # The checkpoint records our prompt style, so LLM.load / litgpt serve format prompts like training did.
    assert (
        "groundup.instruct.litgpt_prompts.Alpaca" in open(f"{result.model_dir}/prompt_style.yaml").read()
    )

    # Metrics with steps in the stage's MLflow run; datasets with digests; the model registered with lineage.
    run = tracking.client().get_run(result.run_id)
    loss = tracking.client().get_metric_history(result.run_id, "loss")
    assert len(loss) == 6 and [m.step for m in loss] == [1, 2, 3, 4, 5, 6]  # 3 steps x 2 micro batches
    assert [m.step for m in tracking.client().get_metric_history(result.run_id, "val_loss")] == [4, 6]
    for name in ("learning_rate", "iter_time", "tokens", "val_ppl"):
        assert tracking.client().get_metric_history(result.run_id, name), name
    assert run.data.metrics["final_val_loss"] == pytest.approx(result.metrics["val_loss"])
    assert run.data.params["lora.r"] == "4" and run.data.params["accelerator"] == "cpu"
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs["instruct-train"] == split.train_sha256[:16] and "instruct-val" in inputs

    assert result.model_ref == "finetuned-tiny-pythia/1"
    node = tracking.lineage(result.model_ref)
    assert node["datasets"]["instruct-train"] == split.train_sha256 and set(node["datasets"]) == set(inputs)
    assert node["parent"] == {"model": f"dir:{tiny_litgpt_dir}", "external": True}
    version = tracking.resolve_version(result.model_ref)
    assert version.tags["groundup.base_sha256"] == result.base_sha256
    files = tracking.model_directory(result.model_ref, mlflow_tracking.parent / "download")
    assert (files / "lit_model.pth").is_file() and (files / "lit_model.pth.lora").is_file()

    # The same inputs again, through the CLI: a cache hit (no new training run, no new version).
    sets = [f"--set={o}" for o in finetune_overrides(tiny_litgpt_dir)[2:]]
    argv = ["finetune", "--base", str(tiny_litgpt_dir), "--engine", "litgpt", *sets]
    argv += [f"--set=instruct.source={instruction_data_path}", "--set=instruct.limit=40", "--output-dir", out]
    assert main(argv) == 0
    assert len(stage_runs("finetune_lora")) == 1
    assert len(tracking.client().search_model_versions("name='finetuned-tiny-pythia'")) == 1

    # A different LoRA rank is a miss: a new run and a new version.
    rank_2 = load_config(
        FinetuneConfig, "quickstart", [*finetune_overrides(tiny_litgpt_dir), "lora.r=2"], "finetune"
    )
    changed = finetune(config=rank_2, data=data, output_dir=out)
    assert changed.finetune.run_id != result.run_id
    assert changed.finetune.model_ref == "finetuned-tiny-pythia/2"
    assert len(stage_runs("finetune_lora")) == 2


def test_cli_instruct_split(prefect_harness, mlflow_tracking, instruction_data_path, tmp_path, capsys):
    from groundup.cli import main

    target = tmp_path / "split"
    argv = [
        "instruct",
        "split",
        "--source",
        str(instruction_data_path),
        "--out",
        str(target),
        "--shuffle",
        "--seed",
        "5",
        "--set",
        "limit=null",
        "--output-dir",
        str(mlflow_tracking),
    ]  # the profile's limit off
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    train = json.loads((target / "train.json").read_text(encoding="utf-8"))
    test = json.loads((target / "test.json").read_text(encoding="utf-8"))
    original = json.loads(instruction_data_path.read_text(encoding="utf-8"))
    assert (len(train), len(test)) == (935, 165)
    assert train != original[:935]  # shuffled
    assert sorted(json.dumps(e) for e in train + test) == sorted(json.dumps(e) for e in original)
    assert printed["train"] == str(target / "train.json")

    run = tracking.client().get_run(printed["run_id"])
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {
        "instruct-train": printed["train_sha256"][:16],
        "instruct-test": printed["test_sha256"][:16],
    }


def test_cli_split_of_invalid_data_is_a_clean_error(prefect_harness, mlflow_tracking, tmp_path, capsys):
    from groundup.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "input": "", "output": ""}]', encoding="utf-8")
    assert main(["instruct", "split", "--source", str(bad), "--output-dir", str(mlflow_tracking)]) == 1
    assert "entry 0: field 'output' is empty" in capsys.readouterr().err
    assert not (mlflow_tracking / "instruct").exists() or not any(
        (mlflow_tracking / "instruct").rglob("*.json")
    )
