"""LitGPT finetuning: base models, accelerator checks, prompt styles inside LitGPT, subprocess failures.

The successful end-to-end run (subprocess, metrics, MLflow) is in test_finetune_flow.py.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from groundup.config import FinetuneConfig
from groundup.errors import DeviceError
from groundup.instruct import litgpt_checkpoints, litgpt_engine
from groundup.instruct.litgpt_checkpoints import BaseModelError
from groundup.instruct.litgpt_process import LitGPTError
from groundup.instruct.prompts import format_prompt
from groundup.train import cpu_memory

ENTRY = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "x",
}


def cpu_config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"engine": "litgpt", "runtime": {"accelerator": "cpu"}, **overrides})


def test_tiny_checkpoint_loads_and_generates(tiny_litgpt_dir):
    import litgpt

    assert litgpt_checkpoints.missing_checkpoint_files(tiny_litgpt_dir) == []
    llm = litgpt.LLM.load(str(tiny_litgpt_dir))
    text = llm.generate("Every effort moves you", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str) and text


def test_a_directory_that_is_not_a_checkpoint_names_the_missing_files(tiny_litgpt_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_litgpt_dir / "model_config.yaml", partial)
    with pytest.raises(BaseModelError) as info:
        litgpt_checkpoints.resolve_base_model(str(partial), tmp_path / "checkpoints")
    message = str(info.value)
    assert str(partial) in message and "is not a LitGPT checkpoint" in message
    assert "lit_model.pth" in message and "tokenizer.json" in message and "tokenizer_config.json" in message
    assert "model_config.yaml" not in message.split("missing")[1]

    with pytest.raises(
        BaseModelError, match="neither a Hugging Face hub id .* nor an existing LitGPT checkpoint"
    ):
        litgpt_checkpoints.resolve_base_model(str(tmp_path / "nowhere" / "model"), tmp_path / "checkpoints")
    with pytest.raises(BaseModelError, match="'gpt2-124M' is neither"):
        litgpt_checkpoints.resolve_base_model("gpt2-124M", tmp_path / "checkpoints")


def test_a_local_checkpoint_is_used_in_place(tiny_litgpt_dir, tmp_path):
    assert litgpt_checkpoints.resolve_base_model(str(tiny_litgpt_dir), tmp_path / "ckpts") == tiny_litgpt_dir
    assert not (tmp_path / "ckpts").exists()
    assert litgpt_checkpoints.is_hub_id("microsoft/phi-2")
    assert not litgpt_checkpoints.is_hub_id(str(tiny_litgpt_dir))


def test_cpu_placement_hides_gpus_and_uses_32_bit():
    placement = litgpt_engine.resolve_placement(cpu_config())
    assert placement.accelerator == "cpu"
    assert placement.precision == "32-true"
    assert placement.env == {"LT_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", **cpu_memory.environment()}
    released = cpu_config(runtime={"accelerator": "cpu", "keep_freed_memory": False})
    assert litgpt_engine.resolve_placement(released).env == {"LT_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    chosen = cpu_config(runtime={"accelerator": "cpu", "precision": "bf16-true"})
    assert litgpt_engine.resolve_placement(chosen).precision == "bf16-true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_requested_but_absent_accelerator_is_an_error():
    with pytest.raises(DeviceError, match="finetune.runtime.accelerator='cuda': no cuda device is available"):
        litgpt_engine.resolve_placement(FinetuneConfig(runtime={"accelerator": "cuda"}))
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="finetune.runtime.accelerator='mps': no mps device"):
            litgpt_engine.resolve_placement(FinetuneConfig(runtime={"accelerator": "mps"}))


def test_unsupported_quantization_and_devices_on_cpu_are_errors():
    with pytest.raises(
        DeviceError, match=r"finetune.litgpt.quantize='bnb.nf4' \(bitsandbytes\) needs a CUDA GPU.*'cpu'"
    ):
        litgpt_engine.resolve_placement(cpu_config(litgpt={"quantize": "bnb.nf4"}))
    with pytest.raises(DeviceError, match="devices=2, num_nodes=1 needs CUDA GPUs"):
        litgpt_engine.resolve_placement(cpu_config(runtime={"accelerator": "cpu", "devices": 2}))


def test_settings_litgpt_cannot_take_are_errors_before_running(tiny_litgpt_dir, tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([ENTRY] * 10), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="integer lora.alpha, got 2.5"):
        litgpt_engine.finetune_lora(tiny_litgpt_dir, train, cpu_config(lora={"alpha": 2.5}), out)
    with pytest.raises(ValueError, match="smaller than micro_batch_size=8"):
        litgpt_engine.finetune_lora(tiny_litgpt_dir, train, cpu_config(global_batch_size=4), out)
    with pytest.raises(ValueError, match="needs validation entries"):
        litgpt_engine.finetune_lora(tiny_litgpt_dir, train, cpu_config(), out, val_fraction=0.0)
    assert not out.exists()


def test_our_prompt_styles_inside_litgpt():
    from groundup.instruct import litgpt_prompts

    # LitGPT's SFT dataset passes the whole entry; LLM.generate passes only the instruction.
    assert litgpt_prompts.Alpaca().apply(prompt=ENTRY["instruction"], **ENTRY) == format_prompt(
        ENTRY, "alpaca"
    )
    assert litgpt_prompts.Phi3().apply(ENTRY["instruction"]) == format_prompt({**ENTRY, "input": ""}, "phi-3")
    assert litgpt_prompts.class_path("phi-3") == "groundup.instruct.litgpt_prompts.Phi3"


def test_prompt_style_round_trips_through_a_checkpoint(tmp_path):
    from litgpt.prompts import load_prompt_style, save_prompt_style

    from groundup.instruct import litgpt_prompts

    save_prompt_style(litgpt_prompts.Phi3(), tmp_path)
    assert isinstance(load_prompt_style(tmp_path), litgpt_prompts.Phi3)


@pytest.mark.slow
def test_a_failing_litgpt_run_raises_its_error_and_leaves_nothing(
    tiny_litgpt_dir, instruction_data_path, tmp_path
):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_litgpt_dir, broken)
    (broken / "lit_model.pth").write_bytes(b"this is not a torch checkpoint")
    train = tmp_path / "train.json"
    train.write_text(json.dumps(json.loads(instruction_data_path.read_text())[:12]), encoding="utf-8")
    out = tmp_path / "run"
    lines: list[str] = []
    config = cpu_config(max_steps=2, global_batch_size=2, micro_batch_size=2)

    with pytest.raises(LitGPTError) as info:
        litgpt_engine.finetune_lora(broken, train, config, out, val_fraction=0.2, on_line=lines.append)
    message = str(info.value)
    assert "`litgpt finetune_lora` failed (exit code" in message
    assert "RuntimeError" in message.splitlines()[0]  # the cause leads; the traceback follows
    assert message.splitlines()[-1] == lines[-1]  # the error text is LitGPT's own last words
    assert not out.exists()


class GatedHub(BaseHTTPRequestHandler):
    """Answers every Hub API request the way huggingface.co answers for a gated repo without a token."""

    def do_GET(self) -> None:
        body = b'{"error": "Access to model is restricted. You must have access to it and be authenticated."}'
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header(
            "X-Error-Message", "Access to model is restricted and you are not in the authorized list."
        )
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_a_gated_model_without_token_says_how_to_provide_one(tmp_path, monkeypatch):
    hub = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_address[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(BaseModelError) as info:
            litgpt_checkpoints.resolve_base_model(
                "meta-llama/Meta-Llama-3-8B-Instruct", tmp_path / "checkpoints"
            )
    finally:
        hub.shutdown()
        hub.server_close()
    message = str(info.value)
    assert "'meta-llama/Meta-Llama-3-8B-Instruct' is gated" in message
    assert "HF_TOKEN" in message and "finetune.litgpt.hf_token_secret" in message
    assert not (
        tmp_path / "checkpoints" / "meta-llama" / "Meta-Llama-3-8B-Instruct" / "lit_model.pth"
    ).exists()
