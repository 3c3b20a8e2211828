"""Tokenizing a large corpus into the Parquet token store vs plain tiktoken, side by side.

Corpus: the-verdict repeated to ``--size-mb`` (or any UTF-8 file given with ``--corpus``). Each method runs
in its own fresh Python process, so neither's memory shows up in the other's figures:

- ``tiktoken``: read the whole file, cut it into 1 MiB pieces, ``encode_ordinary_batch`` them (ids kept in
  memory as Python lists, as that call returns them);
- ``groundup``: ``write_tokens`` from the file to a Parquet file (streamed reading, safe cuts, threaded
  encoding, uint16 row groups, zstd) - the whole job, including writing.

Both use the same tiktoken encoding and the same number of threads. Reported: seconds (reading +
tokenizing [+ writing]; not process start, imports or loading the vocabulary), tokens/s, the ratio to
tiktoken, the process's peak resident memory (``ru_maxrss``: everything, interpreter and vocabulary
included) and that peak above the resident memory just before the work started.

    python -m bench.tokenize                      # 50 MB, both methods, twice each (~1-2 min on 2 cores)
    python -m bench.tokenize --size-mb 1024 --skip-reference   # streaming check: 1 GB in bounded memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PIECE_BYTES = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=50, help="corpus size to build (default %(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="runs per method, alternating; the fastest counts")
    p.add_argument("--corpus", help="an existing UTF-8 text file to use instead")
    p.add_argument("--verdict", default=str(SHARED / "data" / "the-verdict.txt"), help="text to repeat")
    p.add_argument("--vocab-dir", default=os.environ.get("GROUNDUP_GPT2_VOCAB_DIR") or str(SHARED / "vocab" / "gpt2"))
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="threads for both methods")
    p.add_argument("--skip-reference", action="store_true", help="only the Parquet writer (for huge corpora)")
    p.add_argument("--child", choices=["tiktoken", "groundup"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------
# The two methods, each run in a child process
# ---------------------------------------------------------------------------------------------------------


def run_tiktoken(corpus: Path, tokenizer, threads: int) -> int:
    text = corpus.read_text(encoding="utf-8")
    pieces = [text[i : i + PIECE_BYTES] for i in range(0, len(text), PIECE_BYTES)]
    ids = tokenizer.encode_ordinary_batch(pieces, num_threads=threads)
    return sum(map(len, ids))


def run_groundup(corpus: Path, out: Path, threads: int, vocab_dir: str) -> int:
    from groundup.text.store import read_metadata, write_tokens

    write_tokens(corpus, out, "gpt2", vocab_dir=vocab_dir, num_threads=threads)
    return read_metadata(out)["tokens"]


def child(args: argparse.Namespace) -> None:
    import groundup.text.store  # noqa: F401  (imported before the baseline: pyarrow alone is ~50 MiB)
    from groundup.text.tokenizers import get_tokenizer

    tokenizer = get_tokenizer("gpt2", args.vocab_dir)  # loaded before timing, in both methods
    corpus = Path(args.corpus)
    baseline = rss_mib()
    started = time.perf_counter()
    if args.child == "tiktoken":
        tokens = run_tiktoken(corpus, tokenizer, args.threads)
    else:
        tokens = run_groundup(corpus, Path(args.out), args.threads, args.vocab_dir)
    seconds = time.perf_counter() - started
    print(json.dumps({"tokens": tokens, "seconds": seconds, "peak": peak_rss_mib(), "baseline": baseline}))


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def build_corpus(source: Path, size_mb: float, dest: Path) -> Path:
    """``source`` repeated (paragraph-separated) until the file reaches ``size_mb`` megabytes."""
    block = source.read_text(encoding="utf-8").strip() + "\n\n"
    copies = max(1, int(size_mb * 1e6 / len(block.encode("utf-8"))))
    with open(dest, "w", encoding="utf-8") as fh:
        for _ in range(copies):
            fh.write(block)
    return dest


def measure(method: str, args: argparse.Namespace, corpus: Path, workdir: Path) -> dict:
    command = [sys.executable, "-m", "bench.tokenize", "--child", method, "--corpus", str(corpus), "--threads", str(args.threads),
               "--vocab-dir", args.vocab_dir, "--out", str(workdir / "tokens.parquet")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"{method} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fastest(runs: list[dict]) -> dict:
    """The fastest run's time; the highest peak memory of all runs."""
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak": max(r["peak"] for r in runs), "baseline": min(r["baseline"] for r in runs)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        workdir = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else build_corpus(Path(args.verdict), args.size_mb, workdir / "corpus.txt")
        size_mb = corpus.stat().st_size / 1e6
        methods = ["groundup"] if args.skip_reference else ["tiktoken", "groundup"]
        runs: dict[str, list[dict]] = {method: [] for method in methods}
        for _ in range(args.repeat):  # alternating, so a burst of load elsewhere hits both alike
            for method in methods:
                runs[method].append(measure(method, args, corpus, workdir))
        results = {method: fastest(measured) for method, measured in runs.items()}
        parquet_mb = (workdir / "tokens.parquet").stat().st_size / 1e6

    reference = results.get("tiktoken")
    print(f"Corpus: {corpus.name}, {size_mb:,.1f} MB; {args.threads} threads; {os.cpu_count()} CPUs; "
          f"fastest of {args.repeat} runs each.\n")
    print("| method | tokens | seconds | MB/s | tokens/s | vs tiktoken | peak RSS MiB | above start MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    labels = {"tiktoken": "tiktoken encode_ordinary_batch (in memory)",
              "groundup": f"groundup write_tokens → Parquet ({parquet_mb:,.1f} MB)"}  # fmt: skip
    for method, r in results.items():
        rate = r["tokens"] / r["seconds"]
        ratio = f"{rate / (reference['tokens'] / reference['seconds']):.2f}x" if reference else "-"
        print(f"| {labels[method]} | {r['tokens']:,} | {r['seconds']:.2f} | {size_mb / r['seconds']:.1f} | "
              f"{rate:,.0f} | {ratio} | {r['peak']:,.0f} | {r['peak'] - r['baseline']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
