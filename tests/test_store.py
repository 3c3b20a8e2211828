"""The artifact store (a folder and a real S3-protocol server) and publishing that two runs may overlap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from groundup.errors import InputDataError, SourceUnreachable
from groundup.files import atomic_directory, sha256_file, sha256_tree
from groundup.store import ArtifactStore
from groundup.train.state import RunDirectory
from tests.conftest import ROOT
from tests.s3_fixtures import s3_bucket  # noqa: F401  (fixture)


@pytest.fixture(params=["folder", "s3"])
def store_url(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_bucket')}/{tmp_path.name}"


def a_directory(root: Path, marker: str = "x") -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(1 << 16) if marker == "random" else b"w" * 70000)
    (root / "sub" / "config.json").write_text(json.dumps({"marker": marker}))
    return root


def test_put_and_get_by_content_with_a_cache_per_machine(store_url, tmp_path):
    model = a_directory(tmp_path / "model")
    (tmp_path / "train.json").write_text("[1, 2, 3]")
    machine_a = ArtifactStore(store_url, tmp_path / "cache-a")
    url = machine_a.put(model)
    assert url == f"{machine_a.url}/sha256/{sha256_tree(model)}/model"
    assert machine_a.put(model) == url and machine_a.exists(url)
    file_url = machine_a.put(tmp_path / "train.json")
    assert file_url.endswith("/train.json") and file_url.startswith(store_url.rstrip("/"))

    machine_b = ArtifactStore(store_url, tmp_path / "cache-b")
    copy = machine_b.get(url)
    assert copy.is_relative_to(tmp_path / "cache-b") and copy.name == "model"
    assert sha256_tree(copy) == sha256_tree(model)
    assert machine_b.get(file_url).read_text() == "[1, 2, 3]"
    # The second get is the cache: it holds even when the store no longer answers for it.
    machine_b.fs.rm(machine_b._manifest_path(sha256_tree(model)))
    assert machine_b.get(url) == copy
    with pytest.raises(SourceUnreachable, match="not in the artifact store"):
        ArtifactStore(store_url, tmp_path / "cache-c").get(url)
    with pytest.raises(InputDataError, match="is not an artifact of the store"):
        machine_b.get(f"{store_url}/elsewhere/model")


def test_an_incomplete_or_altered_artifact_is_never_handed_out(store_url, tmp_path):
    model = a_directory(tmp_path / "model")
    store = ArtifactStore(store_url, tmp_path / "cache")
    digest = sha256_tree(model)
    url = f"{store.url}/sha256/{digest}/model"
    # A writer killed after its files but before its manifest: not there yet for readers.
    store._upload(model / "weights.bin", store._remote(digest, "model", "weights.bin"))
    assert not store.exists(url)
    with pytest.raises(SourceUnreachable):
        store.get(url)
    # A reader told to wait gets it once the writer finishes.
    writer = threading.Timer(1.0, store.put, args=[model])
    writer.start()
    assert sha256_tree(store.get(url, wait=60)) == digest
    writer.join()
    # Bytes changed in the store after publishing: refused, and nothing half-written in the cache.
    store.fs.pipe_file(store._remote(digest, "model", "weights.bin"), b"tampered")
    other = ArtifactStore(store_url, tmp_path / "other-cache")
    with pytest.raises(InputDataError, match="weights.bin does not match its digest"):
        other.get(url)
    assert not list((tmp_path / "other-cache").glob("*/model"))


def test_many_writers_and_readers_of_one_artifact_at_once(store_url, tmp_path):
    model = a_directory(tmp_path / "model", "random")
    digest = sha256_tree(model)
    # Every writer holds its own copy of the same content, as runs on different machines would.
    copies = [tmp_path / f"copy{i}" / "model" for i in range(6)]
    for copy in copies:
        shutil.copytree(model, copy)

    def write(i: int) -> str:
        return ArtifactStore(store_url, tmp_path / f"wcache{i}").put(copies[i])

    def read(i: int) -> str:
        store = ArtifactStore(store_url, tmp_path / f"rcache{i % 2}")  # two readers share each cache
        return sha256_tree(store.get(f"{store.url}/sha256/{digest}/model", wait=120))

    with ThreadPoolExecutor(12) as pool:
        readers = [pool.submit(read, i) for i in range(6)]
        writers = [pool.submit(write, i) for i in range(6)]
        urls = {w.result() for w in writers}
        assert {r.result() for r in readers} == {digest}
    assert len(urls) == 1


def test_a_final_model_another_run_published_first_is_kept(tmp_path):
    """The crash of two overlapping pipelines: Errno 39 renaming .final.<tmp> onto final/."""
    first, second = RunDirectory(tmp_path / "run"), RunDirectory(tmp_path / "run")
    first.root.mkdir()
    first.save_final(lambda d: (d / "model.safetensors").write_text("first"))
    assert second.save_final(lambda d: (d / "model.safetensors").write_text("second")) == first.final
    assert (first.final / "model.safetensors").read_text() == "first"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["final"]


def test_overlapping_atomic_directories_leave_one_whole_result(tmp_path):
    target = tmp_path / "converted"
    barrier = threading.Barrier(8)

    def convert(i: int) -> None:
        with atomic_directory(target) as staging:
            for name in ("a", "b", "c"):
                (staging / name).write_text(str(i))
            barrier.wait()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(convert, range(8)))
    assert len({(target / n).read_text() for n in ("a", "b", "c")}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_two_trainings_of_one_run_directory_at_once_both_finish(tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import json; from torch.utils.data import DataLoader; from tests import test_train as t; "
        "loader = DataLoader(t.progressions(), batch_size=4, shuffle=True, drop_last=True); "
        f"r = t.fit(t.tiny_model(), loader, None, t.settings(epochs=1), {str(run_dir)!r}); "
        "print(json.dumps({'finished': r.already_finished, 'checkpoint': str(r.checkpoint)}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [json.loads(child.communicate(timeout=300)[0].strip().splitlines()[-1]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert sorted(r["finished"] for r in results) == [False, True]  # one trained, the other waited and reused
    assert {r["checkpoint"] for r in results} == {str(run_dir / "final")}


def test_stage_inputs_and_results_travel_as_urls_and_come_back_as_local_copies(tmp_path):
    import dataclasses

    from groundup.config import GenerationConfig
    from groundup.flows.placement import missing_outputs, to_paths, to_urls

    @dataclasses.dataclass
    class Result:
        model_dir: str
        metrics: dict

    model = a_directory(tmp_path / "model")
    pipeline_side = ArtifactStore(tmp_path / "store", tmp_path / "pipeline-cache")
    worker_side = ArtifactStore(tmp_path / "store", tmp_path / "worker-cache")
    sent = to_urls({"model": str(model), "config": GenerationConfig(max_new_tokens=3), "label": "base"}, pipeline_side)
    assert sent["model"].startswith(pipeline_side.url) and sent["config"]["max_new_tokens"] == 3
    assert sent["label"] == "base"
    received = to_paths(sent, worker_side)
    assert Path(received["model"]).is_relative_to(tmp_path / "worker-cache")
    assert sha256_tree(received["model"]) == sha256_tree(model)

    result = Result(model_dir=received["model"], metrics={"loss": 1.0})
    back = to_paths(to_urls(result, worker_side), pipeline_side)
    assert isinstance(back, Result) and back.metrics == {"loss": 1.0}
    assert Path(back.model_dir).is_relative_to(tmp_path / "pipeline-cache")
    assert missing_outputs(back) == [] and missing_outputs(Result(str(tmp_path / "gone"), {})) == [str(tmp_path / "gone")]


def test_placing_an_unknown_stage_is_refused_before_any_stage():
    from groundup.config import ConfigError, PipelineConfig
    from groundup.flows.pipeline import check

    assert PipelineConfig().placement == {}  # the default: every stage in-process
    with pytest.raises(ConfigError, match=r"unknown stages \['finetuning'\]; stages: download_text"):
        check(PipelineConfig(placement={"finetuning": "groundup-gpu"}))
    check(PipelineConfig(placement={"finetune": "groundup-gpu", "generate_responses": "groundup-gpu"}))


def test_a_stage_result_passed_to_a_placed_stage_is_rebuilt_from_its_json(tmp_path):
    """A placed stage's parameters reach the worker as JSON (pydantic encodes a dataclass as a dict): a task
    parameter typed as a stage result is rebuilt as one there, its paths fetched from the store."""
    from pydantic_core import to_jsonable_python

    from groundup.flows.placement import bind, to_paths, to_urls
    from groundup.tasks.data import DownloadedText, record_corpus

    text = tmp_path / "the-text.txt"
    text.write_text("Every effort moves you.", encoding="utf-8")
    pipeline_side = ArtifactStore(tmp_path / "store", tmp_path / "pipeline-cache")
    worker_side = ArtifactStore(tmp_path / "store", tmp_path / "worker-cache")
    downloaded = DownloadedText(path=str(text), sha256=sha256_file(text), size=23, source="https://example.org/t")

    sent = to_jsonable_python(to_urls({"text": downloaded, "output_dir": "x"}, pipeline_side))
    received = bind(record_corpus, to_paths(sent, worker_side))
    assert isinstance(received["text"], DownloadedText) and received["output_dir"] == "x"
    assert Path(received["text"].path).is_relative_to(tmp_path / "worker-cache")
    assert sha256_file(received["text"].path) == downloaded.sha256 and received["text"].size == 23
