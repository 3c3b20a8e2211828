"""Start-up of a command whose work takes a second: a reused Prefect server against Prefect's temporary one.

``groundup data`` on the-verdict (5 KB, ~1 s of work) runs as a user runs it, each time its own process,
interleaved, in one output dir per variant:

- *ephemeral* (the reference, what every command did before): ``GROUNDUP_PREFECT_SERVER=ephemeral``, so
  the process starts Prefect's temporary API server, waits for it, runs the flow and stops it;
- *background, first command*: no server is recorded yet, so the command starts one in the background
  (the same cost, once) and records it in ``servers.json``;
- *background, later commands*: the second and later commands connect to that server.

Wall-clock seconds per command, best of ``--repeat``; the server is stopped at the end (``groundup ui
--stop``). The interpreter's own imports (torch, MLflow, Prefect) are in every row alike.

    python -m bench.startup              # ~3-6 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(SHARED), help="folder with data/ and vocab/gpt2 (default ../shared)")
    p.add_argument("--repeat", type=int, default=3, help="commands per variant; the best counts")
    return p.parse_args(argv)


def groundup_data(mode: str, out: Path, text: Path, vocab: Path) -> float:
    """Seconds for one ``groundup data`` process with the Prefect server ``mode``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(GROUNDUP_PREFECT_SERVER=mode, GROUNDUP_GPT2_VOCAB_DIR=str(vocab), PREFECT_LOGGING_LEVEL="WARNING")
    argv = [sys.executable, "-m", "groundup.cli", "data", "--source", str(text), "--output-dir", str(out)]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"groundup data ({mode}) failed:\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shared = Path(args.shared)
    text, vocab = shared / "data" / "the-verdict.txt", shared / "vocab" / "gpt2"
    if not text.is_file() or not vocab.is_dir():
        raise SystemExit(f"needs {text} and {vocab} (the shared folder beside the checkout; --shared DIR)")
    from groundup import serving

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        ephemeral_out, background_out = Path(tmp, "ephemeral"), Path(tmp, "background")
        ephemeral, later = [], []
        try:
            first = groundup_data("background", background_out, text, vocab)
            for _ in range(args.repeat):
                ephemeral.append(groundup_data("ephemeral", ephemeral_out, text, vocab))
                later.append(groundup_data("background", background_out, text, vocab))
        finally:
            serving.stop_ui(background_out)
    reference = min(ephemeral)
    rows = [
        ("ephemeral: Prefect's temporary server per command (reference)", reference),
        ("background, first command: starts and records the server", first),
        ("background, second and later commands: reuse it", min(later)),
    ]
    print(f"| `groundup data` on the-verdict | seconds (best of {args.repeat}) | vs reference |")
    print("| --- | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / reference:.2f}× |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at the end: {load:.1f}; all runs: ephemeral {ephemeral}, later {later}")


if __name__ == "__main__":
    main()
