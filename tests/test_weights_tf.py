"""OpenAI's TensorFlow GPT-2 checkpoint, served from 127.0.0.1 in the original URL layout, into our model.

All tests that import TensorFlow (~15 s) live in this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from groundup.config import WeightsConfig
from groundup.model.io import WEIGHTS_FILE
from groundup.text.tokenizers import get_tokenizer, text_to_token_ids, token_ids_to_text
from groundup.weights import SMOKE_PROMPT, SMOKE_TOKENS, WeightsError, prepare_gpt2
from groundup.weights.openai_tf import OPENAI_FILES
from tests.gpt2_fixtures import assert_reproduces, hf_greedy, publish_openai, save_hf, save_openai, tiny_gpt2

pytest.importorskip("tensorflow", reason="needs TensorFlow (pip install 'groundup[tf]')")

DATA_FILE = "model.ckpt.data-00000-of-00001"
DATA_PATH = f"models/124M/{DATA_FILE}"


@pytest.fixture(scope="module")
def reference():
    return tiny_gpt2(seed=2)


@pytest.fixture(scope="module")
def openai_dir(reference, gpt2_vocab_dir, tmp_path_factory) -> Path:
    return save_openai(reference, tmp_path_factory.mktemp("openai") / "124M", gpt2_vocab_dir)


def openai_config(base_url: str, mirror_url: str | None = None) -> WeightsConfig:
    return WeightsConfig(source="openai", size="124M", openai_base_url=base_url, openai_mirror_url=mirror_url)


def prepare(config: WeightsConfig, root: Path):
    return prepare_gpt2(config, download_dir=root / "downloads", models_dir=root / "models")


def gets(server, path: str) -> list[str | None]:
    return [rng for method, p, rng in server.requests if method == "GET" and p == path]


def test_openai_download_converts_to_the_same_model_as_hugging_face(reference, openai_dir, file_server, tmp_path, gpt2_vocab_dir):
    base = publish_openai(file_server, openai_dir)

    result = prepare(openai_config(base, mirror_url=None), tmp_path)

    assert_reproduces(reference, result.checkpoint)
    assert result.source.parent == "openai:gpt2/124M"
    assert [f.name for f in result.source.files] == list(OPENAI_FILES)
    assert {f.location for f in result.source.files} == {f"{base}/124M/{name}" for name in OPENAI_FILES}
    # Bit for bit the weights the Hugging Face path produces from the same model.
    from_hf = prepare_gpt2(
        WeightsConfig(from_dir=str(save_hf(reference, tmp_path / "hf"))),
        download_dir=tmp_path / "unused",
        models_dir=tmp_path / "models",
    )
    ours, theirs = load_file(result.checkpoint / WEIGHTS_FILE), load_file(from_hf.checkpoint / WEIGHTS_FILE)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The smoke generation used the BPE files shipped with the checkpoint and this very model.
    tokenizer = get_tokenizer("gpt2", gpt2_vocab_dir)
    expected = hf_greedy(reference, text_to_token_ids(SMOKE_PROMPT, tokenizer), SMOKE_TOKENS)
    assert result.smoke_text == token_ids_to_text(expected, tokenizer)

    # Again: the recorded digests verify the files, so nothing is requested or converted.
    before = len(file_server.requests)
    again = prepare(openai_config(base), tmp_path)
    assert len(file_server.requests) == before and not again.converted


def test_interrupted_download_resumes_and_verifies(reference, openai_dir, file_server, tmp_path):
    base = publish_openai(file_server, openai_dir)
    size = (openai_dir / DATA_FILE).stat().st_size
    file_server.drop(DATA_PATH, after=size // 2)

    result = prepare(openai_config(base), tmp_path)

    ranges = gets(file_server, DATA_PATH)
    assert len(ranges) == 2 and ranges[0] is None
    assert 0 < int(ranges[1].removeprefix("bytes=").removesuffix("-")) <= size // 2
    assert {f.name: f.size for f in result.source.files}[DATA_FILE] == size
    assert_reproduces(reference, result.checkpoint)


def test_mirror_serves_when_the_main_url_fails(reference, openai_dir, file_server, tmp_path):
    mirror = publish_openai(file_server, openai_dir, prefix="mirror")

    result = prepare(openai_config(f"{file_server.url}/gone", mirror_url=mirror), tmp_path)

    assert {f.location for f in result.source.files} == {f"{mirror}/124M/{name}" for name in OPENAI_FILES}
    assert_reproduces(reference, result.checkpoint)


def test_corrupted_download_is_fetched_again(reference, openai_dir, file_server, tmp_path):
    base = publish_openai(file_server, openai_dir)
    first = prepare(openai_config(base), tmp_path)
    downloaded = first.source.directory / DATA_FILE
    data = bytearray(downloaded.read_bytes())
    data[len(data) // 3] ^= 0xFF
    downloaded.write_bytes(bytes(data))

    again = prepare(openai_config(base), tmp_path)

    assert len(gets(file_server, DATA_PATH)) == 2
    assert again.source.digest == first.source.digest and again.checkpoint == first.checkpoint
    assert_reproduces(reference, again.checkpoint)


def test_corrupted_local_checkpoint_is_reported_not_loaded(openai_dir, tmp_path):
    local = shutil.copytree(openai_dir, tmp_path / "corrupted")
    data = bytearray((local / DATA_FILE).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (local / DATA_FILE).write_bytes(bytes(data))

    with pytest.raises(WeightsError, match=r"corrupted: unreadable TensorFlow checkpoint .*(?i:checksum|crc)"):
        prepare(WeightsConfig(from_dir=str(local)), tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_shape_mismatch_names_the_openai_variable(openai_dir, tmp_path):
    local = shutil.copytree(openai_dir, tmp_path / "wrong")
    hparams = json.loads((local / "hparams.json").read_text())
    (local / "hparams.json").write_text(json.dumps({**hparams, "n_ctx": 128}))

    with pytest.raises(WeightsError, match=r"tensor model/wpe \(wpe.weight\) has shape \(64, 32\).*needs \(128, 32\)"):
        prepare(WeightsConfig(from_dir=str(local)), tmp_path)
