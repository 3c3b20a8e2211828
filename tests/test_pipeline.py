"""The whole pipeline in the Prefect test harness: every stage for real on tiny models, then the cache
semantics: a failed stage fails the flow, a rerun reuses what finished, a change reruns only what it feeds."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from groundup import serving, tracking
from groundup.config import ConfigError, PipelineConfig, load_config, local_sources
from groundup.flows.pipeline import check
from groundup.report import next_commands, summary
from tests.pipeline_fixtures import judge_reply, settled_states, sources_dir, tiny_config, tiny_gpt2_dir

# Stages whose results are cached on content, and those that run every time by design: the download
# (what a URL serves may change; everything after it is keyed on the bytes), the corpus record (cheap
# bookkeeping) and the promotion (it depends on the registry's current state).
CACHED = {"tokenize_to_parquet", "pretrain", "fetch_gpt2_weights", "split_instructions", "finetune",
          "generate_responses", "judge_responses"}  # fmt: skip
ALWAYS = {"download_text", "record_corpus", "promote"}


# ---------------------------------------------------------------------------------------------------------
# Settings: --sources-dir and combinations the pipeline refuses
# ---------------------------------------------------------------------------------------------------------


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_sources_dir_points_every_source_at_local_files(tmp_path):
    root = tmp_path / "data"
    _touch(root / "the-verdict.txt"), _touch(root / "instruction-data.json")
    vocab = (tmp_path / "vocab" / "gpt2").resolve()
    vocab.mkdir(parents=True)  # the layout of ../shared: vocab/gpt2 beside data/
    _touch(root / "gpt2" / "config.json")
    _touch(root / "judge" / "lit_model.pth")
    config = load_config(PipelineConfig, "quickstart", local_sources(root))
    assert config.data.source == str((root / "the-verdict.txt").resolve())
    assert config.instruct.source == str((root / "instruction-data.json").resolve())
    assert config.data.vocab_dir == str(vocab)
    assert config.weights.enabled and config.weights.from_dir == str((root / "gpt2").resolve())
    assert config.finetune.base == "gpt2-124M"
    assert config.judge.enabled and config.judge.model == str((root / "judge").resolve())


def test_sources_dir_with_a_litgpt_base_finetunes_it_with_the_litgpt_engine(tmp_path):
    _touch(tmp_path / "the-verdict.txt"), _touch(tmp_path / "instruction-data.json")
    _touch(tmp_path / "base" / "lit_model.pth"), _touch(tmp_path / "gpt2" / "config.json")
    config = load_config(PipelineConfig, "quickstart", local_sources(tmp_path))
    assert config.finetune.engine == "litgpt" and config.finetune.base == str((tmp_path / "base").resolve())
    assert not config.weights.enabled  # the base is the real model; GPT-2 is not needed
    check(config)


def test_sources_dir_without_gpt2_or_judge_finetunes_the_pretrained_model_and_skips_the_judge(tmp_path):
    _touch(tmp_path / "the-verdict.txt"), _touch(tmp_path / "instruction-data.json")
    config = load_config(PipelineConfig, "quickstart", local_sources(tmp_path))
    assert not config.weights.enabled and config.finetune.base == "pretrained"
    assert not config.judge.enabled
    check(config)  # a consistent combination


def test_sources_dir_names_what_is_missing(tmp_path):
    _touch(tmp_path / "the-verdict.txt")
    with pytest.raises(ConfigError, match="instruction-data.json"):
        local_sources(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["weights.enabled=false"], "needs the GPT-2 weights stage"),
        (["finetune.base=gpt2-355M"], "must name one GPT-2"),
        (["finetune.engine=litgpt", "finetune.base=pretrained"], "which engine .litgpt. cannot finetune"),
    ],
)
def test_inconsistent_settings_are_refused_before_any_stage(overrides, message):
    with pytest.raises(ValueError, match=message):
        check(load_config(PipelineConfig, "quickstart", overrides))


# ---------------------------------------------------------------------------------------------------------
# The flow in the harness
# ---------------------------------------------------------------------------------------------------------


def task_states(flow_run_id, expected: Iterable[str] = ()) -> dict[str, str]:
    """Task run name -> state name, as the Prefect API recorded them (last run of each name), once settled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def read() -> dict[str, str]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name: run.state.name for run in sorted(runs, key=lambda r: r.expected_start_time) if run.state}

    return settled_states(read, expected)


def run_pipeline(config, expected: Iterable[str] = ()):
    """The flow's final state and its task runs' states (every stage it reports, and ``expected``)."""
    from groundup.flows.pipeline import pipeline

    state = pipeline(config=config, return_state=True)
    if state.is_completed():
        expected = {*expected, *state.result().stages}
    return state, task_states(state.state_details.flow_run_id, expected)


@pytest.fixture
def judge():
    from tests.chat_server import ChatServer

    with ChatServer(judge_reply) as server:
        yield server


@pytest.fixture
def sources(tmp_path, verdict_path, instruction_data_path, gpt2_vocab_dir):
    return sources_dir(
        tmp_path / "sources", verdict_path, instruction_data_path, gpt2_vocab_dir, tiny_gpt2_dir(tmp_path / "hf")
    )


