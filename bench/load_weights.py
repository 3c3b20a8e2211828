"""Load time of one GPT-2-shaped random checkpoint from each format into a ready model, in one process.

The same random weights (124M shape by default) are written as OpenAI's TensorFlow checkpoint, as Hugging
Face safetensors and as our own checkpoint; each is then loaded into a model ready for inference, best of
``--repeat`` runs (files in the page cache after the first). Reference: ``transformers``' own
``GPT2LMHeadModel.from_pretrained`` on the same safetensors. TensorFlow's import (once per process) is
reported separately, not included in the OpenAI row.

    python -m bench.load_weights                   # 124M, ~1-2 min on CPU, ~1.5 GB in a temp dir
    python -m bench.load_weights --size 355M --repeat 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from groundup.model.gpt import GPT2_SIZES
from tests.gpt2_fixtures import random_gpt2, save_hf, save_openai

ROOT = Path(__file__).resolve().parent.parent
VOCAB_DIR = ROOT.parent / "shared" / "vocab" / "gpt2"
REFERENCE = "reference: transformers `GPT2LMHeadModel.from_pretrained` (HF safetensors)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="124M", choices=list(GPT2_SIZES), help="checkpoint shape (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="loads per format; the best counts")
    p.add_argument("--vocab-dir", default=str(VOCAB_DIR), help="GPT-2 BPE files for the OpenAI layout")
    return p.parse_args(argv)


def best_of(repeat: int, load: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model = load()
        times.append(time.perf_counter() - start)
        del model
    return min(times)


def megabytes(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import GPT2LMHeadModel

    from groundup.model.gpt import GPTModel
    from groundup.model.io import load_checkpoint
    from groundup.weights import convert_checkpoint
    from groundup.weights.convert import build_model
    from groundup.weights.fetch import local_checkpoint
    from groundup.weights.huggingface import read_hf_weights
    from groundup.weights.openai_tf import read_openai_weights

    root = Path(tempfile.mkdtemp(prefix="bench-load-weights-"))
    try:
        print(f"writing a random {args.size}-shaped GPT-2 in three formats under {root} ...", file=sys.stderr)
        model = random_gpt2(args.size)
        hf_dir = save_hf(model, root / "hf")
        started = time.perf_counter()
        import tensorflow  # noqa: F401

        tf_import = time.perf_counter() - started
        openai_dir = save_openai(model, root / "openai", args.vocab_dir)
        del model
        ours_dir = convert_checkpoint(local_checkpoint(hf_dir), root / "groundup")

        cfg = load_checkpoint(ours_dir).cfg
        rows = [
            ("groundup safetensors (`load_checkpoint`)", ours_dir, lambda: load_checkpoint(ours_dir)),
            ("HF safetensors → groundup (`read_hf_weights` + `build_model`)", hf_dir,
             lambda: build_model(read_hf_weights(hf_dir))),
            ("OpenAI TF checkpoint → groundup (`read_openai_weights` + `build_model`)", openai_dir,
             lambda: build_model(read_openai_weights(openai_dir))),
            (REFERENCE, hf_dir, lambda: GPT2LMHeadModel.from_pretrained(hf_dir).eval()),
        ]
        print(f"timing {args.repeat} loads per format ...", file=sys.stderr)
        seconds = {label: best_of(args.repeat, load) for label, _, load in rows}
        init = best_of(args.repeat, lambda: GPTModel(cfg))
        reference = seconds[REFERENCE]
        print(f"| {args.size}-shaped checkpoint → model | files (MB) | load (s, best of {args.repeat}) | × reference |")
        print("| --- | ---: | ---: | ---: |")
        for label, directory, _ in rows:
            print(f"| {label} | {megabytes(directory):,.0f} | {seconds[label]:.2f} | {seconds[label] / reference:.1f} |")
        print(f"| (part of the first row: `GPTModel(cfg)`'s random init, then overwritten) | | {init:.2f} | |")
        print(f"| `import tensorflow` (once per process, not in the OpenAI row) | | {tf_import:.2f} | |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
