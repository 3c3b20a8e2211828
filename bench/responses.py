"""Test-set response generation: padded batches against equal-length groups and one prompt at a time.

The workshop's 165 test prompts (the last 15% of the instruction data, Alpaca format) are answered greedily
by the same model (random weights of a preset, or a groundup checkpoint given with ``--model``) through
``groundup.instruct.inference.GroundupModel.complete``: one by one (the reference), in groups of equal token
length (how batches were formed before our GPT could pad, and still are for LitGPT), in right-padded
batches of similar lengths of ``--batch-size`` (what the response stage does now), and those with the
compiled one-token step (``--compile``; its first pass over every prompt, with compilation, is an untimed
warm-up). Variants run interleaved, ``--repeat`` times, best counts. The answers of every run must be identical.

    python -m bench.responses --threads 1                   # gpt-mini, 165 prompts, 24 new tokens, CPU
    python -m bench.responses --preset gpt2-small --max-new-tokens 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("GROUNDUP_SHARED_DIR", ROOT.parent / "shared")) / "data" / "instruction-data.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", default="gpt-mini", help="model preset with random weights (default %(default)s)"
    )
    p.add_argument("--model", help="a groundup checkpoint or adapter directory instead of a random preset")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="instruction data JSON (default: ../shared)")
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--limit", type=int, help="only the first N test prompts")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"])
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each variant, interleaved; best counts")
    p.add_argument("--compile", action="store_true", help="also padded batches with the compiled step")
    return p.parse_args(argv)


def timed(model, prompts: list[str], sampling, batch_size: int, padded: bool, compile: bool) -> tuple[float, list[str]]:
    model.pads_batches, model.compile = padded, compile
    start = time.perf_counter()
    answers = model.complete(prompts, sampling, batch_size=batch_size)
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from groundup.instruct.inference import GroundupModel, Sampling, length_buckets, similar_length_batches
    from groundup.instruct.prompts import format_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    entries = json.loads(Path(args.data).read_text(encoding="utf-8"))
    test = entries[int(len(entries) * (1 - args.test_fraction)) :][: args.limit]
    prompts = [format_prompt(entry, "alpaca") for entry in test]
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model
        if directory is None:
            from groundup.model.gpt import GPTModel, config_from_preset
            from groundup.model.io import save_checkpoint

            torch.manual_seed(0)
            directory = save_checkpoint(GPTModel(config_from_preset(args.preset)), Path(tmp) / "model")
        model = GroundupModel(directory, accelerator=args.device)
        sampling = Sampling(max_new_tokens=args.max_new_tokens)
        lengths = [len(model.encode(p)) for p in prompts]
        # variant -> (batch size, padded, compiled, batches formed)
        variants = {
            "one prompt at a time (reference)": (1, False, False, len(prompts)),
            f"equal-length groups of ≤{args.batch_size} (before)": (
                args.batch_size, False, False, len(length_buckets(lengths, args.batch_size))),
            f"padded batches of {args.batch_size}, similar lengths (now)": (
                args.batch_size, True, False, len(similar_length_batches(lengths, args.batch_size))),
        }
        if args.compile:
            variants[f"padded batches of {args.batch_size} + compiled step"] = (
                args.batch_size, True, True, len(similar_length_batches(lengths, args.batch_size)))
        # Untimed warm-ups. The compiled variant's covers every prompt: each new batch size or cache length
        # compiles again (then with dynamic shapes) until the step has seen the shapes of all the batches.
        warm_up_s = {}
        for name, (size, padded, compile, _) in variants.items():
            warm_up_s[name] = timed(model, prompts if compile else prompts[: 2 * size], sampling, size, padded, compile)[0]
        runs: dict[str, list[tuple[float, list[str]]]] = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, (size, padded, compile, _) in variants.items():
                runs[name].append(timed(model, prompts, sampling, size, padded, compile))
        best = {name: min(results) for name, results in runs.items()}

    reference_s, reference = next(iter(best.values()))
    name = args.model or args.preset
    print(
        f"| {name}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, {model.device} "
        "| batches | seconds | prompts/s | vs one at a time |"
    )
    print("|---|---|---|---|---|")
    for label, (seconds, _) in best.items():
        print(f"| {label} | {variants[label][3]} | {seconds:.1f} | {len(prompts) / seconds:.2f} "
              f"| {reference_s / seconds:.2f} |")
    if args.compile:
        compiled = next(name for name, variant in variants.items() if variant[2])
        print(f"\nthe compiled variant's warm-up over every prompt, compilation included: {warm_up_s[compiled]:.1f} s")
    same = [sum(a == b for a, b in zip(reference, answers, strict=True)) for _, answers in best.values()]
    print(f"\nidentical answers to the reference: {', '.join(f'{n}/{len(prompts)}' for n in same)}")
    return 0 if all(n == len(prompts) for n in same) else 1


if __name__ == "__main__":
    sys.exit(main())