def run_next_commands(result, out) -> None:
    """Every command the summary prints for the next step runs, as printed, in a shell of this directory."""
    commands = [line[13:].split("    (")[0] for line in next_commands(result, out) if "--output-dir" in line]
    assert len(commands) == 3 and any(" lineage " in c for c in commands) and commands[-1].endswith(f"ui --stop --output-dir {out}")
    # As in a user's shell: not the test harness's Prefect API, home or database.
    harness = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in harness}
    for line in commands:
        done = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
        if " lineage " in line:
            assert result.finetune.model_ref in done.stdout
    assert serving.running_servers(out) == {}  # the last one printed stopped what the one before started


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_reruns_only_what_changed(
    sources, judge, tmp_path, mlflow_tracking, prefect_harness
):
    out = mlflow_tracking  # the store the fixture configured; the flow prepares the same one
    config = tiny_config(sources, out, judge.base_url)

    state, states = run_pipeline(config)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(states) == CACHED | ALWAYS and set(states.values()) == {"Completed"}
    assert result.stages == states
    report = summary(result, config, out, str(sources))
    assert re.search(r"\n  pretrain +Completed\n", report) and "promotion    " in report
    assert re.search(r"\n  evaluate_mc_base_model +skipped: mc_eval.enabled is false", report)
    assert f"finetuned {result.judge.metrics['judge.finetuned_model.mean']:.1f}" in report

    # One parent run; every stage's run nests under it.
    client = tracking.client()
    parent = client.get_run(result.run_id)
    assert parent.data.tags["mlflow.runName"] == "groundup-pipeline"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert {c.data.tags["groundup.stage"] for c in children} >= {
        "data", "pretrain", "gpt2_weights", "split_instructions", "finetune_groundup", "generate_responses",
        "judge_responses", "promote",
    }  # fmt: skip
    assert parent.data.metrics["judge.finetuned_model.mean"] == result.judge.metrics["judge.finetuned_model.mean"]

    # Promotion and lineage: finetuned adapter -> GPT-2 weights, with datasets and the evaluation.
    finetuned = result.finetune.model_ref
    name = finetuned.split("/")[0]
    assert result.promotion.aliases == ["candidate", "champion"]
    assert tracking.version_ref(tracking.resolve_version(f"{name}@champion")) == finetuned
    node = tracking.lineage(f"{name}@champion")
    assert node["model"] == finetuned and set(node["aliases"]) == {"candidate", "champion"}
    assert node["datasets"]["instruct-train"] == result.split.train_sha256
    assert [e["run_id"] for e in node["evaluations"]] == [result.judge.run_id]
    assert node["parent"]["model"] == result.weights.model_version
    assert node["parent"]["stage"] == "gpt2_weights"
    assert tracking.lineage(result.pretrain.model_version)["datasets"]["pretrain-tokens"] == result.data.tokens.parquet_sha256
    check_mlflow_graph(MlflowClient(tracking.client().tracking_uri), result.run_id, result.weights.model_version)

    # The judge is unreachable: the flow fails with the judge's error; nothing before it ran again.
    dead = tiny_config(sources, out, "http://127.0.0.1:9/v1", ["judge.max_new_tokens=5"])
    state, states = run_pipeline(dead, expected={"judge_responses"})
    assert state.is_failed()
    assert "127.0.0.1:9" in str(state.message) or "127.0.0.1:9" in repr(state.result(raise_on_failure=False))
    assert states["judge_responses"] == "Failed"
    assert {n for n, s in states.items() if s == "Cached"} == CACHED - {"judge_responses"}

    # Fixed, with other judge settings: only the judge runs (besides the always-run bookkeeping).
    state, states = run_pipeline(tiny_config(sources, out, judge.base_url, ["judge.max_new_tokens=5"]))
    assert state.is_completed(), state.message
    assert {n for n, s in states.items() if s != "Cached"} == ALWAYS | {"judge_responses"}
    assert state.result().promotion.reason == "already the champion"

    # One byte of the text changed: tokenizing and pretraining run again, nothing else.
    text = sources / "the-verdict.txt"
    text.write_text(text.read_text(encoding="utf-8").replace("a", "e", 1), encoding="utf-8")
    state, states = run_pipeline(tiny_config(sources, out, judge.base_url, ["judge.max_new_tokens=5"]))
    assert state.is_completed(), state.message
    assert {n for n, s in states.items() if s != "Cached"} == ALWAYS | {"tokenize_to_parquet", "pretrain"}
    assert state.result().pretrain.model_version != result.pretrain.model_version

    # Last, as they start servers of their own: the next steps the first run's summary printed.
    run_next_commands(result, out)


