"""CPU training steps with glibc's default allocator against one that keeps freed memory in the process.

glibc gives every freed block over 32 MB back to the system, so each training step page-faults its large
temporaries in again: the logits (batch x tokens x 50257 floats), their log-softmax and gradient, and the
embedding's gradient. Three of glibc's own environment variables keep that memory instead:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1000000000

They are read once when a process starts, so the two variants cannot share one process: each round runs
the same steps (forward, loss, backward, fused AdamW; GPT-2's dropout 0.1; after two untimed steps) in a
process of its own for each variant, one after the other, and compares seconds per step within the round.

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
STEPS = """
import sys, time, torch
from groundup.model.gpt import GPTModel, config_from_preset, init_weights
from groundup.train.loop import lm_loss
preset, (threads, steps, rows, tokens) = sys.argv[1], map(int, sys.argv[2:6])
torch.set_num_threads(threads)
cfg = config_from_preset(preset, drop_rate=0.1)
model = init_weights(GPTModel(cfg), seed=0).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)
shape = (rows, min(tokens, cfg.context_length) + 1)
batch = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))
def step():
    lm_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(2):
    step()
started = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - started) / steps)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gpt-mini", "gpt2-small"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per row (at most the context length)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each process")
    return p.parse_args(argv)


def seconds_per_step(preset: str, args: argparse.Namespace, keep_freed_memory: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_MEMORY}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if keep_freed_memory:
        env.update(KEEP_FREED_MEMORY)
    argv = [sys.executable, "-c", STEPS, preset, str(args.threads), str(args.steps), str(args.batch),
            str(args.tokens)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the training steps of {preset} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
