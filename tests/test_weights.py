"""GPT-2 weights from Hugging Face files (local and from a hub-like server on 127.0.0.1) into our model,
bad input, and the task/flow/CLI with Prefect and MLflow. OpenAI's TensorFlow format: test_weights_tf.py."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from groundup.config import ConfigError, WeightsConfig, load_config
from groundup.model.io import read_metadata
from groundup.weights import WeightsError, prepare_gpt2
from groundup.weights.convert import check_shapes, model_name, size_of, source_shapes
from groundup.weights.fetch import fetch_huggingface, fetch_openai, local_checkpoint
from groundup.weights.huggingface import HubUnreachable
from groundup.weights.openai_tf import canonical_name, read_openai_weights
from tests.gpt2_fixtures import HUB_COMMIT, assert_reproduces, publish_hf, save_hf, tiny_gpt2

REPO = "openai-community/gpt2"
SAFETENSORS_PATH = f"{REPO}/resolve/main/model.safetensors"


@pytest.fixture(scope="module")
def reference():
    """The transformers model every conversion must reproduce."""
    return tiny_gpt2(seed=1)


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory) -> Path:
    return save_hf(reference, tmp_path_factory.mktemp("hf") / "gpt2-tiny")


@pytest.fixture(scope="module")
def hub_files(reference, tmp_path_factory) -> Path:
    return save_hf(reference, tmp_path_factory.mktemp("hub") / "gpt2-tiny", hub_layout=True)


@pytest.fixture
def hub_online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 so nothing reaches the real hub; our hub is on loopback."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    yield
    reset_sessions()


def set_hub_offline(monkeypatch, offline: bool) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    reset_sessions()


def prepare(config: WeightsConfig, root: Path, **kwargs):
    return prepare_gpt2(config, download_dir=root / "downloads", models_dir=root / "models", **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def test_local_hf_dir_converts_to_a_model_that_reproduces_transformers(reference, hf_dir, tmp_path):
    result = prepare(WeightsConfig(from_dir=str(hf_dir)), tmp_path)

    assert_reproduces(reference, result.checkpoint)
    cfg = result.config
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (2, 32, 4, 64, 50257)
    assert cfg.qkv_bias and cfg.tie_weights and result.name == "gpt2-custom"
    # Tied head stored once: the parameter count is transformers' own.
    assert result.n_parameters == reference.num_parameters()
    metadata = read_metadata(result.checkpoint)
    assert metadata["source"]["parent"] == f"dir:{hf_dir.resolve()}"
    assert {f["name"] for f in metadata["source"]["files"]} == {"config.json", "model.safetensors"}
    # The smoke generation is the workshop's prompt continued greedily by this very model.
    assert result.smoke_text.startswith("Every effort moves you")
    assert len(result.smoke_text) > len("Every effort moves you")


def test_same_source_is_converted_once_and_out_dir_is_honoured(hf_dir, hub_files, tmp_path):
    first = prepare(WeightsConfig(from_dir=str(hf_dir)), tmp_path)
    second = prepare(WeightsConfig(from_dir=str(hf_dir)), tmp_path)
    assert first.converted and not second.converted and first.checkpoint == second.checkpoint
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.checkpoint.name]

    mine = tmp_path / "out" / "mine"
    chosen = prepare(WeightsConfig(from_dir=str(hf_dir)), tmp_path, out_dir=mine)
    assert chosen.checkpoint == mine.resolve() and chosen.converted
    # Another source into the same folder replaces the checkpoint as a whole, leaving nothing beside it.
    replaced = prepare(WeightsConfig(from_dir=str(hub_files)), tmp_path, out_dir=mine)
    assert replaced.converted and read_metadata(mine)["source"]["digest"] == replaced.source.digest
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine"]


def test_an_out_dir_holding_other_files_is_not_replaced(hf_dir, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(WeightsError, match="notes: exists and is not a groundup checkpoint; not replacing it"):
        prepare(WeightsConfig(from_dir=str(hf_dir)), tmp_path, out_dir=precious)
    assert [p.name for p in precious.iterdir()] == ["todo.txt"]


def test_names_and_sizes_follow_the_checkpoint_shape():
    from groundup.model.gpt import config_from_preset
    from groundup.weights.convert import gpt2_config

    small = config_from_preset("gpt2-small")
    assert size_of(small) == "124M" and model_name(small) == "gpt2-124m"
    xl = gpt2_config(vocab_size=50257, context_length=1024, emb_dim=1600, n_heads=25, n_layers=48)
    assert model_name(xl) == "gpt2-1558m"
    assert model_name(gpt2_config(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12)) == (
        "gpt2-custom"
    )


def test_openai_variable_names_map_to_the_canonical_ones():
    assert canonical_name("model/wte") == "wte.weight"
    assert canonical_name("model/h11/attn/c_attn/w") == "h.11.attn.c_attn.weight"
    assert canonical_name("model/h0/ln_2/g") == "h.0.ln_2.weight"
    assert canonical_name("model/h0/mlp/c_proj/b") == "h.0.mlp.c_proj.bias"
    assert canonical_name("model/ln_f/b") == "ln_f.bias"
    assert canonical_name("optimizer/beta1_power") == "optimizer/beta1_power"  # reported as unexpected


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face Hub (a hub-like server on 127.0.0.1)
# ---------------------------------------------------------------------------------------------------------


def test_hub_download_converts_caches_and_works_offline(reference, hub_files, file_server, hub_online, tmp_path, monkeypatch):
    endpoint = publish_hf(file_server, hub_files, REPO)
    config = WeightsConfig(source="huggingface", size="124M", hf_endpoint=endpoint)

    result = prepare(config, tmp_path)

    assert_reproduces(reference, result.checkpoint)
    source = result.source
    assert source.parent == f"hf:{REPO}" and source.revision == HUB_COMMIT
    files = {f.name: f for f in source.files}
    served = file_server.root / SAFETENSORS_PATH
    assert files["model.safetensors"].size == served.stat().st_size
    assert files["model.safetensors"].location == f"{endpoint}/{REPO}/resolve/{HUB_COMMIT}/model.safetensors"
    assert source.directory.is_relative_to(tmp_path / "downloads" / "huggingface")

    # Cached: the weights are not downloaded again (the hub client only asks whether they changed).
    gets = [r for r in file_server.requests if r[0] == "GET" and r[1] == SAFETENSORS_PATH]
    again = prepare(config, tmp_path)
    assert [r for r in file_server.requests if r[0] == "GET" and r[1] == SAFETENSORS_PATH] == gets
    assert not again.converted

    # Offline (HF_HUB_OFFLINE=1): from the cache alone, with the server gone.
    file_server.stop()
    set_hub_offline(monkeypatch, True)
    offline = prepare(config, tmp_path)
    assert offline.checkpoint == result.checkpoint and offline.source.digest == source.digest


def test_hub_download_resumes_after_a_dropped_connection(
    reference, hub_files, file_server, hub_online, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    # The hub client writes 10 MB chunks; smaller ones so that half of this 6 MB file is kept.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
    endpoint = publish_hf(file_server, hub_files, REPO)
    size = (hub_files / "model.safetensors").stat().st_size
    file_server.drop(SAFETENSORS_PATH, after=size // 2)

    result = prepare(WeightsConfig(source="huggingface", hf_endpoint=endpoint), tmp_path)

    ranges = [r[2] for r in file_server.requests if r[0] == "GET" and r[1] == SAFETENSORS_PATH]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size // 2
    assert_reproduces(reference, result.checkpoint)


def test_corrupted_hub_cache_is_reported_then_fetched_again(reference, hub_files, file_server, hub_online, tmp_path):
    from groundup.download import ChecksumError

    endpoint = publish_hf(file_server, hub_files, REPO)
    cache = tmp_path / "downloads" / "huggingface"  # where prepare() keeps the hub cache
    first = fetch_huggingface("124M", cache, endpoint=endpoint)
    blob = (first.directory / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte inside the weights
    blob.write_bytes(bytes(data))

    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fetch_huggingface("124M", cache, endpoint=endpoint)
    assert not blob.exists()
    again = prepare(WeightsConfig(source="huggingface", hf_endpoint=endpoint), tmp_path)
    assert_reproduces(reference, again.checkpoint)


def test_hub_errors_name_the_repository_and_file(file_server, hub_online, tmp_path, monkeypatch, caplog):
    with pytest.raises(WeightsError, match=r"openai-community/gpt2-medium/config.json on http://127.*did not serve it.*404"):
        fetch_huggingface("355M", tmp_path, endpoint=file_server.url)
    # Nothing listens there: permanent, so no retry delays the message, which says what to do instead.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(HubUnreachable, match=r"connection refused.*--sources-dir DIR.*HF_HUB_OFFLINE=1.*HF_ENDPOINT") as caught:
        fetch_huggingface("124M", tmp_path, endpoint=dead)
    assert not caught.value.transient and "retrying" not in caplog.text
    set_hub_offline(monkeypatch, True)
    with pytest.raises(WeightsError, match=r"not in the local cache, and offline mode is on \(HF_HUB_OFFLINE=1\)"):
        fetch_huggingface("124M", tmp_path, endpoint=file_server.url)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_unknown_size_is_rejected_everywhere(tmp_path):
    with pytest.raises(WeightsError, match=r"unknown GPT-2 size '7B'; choose one of 124M, 355M, 774M, 1558M"):
        fetch_huggingface("7B", tmp_path)
    with pytest.raises(ConfigError, match="size"):
        load_config(WeightsConfig, None, ["size=7B"])


def test_missing_files_in_a_local_dir_are_named(hf_dir, tmp_path):
    partial = tmp_path / "hf-partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(WeightsError, match=r"hf-partial: incomplete huggingface GPT-2 checkpoint, missing model.safetensors"):
        local_checkpoint(partial)

    openai = tmp_path / "openai-partial"
    openai.mkdir()
    (openai / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}))
    (openai / "model.ckpt.index").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"missing model.ckpt.data-00000-of-00001"):
        local_checkpoint(openai)

    with pytest.raises(WeightsError, match="neither an OpenAI GPT-2 checkpoint .* nor a Hugging Face one"):
        local_checkpoint(tmp_path / "hf-partial" / "..")
    with pytest.raises(WeightsError, match="no such directory"):
        local_checkpoint(tmp_path / "nowhere")


def test_a_groundup_checkpoint_is_not_mistaken_for_a_hugging_face_one(hf_dir, tmp_path):
    converted = prepare(WeightsConfig(from_dir=str(hf_dir)), tmp_path)
    with pytest.raises(WeightsError, match="already a groundup checkpoint"):
        local_checkpoint(converted.checkpoint)


def test_shape_mismatch_names_the_tensor(hf_dir, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "n_positions": 128}))

    with pytest.raises(WeightsError) as err:
        prepare(WeightsConfig(from_dir=str(wrong)), tmp_path)
    message = str(err.value)
    assert "transformer.wpe.weight (wpe.weight) has shape (64, 32)" in message and "needs (128, 32)" in message
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_shape_check_reports_missing_and_unexpected_tensors():
    from groundup.weights.convert import gpt2_config

    cfg = gpt2_config(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=1)
    shapes = dict(source_shapes(cfg))
    del shapes["h.0.mlp.c_fc.bias"]
    shapes["h.1.ln_1.weight"] = (8,)
    with pytest.raises(WeightsError, match=r"missing tensor h.0.mlp.c_fc.bias; unexpected tensor h.1.ln_1.weight"):
        check_shapes(shapes, cfg, "somewhere")


def test_unsupported_hf_settings_are_refused(hf_dir, tmp_path):
    other = tmp_path / "relu"
    other.mkdir()
    (other / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(WeightsError, match=r"activation_function='relu' is not GPT-2's"):
        prepare(WeightsConfig(from_dir=str(other)), tmp_path)


def test_missing_tensorflow_says_how_to_get_it(file_server, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what `import tensorflow` does when it is absent
    hint = r"pip install 'groundup\[tf\]', or use --source huggingface"

    # Before any download: nothing is fetched that could not be read.
    with pytest.raises(WeightsError, match=hint):
        fetch_openai("124M", tmp_path / "dl", base_url=f"{file_server.url}/models")
    assert file_server.requests == []

    # And when a local OpenAI checkpoint is read.
    local = tmp_path / "openai"
    local.mkdir()
    (local / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}))
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (local / name).write_bytes(b"\0")
    with pytest.raises(WeightsError, match=hint):
        read_openai_weights(local)