def check_mlflow_graph(client, pipeline_run_id: str, base_ref: str) -> None:
    """MLflow's own lineage, read with a plain ``MlflowClient`` (the REST API against a server): the models
    a stage consumed are inputs of its run, the models it produced outputs; the parent run lists datasets."""
    parent = client.get_run(pipeline_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline_run_id}'")
    # search_runs leaves out model inputs and outputs: get_run has them
    stages = {r.data.tags["groundup.stage"]: client.get_run(r.info.run_id) for r in children}

    def model_id(ref: str) -> str:
        name, version = ref.rsplit("/", 1)
        return client.get_model_version(name, version).source.removeprefix("models:/")

    base, finetuned = model_id(base_ref), model_id(parent.data.tags["groundup.model.finetune"])
    finetune_run = stages["finetune_groundup"]
    assert base in {m.model_id for m in finetune_run.inputs.model_inputs}
    assert finetuned in {m.model_id for m in finetune_run.outputs.model_outputs}
    assert client.get_logged_model(finetuned).source_run_id == finetune_run.info.run_id
    assert finetuned in {m.model_id for m in stages["judge_responses"].inputs.model_inputs}
    assert {base, finetuned} == {m.model_id for m in stages["generate_responses"].inputs.model_inputs}
    pretrained = model_id(parent.data.tags["groundup.model.pretrain"])
    assert pretrained in {m.model_id for m in stages["pretrain"].outputs.model_outputs}
    assert {"the-verdict.txt", "pretrain-tokens", "instruct-train", "instruct-test"} <= {
        d.dataset.name for d in parent.inputs.dataset_inputs
    }


# ---------------------------------------------------------------------------------------------------------
# deployments/prefect.yaml, as `groundup serve` and `groundup deploy` build it (no server needed)
# ---------------------------------------------------------------------------------------------------------


def test_every_declared_deployment_builds_with_profile_settings_and_schedules(tmp_path):
    from groundup.flows.deployments import build_all, read_declarations

    _touch(tmp_path / "the-verdict.txt"), _touch(tmp_path / "instruction-data.json")
    overrides = [*local_sources(tmp_path), "finetune.lr=0.01", "train.epochs=2", "judge.max_new_tokens=9"]
    deployments = {f"{d.flow_name}/{d.name}": d for d in build_all(profile="quickstart", overrides=overrides)}
    assert len(deployments) == len(read_declarations())
    assert set(deployments) >= {"groundup-pipeline/weekly", "prepare-data/daily-refresh", "finetune/on-demand",
                                "evaluate/on-demand", "pretrain/on-demand", "load-gpt2/on-demand"}  # fmt: skip
    assert all(d.enforce_parameter_schema for d in deployments.values())
    assert all(d.entrypoint.startswith("groundup.flows.") for d in deployments.values())

    pipeline = deployments["groundup-pipeline/weekly"]
    assert [s.schedule.cron for s in pipeline.schedules] == ["0 3 * * 1"] and pipeline.schedules[0].active
    settings = PipelineConfig.model_validate(pipeline.parameters["config"])
    assert settings.model.preset == "gpt-mini"  # the quickstart profile
    assert settings.data.source == str((tmp_path / "the-verdict.txt").resolve())
    assert (settings.finetune.lr, settings.train.epochs, settings.judge.max_new_tokens) == (0.01, 2, 9)

    assert [s.schedule.cron for s in deployments["prepare-data/daily-refresh"].schedules] == ["0 2 * * *"]
    assert deployments["prepare-data/daily-refresh"].parameters["config"]["source"] == settings.data.source
    finetune = deployments["finetune/on-demand"].parameters
    assert finetune["config"]["lr"] == 0.01 and finetune["data"]["source"] == settings.instruct.source
    assert deployments["pretrain/on-demand"].parameters["config"]["train"]["epochs"] == 2
    assert deployments["evaluate/on-demand"].parameters["config"]["judge"]["max_new_tokens"] == 9
    # Served deployments have no work pool; registered ones get the declared queue.
    assert pipeline.work_queue_name is None
    pooled = build_all(profile="quickstart", pool=True)[0]
    assert pooled.work_queue_name == "default"


def test_the_offline_summary_lists_every_stage_with_why_the_skipped_ones_did_not_run(tmp_path):
    from groundup.report import stage_lines

    _touch(tmp_path / "the-verdict.txt"), _touch(tmp_path / "instruction-data.json")
    config = load_config(PipelineConfig, "quickstart", local_sources(tmp_path))
    ran = ["download_text", "tokenize_to_parquet", "record_corpus", "pretrain", "split_instructions", "finetune",
           "generate_responses", "promote"]  # fmt: skip
    lines = stage_lines(dict.fromkeys(ran, "Completed"), config, str(tmp_path))
    assert [line.split()[0] for line in lines] == [*ran[:4], "fetch_gpt2_weights", *ran[4:7],
        "evaluate_mc_base_model", "evaluate_mc_finetuned_model", "judge_responses", "promote"]  # fmt: skip
    skipped = {line.split()[0]: line.split(None, 1)[1] for line in lines if "skipped" in line}
    assert skipped["fetch_gpt2_weights"].startswith("skipped: no gpt2/ in --sources-dir")
    assert skipped["judge_responses"].startswith("skipped: no judge/ in --sources-dir")


def test_a_missing_deployments_file_is_named(tmp_path):
    from groundup.flows.deployments import read_declarations

    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_declarations(tmp_path / "nope.yaml")
