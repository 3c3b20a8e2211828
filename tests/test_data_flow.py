"""The ``prepare-data`` flow end to end: real Prefect (test harness), MLflow on SQLite, HTTP on 127.0.0.1,
Parquet on disk; its content-hash cache; its retries; bad input through the flow and the CLI."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from groundup import tracking
from groundup.config import DataConfig
from groundup.download import ChecksumError
from groundup.flows.data import prepare_data
from groundup.tasks.data import ARTIFACT_KEY, download_text, tokenize_to_parquet
from groundup.text.corpus import CorpusError
from groundup.text.store import read_tokens

VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


@pytest.fixture
def served_verdict(file_server, verdict_path) -> str:
    shutil.copy(verdict_path, file_server.root / "the-verdict.txt")
    return f"{file_server.url}/the-verdict.txt"


def data_stage_runs() -> list:
    experiment = tracking.client().get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    return tracking.client().search_runs([experiment.experiment_id], "tags.`groundup.stage` = 'data'")


def corpus_artifacts(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )


def files_under(directory) -> list:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_prepare_data_from_a_url(prefect_harness, mlflow_tracking, served_verdict, gpt2_vocab_dir):
    config = DataConfig(source=served_verdict, sha256=VERDICT_SHA256, vocab_dir=str(gpt2_vocab_dir))

    state = prepare_data(config=config, output_dir=str(mlflow_tracking), return_state=True)
    result = state.result()

    # The text landed content-addressed in the downloads cache; the tokens are tiktoken's.
    assert result.text.path == str(mlflow_tracking / "downloads" / VERDICT_SHA256 / "the-verdict.txt")
    assert result.text.sha256 == VERDICT_SHA256
    assert (result.tokens.tokens, result.tokens.characters) == (5145, 20479)
    assert read_tokens(result.tokens.parquet)[:4].tolist() == [40, 367, 2885, 1464]
    assert result.tokens.parquet.startswith(str(mlflow_tracking / "data" / "the-verdict-b41e41a68f03-gpt2"))
    assert result.tokens.parquet_sha256 == hashlib.sha256(open(result.tokens.parquet, "rb").read()).hexdigest()

    # MLflow: a "data" stage run nested in the flow's run, with both files as datasets and the statistics.
    run = tracking.client().get_run(result.corpus.run_id)
    parent = tracking.client().get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["mlflow.runName"] == "prepare-data"
    assert run.data.tags["groundup.flow_run_id"] == str(state.state_details.flow_run_id)
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"the-verdict.txt", result.tokens.parquet.rsplit("/", 1)[1]}
    assert datasets["the-verdict.txt"].dataset.digest == VERDICT_SHA256[:16]
    assert {t.key: t.value for t in datasets["the-verdict.txt"].tags}["groundup.sha256"] == VERDICT_SHA256
    assert datasets["the-verdict.txt"].dataset.source_type == "http"
    parquet_input = datasets[result.tokens.parquet.rsplit("/", 1)[1]]
    assert parquet_input.dataset.digest == result.tokens.parquet_sha256[:16]
    metrics = run.data.metrics
    assert (metrics["tokens"], metrics["characters"], metrics["train_tokens"], metrics["val_tokens"]) == (5145, 20479, 4630, 515)
    assert metrics["unique_tokens"] == result.tokens.unique_tokens == len(set(read_tokens(result.tokens.parquet).tolist()))

    # Prefect: the corpus summary as a markdown artifact of this flow run.
    (artifact,) = corpus_artifacts(state.state_details.flow_run_id)
    assert "| characters | 20,479 |" in artifact.data
    assert "| tokens | 5,145 (gpt2, vocabulary 50,257) |" in artifact.data
    assert f"| unique tokens | {result.tokens.unique_tokens:,} |" in artifact.data
    assert '| 1 | 11 | `","` | 217 |' in artifact.data  # the most frequent token: the comma


def test_tokenize_cache_follows_content(prefect_harness, verdict_path, gpt2_vocab_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "verdict-copy.txt"
    copy.parent.mkdir()
    shutil.copy(verdict_path, copy)
    edited = tmp_path / "edited.txt"
    edited.write_bytes(verdict_path.read_bytes().replace(b"Jack", b"Jock", 1))
    out = tmp_path / "out"

    @flow
    def tokenize_three_times():
        first = tokenize_to_parquet(str(verdict_path), "gpt2", str(gpt2_vocab_dir), str(out), return_state=True)
        same_bytes = tokenize_to_parquet(str(copy), "gpt2", str(gpt2_vocab_dir), str(out), return_state=True)
        one_byte_changed = tokenize_to_parquet(str(edited), "gpt2", str(gpt2_vocab_dir), str(out), return_state=True)
        return first, same_bytes, one_byte_changed

    first, same_bytes, changed = tokenize_three_times()

    assert first.name == "Completed"
    assert same_bytes.name == "Cached" and same_bytes.result() == first.result()
    assert changed.name == "Completed"
    assert changed.result().parquet != first.result().parquet
    assert changed.result().text_sha256 == hashlib.sha256(edited.read_bytes()).hexdigest()

    # Cross-run: a new flow run on the same bytes is a hit; the file is not rewritten.
    parquet = out / "data" / first.result().parquet.rsplit("/", 1)[1]
    mtime = parquet.stat().st_mtime_ns
    again, _, _ = tokenize_three_times()
    assert again.name == "Cached"
    assert parquet.stat().st_mtime_ns == mtime


def test_download_retries_transient_failures_only(prefect_harness, served_verdict, file_server, tmp_path):
    file_server.fail("the-verdict.txt", status=503, times=1)
    quick = download_text.with_options(retry_delay_seconds=0)

    @flow
    def download_twice():
        ok = quick(served_verdict, str(tmp_path), retries=0, backoff=0.01, return_state=True)
        missing = quick(f"{file_server.url}/missing.txt", str(tmp_path), retries=0, backoff=0.01, return_state=True)
        return ok, missing

    ok, missing = download_twice()

    assert ok.is_completed() and ok.result().sha256 == VERDICT_SHA256
    assert missing.is_failed()
    requests = [path for _, path, _ in file_server.requests]
    assert requests == ["the-verdict.txt", "the-verdict.txt", "missing.txt"]  # a 503 is retried, a 404 is not


def test_bad_input_fails_the_flow_at_once_and_leaves_nothing(
    prefect_harness, mlflow_tracking, file_server, served_verdict, gpt2_vocab_dir
):
    (file_server.root / "empty.txt").write_bytes(b"")
    (file_server.root / "latin1.txt").write_bytes("I HAD always thought Jack Gisburn na\xefve".encode("latin-1"))
    cases = [
        (DataConfig(source=f"{file_server.url}/empty.txt"), CorpusError, r"empty.txt: the file is empty"),
        (DataConfig(source=f"{file_server.url}/latin1.txt"), CorpusError,
         r"latin1.txt: not UTF-8 text \(invalid byte 0xef at offset 36\)"),
        (DataConfig(source=served_verdict, sha256="0" * 64), ChecksumError,
         rf"{served_verdict}: sha256 mismatch: expected 0000"),
    ]  # fmt: skip

    for config, error, message in cases:
        file_server.requests.clear()
        with pytest.raises(error, match=message):
            prepare_data(config=config.model_copy(update={"vocab_dir": str(gpt2_vocab_dir)}), output_dir=str(mlflow_tracking))
        assert len(file_server.requests) == 1, config.source  # not retried

    assert files_under(mlflow_tracking / "downloads") == []
    assert files_under(mlflow_tracking / "data") == []
    assert data_stage_runs() == []


def test_cli_data_prepares_and_rebuilds_a_deleted_file(prefect_harness, mlflow_tracking, verdict_path, gpt2_vocab_dir, capsys):
    from groundup.cli import main

    # "--out" is the spelling; argparse takes it as the unambiguous prefix of --output-dir.
    argv = ["data", "--source", str(verdict_path), "--set", f"vocab_dir={gpt2_vocab_dir}", "--out", str(mlflow_tracking)]

    assert main(argv) == 0
    path, count = capsys.readouterr().out.strip().splitlines()[-1].split("\t")
    assert count == "5145 tokens"
    assert path.startswith(str(mlflow_tracking / "data"))
    original = hashlib.sha256(open(path, "rb").read()).hexdigest()

    # The tokenize task's cached result points at a file deleted since: the flow tokenizes again.
    (mlflow_tracking / "data" / path.rsplit("/", 1)[1]).unlink()
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{path}\t5145 tokens"
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == original  # rebuilt byte for byte
    assert len(data_stage_runs()) == 2  # recorded on every run, hit or miss


def test_cli_data_bad_sources_are_one_clear_line(prefect_harness, mlflow_tracking, tmp_path, capsys):
    from groundup.cli import main

    directory = tmp_path / "corpus"
    directory.mkdir()
    for source, problem in [(directory, "is a directory, expected a file"), (tmp_path / "absent.txt", "no such file")]:
        assert main(["data", "--source", str(source), "--output-dir", str(mlflow_tracking)]) == 1
        assert f"groundup: {source}: {problem}" in capsys.readouterr().err

    assert files_under(mlflow_tracking / "data") == []
