"""CPU training steps with glibc's default allocator against freed memory kept in the process.

glibc gives every freed block over 32 MB back to the system, so each training step page-faults its large
temporaries in again: the logits (batch x tokens x 50257 floats), their log-softmax and gradient, and the
embedding's gradient. ``groundup.train.cpu_memory.freed_memory_kept`` (what ``fit`` does on a CPU) keeps
that memory for the span of a run. This bench times the same steps (``bench.peers``' plain loop: forward,
loss, backward, fused AdamW; GPT-2's dropout 0.1; after two untimed steps) both ways, interleaved in one
process, and counts the page faults and kernel time of each variant's timed steps.

    python -m bench.allocator                       # gpt-mini and gpt2-small, ~5 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import resource

import torch

from bench.peers import train_in_plain_loop
from groundup.model.gpt import GPTModel, config_from_preset, init_weights
from groundup.train.cpu_memory import freed_memory_kept


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gpt-mini", "gpt2-small"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per row (at most the context length)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def timed_steps(model: GPTModel, args: argparse.Namespace, keep: bool) -> tuple[float, float, float]:
    """Seconds per step, page faults per step and kernel seconds per step of the plain loop's steps."""
    steps = argparse.Namespace(device="cpu", warmup=2, steps=args.steps, batch=args.batch,
                               context=min(args.tokens, model.cfg.context_length))  # fmt: skip
    with freed_memory_kept(keep):
        before = resource.getrusage(resource.RUSAGE_SELF)
        tokens_per_second, _ = train_in_plain_loop(model, steps, model)
        after = resource.getrusage(resource.RUSAGE_SELF)
    # The warm-up steps are inside the counters too: per step over all of them, an upper bound.
    total = steps.warmup + steps.steps
    return (steps.batch * steps.context / tokens_per_second, (after.ru_minflt - before.ru_minflt) / total,
            (after.ru_stime - before.ru_stime) / total)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        model = init_weights(GPTModel(config_from_preset(preset, drop_rate=0.1)), seed=0)
        for round_ in range(1, args.rounds + 1):
            default, kept = timed_steps(model, args, keep=False), timed_steps(model, args, keep=True)
            print(f"{preset} round {round_}: {default[0]:.3f} s/step, kept {kept[0]:.3f}", flush=True)
            rows.append((preset, round_, default, kept))
    print(f"\nbatch {args.batch} x {args.tokens} tokens, {args.threads} thread(s), fp32, dropout 0.1; "
          "faults and kernel time per step include the two warm-up steps\n")  # fmt: skip
    print("| model | round | glibc default, s/step | freed memory kept, s/step | speed-up "
          "| page faults a step, default / kept | kernel s a step, default / kept |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset, round_, default, kept in rows:
        print(f"| {preset} | {round_} | {default[0]:.3f} | {kept[0]:.3f} | {default[0] / kept[0]:.2f}× "
              f"| {default[1]:,.0f} / {kept[1]:,.0f} | {default[2]:.2f} / {kept[2]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
