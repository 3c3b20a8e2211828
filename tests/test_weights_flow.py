"""The ``load-gpt2`` flow, its ``fetch_gpt2_weights`` task and ``groundup gpt2``: real Prefect (test harness),
real MLflow (SQLite in a temp dir), a tiny GPT-2 checkpoint in Hugging Face's format."""

from __future__ import annotations

from pathlib import Path

import pytest

from groundup import tracking
from groundup.config import WeightsConfig
from groundup.files import sha256_file
from groundup.model.io import load_checkpoint
from tests.gpt2_fixtures import assert_reproduces, save_hf, tiny_gpt2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return tiny_gpt2(seed=3)


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory) -> Path:
    return save_hf(reference, tmp_path_factory.mktemp("hf") / "gpt2-tiny")


def test_flow_registers_the_model_with_its_source_files_as_lineage(reference, hf_dir, prefect_harness, mlflow_tracking, tmp_path):
    from groundup.flows.weights import load_gpt2

    config = WeightsConfig(from_dir=str(hf_dir))
    result = load_gpt2(config=config, output_dir=str(mlflow_tracking))

    assert result.model_version == "gpt2-custom/1" and result.converted
    assert Path(result.checkpoint).is_relative_to(mlflow_tracking / "models")
    assert_reproduces(reference, result.checkpoint)
    version = tracking.resolve_version(result.model_version)
    safetensors_sha256 = sha256_file(hf_dir / "model.safetensors")
    assert version.tags["groundup.parent"] == f"dir:{hf_dir.resolve()}"
    assert version.tags["groundup.source_url.config.json"] == str(hf_dir.resolve() / "config.json")
    tree = tracking.lineage(result.model_version)
    assert tree["parent"] == {"model": f"dir:{hf_dir.resolve()}", "external": True}
    assert tree["stage"] == "gpt2_weights"
    assert tree["datasets"]["model.safetensors"] == safetensors_sha256  # the run's input, full digest
    # The stage run logged the source files as its inputs and the smoke generation as an artifact.
    run = tracking.client().get_run(result.run_id)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"config.json", "model.safetensors"}
    assert run.data.metrics["n_parameters"] == reference.num_parameters()
    # What the registry holds is the checkpoint itself.
    registered = tracking.model_directory(result.model_version, tmp_path / "registered")
    assert_reproduces(reference, registered)

    # Same settings, same files: a cache hit, no second version.
    again = load_gpt2(config=config, output_dir=str(mlflow_tracking))
    assert again.model_version == "gpt2-custom/1" and again.run_id == result.run_id

    # The cached checkpoint was deleted: converted and registered again.
    import shutil

    shutil.rmtree(result.checkpoint)
    rebuilt = load_gpt2(config=config, output_dir=str(mlflow_tracking))
    assert rebuilt.model_version == "gpt2-custom/2" and Path(rebuilt.checkpoint).is_dir()

    # Other weights in the same directory: a cache miss.
    other = save_hf(tiny_gpt2(seed=4), tmp_path / "other")
    changed = shutil.copytree(hf_dir, tmp_path / "changed")
    shutil.copyfile(other / "model.safetensors", changed / "model.safetensors")
    third = load_gpt2(config=WeightsConfig(from_dir=str(changed)), output_dir=str(mlflow_tracking))
    assert third.model_version == "gpt2-custom/3"


def test_cli_prints_a_checkpoint_that_generate_can_use(reference, hf_dir, prefect_harness, mlflow_tracking, tmp_path, capsys):
    from groundup.cli import main

    out = tmp_path / "gpt2-out"
    code = main(["gpt2", "--from", str(hf_dir), "--out", str(out), "--output-dir", str(mlflow_tracking)])

    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(printed) == out.resolve()
    assert load_checkpoint(printed).cfg.qkv_bias

    code = main(["generate", printed, "Every effort moves you", "--max-new-tokens", "5", "--no-stream"])
    assert code == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")


def test_cli_rejects_an_unknown_size(mlflow_tracking, capsys):
    from groundup.cli import main

    assert main(["gpt2", "--size", "7B", "--output-dir", str(mlflow_tracking)]) == 2
    assert "size" in capsys.readouterr().err
