"""Test-set response generation: equal-length batches against one prompt at a time, in one process.

The workshop's 165 test prompts (the last 15% of the instruction data, Alpaca format) are answered greedily
by the same model (random weights of a preset, or a groundup checkpoint given with ``--model``) through
``groundup.instruct.inference.GroundupModel.complete``, once with ``--batch-size`` and once one by one (the
reference). Batches hold prompts of equal token length (neither backend has padding masks), so the table
also reports how many batches the prompts form. The answers of both runs must be identical.

    python -m bench.responses --threads 1                   # gpt-mini, 165 prompts, 24 new tokens, CPU
    python -m bench.responses --preset gpt2-small --max-new-tokens 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instruction-data.json"


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
    return p.parse_args(argv)


def timed(model, prompts: list[str], sampling, batch_size: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = model.complete(prompts, sampling, batch_size=batch_size)
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from groundup.instruct.inference import GroundupModel, Sampling, length_buckets
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
        model.complete(prompts[:2], sampling)  # warm-up
        batches = len(length_buckets([len(model.encode(p)) for p in prompts], args.batch_size))
        runs: dict[int, list[tuple[float, list[str]]]] = {1: [], args.batch_size: []}
        for _ in range(args.repeat):
            for batch_size in runs:
                runs[batch_size].append(timed(model, prompts, sampling, batch_size))
        single_s, single = min(runs[1])
        batched_s, batched = min(runs[args.batch_size])

    same = sum(a == b for a, b in zip(single, batched, strict=True))
    name = args.model or args.preset
    print(
        f"| {name}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, {model.device} "
        "| calls | seconds | prompts/s | ratio |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| one prompt at a time (reference) | {len(prompts)} | {single_s:.1f} | {len(prompts) / single_s:.2f} | 1.00 |"
    )
    print(
        f"| equal-length batches of ≤{args.batch_size} | {batches} | {batched_s:.1f} "
        f"| {len(prompts) / batched_s:.2f} | {single_s / batched_s:.2f} |"
    )
    print(f"\nidentical answers: {same}/{len(prompts)}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
