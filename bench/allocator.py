"""CPU training steps with glibc's default allocator against one that keeps freed memory in the process.

glibc gives every freed block over 32 MB back to the system, so each training step page-faults its large
temporaries in again: the logits (batch x tokens x 50257 floats), their log-softmax and gradient, and the
embedding's gradient. Three of glibc's own environment variables keep that memory instead:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1000000000

They are read once when a process starts, so the two variants cannot share one process: each round runs
the same steps (``bench.peers``' plain loop: forward, loss, backward, fused AdamW; GPT-2's dropout 0.1;
after two untimed steps) in a process of its own for each variant, one after the other, and compares
seconds per step within the round.

    python -m bench.allocator                       # gpt-mini and gpt2-small, ~5 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gpt-mini", "gpt2-small"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per row (at most the context length)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each process")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a preset: time its steps in this process
    return p.parse_args(argv)


def time_steps_here(args: argparse.Namespace) -> float:
    """Seconds per step of ``bench.peers``' plain training loop, in this process."""
    import torch

    from bench.peers import train_in_plain_loop
    from groundup.model.gpt import GPTModel, config_from_preset, init_weights

    torch.set_num_threads(args.threads)
    model = init_weights(GPTModel(config_from_preset(args.child, drop_rate=0.1)), seed=0)
    steps = argparse.Namespace(device="cpu", warmup=2, steps=args.steps, batch=args.batch,
                               context=min(args.tokens, model.cfg.context_length))  # fmt: skip
    tokens_per_second, _ = train_in_plain_loop(model, steps, model)
    return steps.batch * steps.context / tokens_per_second


def seconds_per_step(preset: str, args: argparse.Namespace, keep_freed_memory: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_MEMORY}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if keep_freed_memory:
        env.update(KEEP_FREED_MEMORY)
    argv = [sys.executable, "-m", "bench.allocator", "--child", preset, "--threads", str(args.threads),
            "--steps", str(args.steps), "--batch", str(args.batch), "--tokens", str(args.tokens)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the training steps of {preset} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(time_steps_here(args))
        return
    rows = []
    for preset in args.presets:
        for round_ in range(1, args.rounds + 1):
            default = seconds_per_step(preset, args, keep_freed_memory=False)
            kept = seconds_per_step(preset, args, keep_freed_memory=True)
            print(f"{preset} round {round_}: {default:.3f} s/step, freed memory kept {kept:.3f}", flush=True)
            rows.append((preset, round_, default, kept))
    print(f"\nbatch {args.batch} x {args.tokens} tokens, {args.threads} thread(s), fp32, dropout 0.1\n")
    print("| model | round | glibc default, s/step | freed memory kept, s/step | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for preset, round_, default, kept in rows:
        print(f"| {preset} | {round_} | {default:.3f} | {kept:.3f} | {default / kept:.2f}× |")


if __name__ == "__main__":
    main()
