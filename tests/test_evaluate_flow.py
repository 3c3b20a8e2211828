"""Flow ``evaluate`` end to end on real Prefect and MLflow: responses of a tiny groundup GPT (base) and a tiny
LitGPT checkpoint (finetuned, registered), an OpenAI-compatible judge on 127.0.0.1, lm-eval on a local task;
scores recorded on the finetuned model's registered version. Also the CLI commands."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from groundup import tracking
from groundup.config import EvaluateConfig, GenerationConfig, JudgeConfig, MCEvalConfig
from tests.chat_server import ChatServer
from tests.eval_fixtures import MC_TASK, save_tiny_gpt, write_mc_task

ENTRIES = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "Fast.",
    },
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome."},
]


class ScriptedJudge:
    """Replies by entry and turn (an entry's base response is judged first, then its finetuned one, then the
    controls: its reference answer and another entry's), so the expected statistics are known: base 30, 50,
    unparsed; finetuned 60, 90, 70; references 90, 80, 95 above mismatched answers 10, 20, 5 (AUC 1)."""

    REPLIES = {
        0: ("30", "60", "90", "10"),
        1: ("Score: 50/100", "90", "80", "20"),
        2: ("eighty", "70", "95", "5"),
    }

    def __init__(self) -> None:
        self.turns: Counter[int] = Counter()

    def __call__(self, messages: list[dict[str, str]]) -> str:
        prompt = messages[-1]["content"]
        entry = next(i for i, e in enumerate(ENTRIES) if f"### Instruction:\n{e['instruction']}" in prompt)
        reply = self.REPLIES[entry][self.turns[entry] % 4]
        self.turns[entry] += 1
        return reply


@pytest.fixture
def setup(tmp_path, tiny_litgpt_dir, gpt2_vocab_dir, mlflow_tracking):
    test_data = tmp_path / "test.json"
    test_data.write_text(json.dumps(ENTRIES), encoding="utf-8")
    base = save_tiny_gpt(tmp_path / "base")
    with tracking.start_run("register", output_dir=mlflow_tracking) as run:
        version = run.register_directory(tiny_litgpt_dir, "tiny-finetuned")
    return test_data, base, tracking.version_ref(version), write_mc_task(tmp_path / "tasks")


@pytest.mark.slow
def test_evaluate_flow_records_scores_on_the_registered_model(
    setup, tiny_litgpt_dir, mlflow_tracking, prefect_harness
):
    from prefect.artifacts import Artifact

    from groundup.flows.evaluate import evaluate

    test_data, base, ref, tasks = setup
    server = ChatServer(ScriptedJudge(), model="llama3").start()
    config = EvaluateConfig(
        generation=GenerationConfig(max_new_tokens=4, accelerator="cpu"),
        judge=JudgeConfig(backend="openai-compatible", base_url=server.base_url, model="llama3"),
        mc_eval=MCEvalConfig(
            enabled=True, tasks=[MC_TASK], include_path=str(tasks), limit=3, accelerator="cpu"
        ),
    )
    arguments = {
        "config": config,
        "test_data": str(test_data),
        "base_model": str(base),
        "finetuned_model": str(tiny_litgpt_dir),
        "finetuned_ref": ref,
        "output_dir": str(mlflow_tracking),
    }
    try:
        result = evaluate(**arguments)
        judged = len(server.requests)
        # a second run with the same inputs is served from Prefect's cache: no new judge requests
        again = evaluate(**arguments)
    finally:
        server.stop()
    assert judged == 4 * len(ENTRIES) and len(server.requests) == judged
    assert again.judge.run_id == result.judge.run_id
    assert again.responses == result.responses

    assert result.responses.entries == len(ENTRIES)
    summary = result.judge.summary
    assert summary["base_model"]["unparsed"] == 1 and summary["base_model"]["mean"] == pytest.approx(40.0)
    assert summary["finetuned_model"]["unparsed"] == 0 and summary["finetuned_model"][
        "mean"
    ] == pytest.approx((60 + 90 + 70) / 3)
    assert summary["difference"]["pairs"] == 2 and summary["difference"]["mean"] == pytest.approx(35.0)
    assert summary["control"]["auc"] == 1.0 and summary["control"]["trusted"]
    assert summary["reference_answer"]["mean"] == pytest.approx(265 / 3)
    assert result.judge.verdict.startswith("The judge tells right from wrong: control AUC 1.00")
    assert set(result.mc_eval) == {"base_model", "finetuned_model"}
    assert result.mc_eval["finetuned_model"].samples == {MC_TASK: 3}

    # MLflow: nested stage runs with metrics and artifacts
    client = tracking.client()
    judge_run = client.get_run(result.judge.run_id)
    assert judge_run.data.tags["mlflow.parentRunId"] == result.run_id
    assert judge_run.data.metrics["judge.finetuned_model.mean"] == pytest.approx((60 + 90 + 70) / 3)
    assert judge_run.data.metrics["judge.base_model.unparsed_share"] == pytest.approx(1 / 3)
    assert judge_run.data.metrics["judge.control.auc"] == 1.0
    assert judge_run.data.metrics["judge.mismatched_answer.mean"] == pytest.approx(35 / 3)
    assert judge_run.data.tags[tracking.TAG + "judge.verdict"] == result.judge.verdict
    artifacts = {a.path for a in client.list_artifacts(judge_run.info.run_id)}
    assert {"scores_table.json", "judge"} <= artifacts
    judge_files = {Path(a.path).name for a in client.list_artifacts(judge_run.info.run_id, "judge")}
    assert {"scores.parquet", "judgments.jsonl", "scores_histogram.png"} <= judge_files
    scores = pd.read_parquet(result.judge.scores)
    assert scores["base_model_reply"].tolist() == ["30", "Score: 50/100", "eighty"]

    # the registry shows the evaluation next to the model
    node = tracking.lineage(ref)
    runs = {e["run_id"]: e["metrics"] for e in node["evaluations"]}
    assert result.judge.run_id in runs
    assert runs[result.judge.run_id]["judge.difference.mean"] == pytest.approx(35.0)
    assert f"mc.{MC_TASK}.acc" in runs[result.mc_eval["finetuned_model"].run_id]
    version = tracking.resolve_version(ref)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert "judge.finetuned_model.mean" in {m.key for m in logged.metrics or []}
    # MLflow's own graph: the evaluated model is an input of the evaluation runs
    for run_id in (result.judge.run_id, result.mc_eval["finetuned_model"].run_id):
        assert logged.model_id in {m.model_id for m in client.get_run(run_id).inputs.model_inputs}
    assert f"[judge_responses](#/experiments/{judge_run.info.experiment_id}/runs/{judge_run.info.run_id})" in (
        client.get_model_version(version.name, version.version).description
    )

    # Prefect artifacts: per-entry table, summary, responses preview
    for key in ("judge-scores", "judge-summary", "test-responses", "mc-eval-finetuned-model"):
        assert Artifact.get(key) is not None, key
    table = json.loads(Artifact.get("judge-scores").data)
    assert [row["finetuned_model_score"] for row in table] == [60, 90, 70]
    assert result.judge.verdict in Artifact.get("judge-summary").data


@pytest.mark.slow
def test_cli_respond_and_judge(setup, tiny_litgpt_dir, mlflow_tracking, prefect_harness, capsys):
    from groundup.cli import main

    test_data, base, ref, _ = setup
    out = str(mlflow_tracking)
    common = ["--profile", "", "--output-dir", out]
    respond = ["respond", str(test_data), str(base), str(tiny_litgpt_dir), *common]
    assert main([*respond, "--set", "generation.max_new_tokens=3", "--set", "accelerator=cpu"]) == 0
    responded = json.loads(capsys.readouterr().out)
    assert responded["entries"] == len(ENTRIES)
    records = [json.loads(line) for line in Path(responded["responses"]).read_text().splitlines()]
    assert records[0]["generation"]["max_new_tokens"] == 3

    with ChatServer(ScriptedJudge(), model="llama3") as server:
        judge = ["judge", responded["responses"], "--finetuned-ref", ref, *common]
        settings = ["backend=openai-compatible", f"base_url={server.base_url}", "judge.model=llama3"]
        assert main([*judge, *(arg for s in settings for arg in ("--set", s))]) == 0
    judged = json.loads(capsys.readouterr().out)
    assert judged["summary"]["base_model"]["unparsed"] == 1
    assert judged["run_id"] in [e["run_id"] for e in tracking.lineage(ref)["evaluations"]]

    missing = Path(out) / "nope"
    assert main(["respond", str(test_data), str(base), str(missing), *common]) == 1
    assert f"model {str(missing)!r}: no such directory" in capsys.readouterr().err
