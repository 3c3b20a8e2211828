"""LoRA vs full finetuning of the same GPT on the same instruction batches: what trains and what it costs.

Each variant runs in its own fresh process (so one's memory cannot inflate the other's): the same model
(random GPT-2-shaped weights, or a checkpoint given with ``--base``), the same batches of the instruction
data, AdamW over the trainable parameters. Reported per variant: trainable parameters, time per optimizer
step (after warm-up), peak memory of training above the loaded model (CUDA allocator peak on a GPU,
peak RSS on CPU), and the bytes of gradients plus AdamW state, which is where LoRA saves most.

    python -m bench.finetune                              # gpt-mini with GPT-2's vocabulary, CPU, ~1 min
    python -m bench.finetune --preset gpt2-medium --device cuda --batch-size 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instruction-data.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-mini", help="model preset (random weights); default %(default)s")
    p.add_argument("--base", help="a groundup checkpoint directory instead of a random preset")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="instruction data JSON (default: ../shared)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default %(default)s)")
    p.add_argument("--precision", default="32", choices=["32", "bf16"], help="weights dtype")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="allowed_max_length of a batch")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument(
        "--layers", default="query,value", help="LoRA targets: query,key,value,projection,mlp,head"
    )
    return p.parse_args(argv)


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak RSS) when 5 is written to clear_refs; elsewhere the peak is since start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_variant(variant: str, args: argparse.Namespace, results: mp.Queue) -> None:
    import torch

    from groundup.config import LoRAConfig
    from groundup.instruct.batching import InstructionDataset, collate_instructions
    from groundup.instruct.data import load_entries
    from groundup.model.gpt import GPTModel, config_from_preset, init_weights
    from groundup.model.io import load_checkpoint
    from groundup.model.lora import apply_lora

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    if args.base:
        model = load_checkpoint(args.base)
    else:
        model = init_weights(GPTModel(config_from_preset(args.preset)), seed=0)
    if variant == "LoRA":
        flags = {name: True for name in args.layers.split(",") if name}
        chosen = {k: k in flags for k in ("query", "key", "value", "projection", "mlp", "head")}
        apply_lora(model, LoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, **chosen))
    model = model.to(device=device, dtype=dtype).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.1)

    examples = InstructionDataset(load_entries(args.data)[: args.batch_size * (args.steps + args.warmup)])
    batches = [
        collate_instructions(
            examples.examples[i : i + args.batch_size], allowed_max_length=args.seq_len, device=device
        )
        for i in range(0, len(examples), args.batch_size)
    ]

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Peak over all steps above the loaded model: gradients, optimizer state (allocated at the first step)
    # and activations.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        baseline = _rss_mb("VmRSS") * 2**20
    for inputs, targets in batches[: args.warmup]:
        step(inputs, targets)
    sync()
    tokens, start = 0, time.perf_counter()
    for inputs, targets in batches[args.warmup :]:
        step(inputs, targets)
        tokens += inputs.numel()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_mb("VmHWM") * 2**20
    state_bytes = sum(p.numel() * p.element_size() for p in trainable)  # gradients
    state_bytes += sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    results.put(
        {
            "variant": variant,
            "total": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "trainable": sum(p.numel() for p in trainable),
            "step_s": elapsed / max(len(batches) - args.warmup, 1),
            "tokens_s": tokens / elapsed,
            "peak_mb": max(peak - baseline, 0) / 2**20,
            "state_mb": state_bytes / 2**20,
            "model": model.cfg.to_dict(),
            "peak_kind": "CUDA allocator" if device.type == "cuda" else "RSS",
        }
    )


def measure(variant: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=run_variant, args=(variant, args, results))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the {variant} run failed (exit code {proc.exitcode})")
    return results.get(timeout=10)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    full, lora = rows
    lines = [
        f"| {args.base or args.preset} · batch {args.batch_size} × ≤{args.seq_len} tokens · {args.device} "
        f"{args.precision} · LoRA r={args.r} on {args.layers} | full finetuning | LoRA | LoRA / full |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, key: str, fmt: str) -> None:
        a, b = full[key], lora[key]
        lines.append(f"| {label} | {a:{fmt}} | {b:{fmt}} | {b / a:.3g}× |")

    row("trainable parameters", "trainable", ",")
    row("step time (s)", "step_s", ".3f")
    row("tokens / s", "tokens_s", ",.0f")
    row(f"peak memory above the model (MB, {full['peak_kind']})", "peak_mb", ",.1f")
    row("gradients + AdamW state (MB)", "state_mb", ",.1f")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_file():
        print(f"bench/finetune: instruction data {args.data} not found (pass --data)", file=sys.stderr)
        return 2
    rows = [measure(variant, args) for variant in ("full", "LoRA")]
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
