"""Training throughput: groundup's GPT in its Fabric loop against the workshop-style reference, one process.

    python -m bench.train                      # CPU: the workshop's config (124M, context 256, batch 2)
    python -m bench.train --compile            # CPU: also groundup + torch.compile
    python -m bench.train --device cuda        # GPU ladder: reference fp32, groundup fp32, bf16, bf16 + compile

The reference is ``bench/reference_gpt.py`` (explicit mask, hand-written LayerNorm/GELU) trained the
workshop's way (``zero_grad``, loss, ``backward``, ``AdamW.step``). groundup runs through
``groundup.train.loop.fit`` itself, so the number is what a pretraining run gets. Both see the same random
token windows; the first ``--warmup`` steps (allocation, compilation) are not timed. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.reference_gpt import ReferenceGPT
from groundup.config import RuntimeConfig, TrainConfig
from groundup.model.gpt import GPTConfig, GPTModel, config_from_preset
from groundup.train.loop import TrainHooks, fit, lm_loss

LR, WEIGHT_DECAY = 4e-4, 0.1
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) for the MFU column; --peak-tflops for other GPUs.
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "RTX 4090": 165}


def training_flops_per_token(cfg: GPTConfig, context: int) -> float:
    """PaLM's estimate: 6 per matmul weight (forward + backward; the output head included, embedding
    lookups not) plus 12 · layers · width · context for attention scores and their weighted sum."""
    d, layers = cfg.emb_dim, cfg.n_layers
    matmul_weights = layers * 12 * d * d + cfg.vocab_size * d
    return 6 * matmul_weights + 12 * layers * d * context


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def windows(cfg: GPTConfig, count: int, context: int) -> TensorDataset:
    tokens = torch.randint(0, cfg.vocab_size, (count, context + 1), generator=torch.Generator().manual_seed(0))
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def reference_tokens_per_second(cfg: GPTConfig, args: argparse.Namespace) -> float:
    torch.manual_seed(123)
    model = ReferenceGPT(cfg).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loader = DataLoader(windows(cfg, (args.warmup + args.steps) * args.batch, args.context), batch_size=args.batch)
    for step, (inputs, targets) in enumerate(loader):
        if step == args.warmup:
            synchronize(args.device)
            started = time.perf_counter()
        inputs, targets = inputs.to(args.device), targets.to(args.device)
        optimizer.zero_grad()
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    synchronize(args.device)
    return args.steps * args.batch * args.context / (time.perf_counter() - started)


class _Discard:
    """Checkpoints are not what is measured: write nothing."""

    def save(self, model, directory, metadata) -> None:
        pass

    def load(self, model, directory) -> None:
        pass


def groundup_tokens_per_second(cfg: GPTConfig, args: argparse.Namespace, precision: str, compile: bool) -> float:
    torch.manual_seed(123)
    model = GPTModel(cfg)
    runtime = RuntimeConfig(accelerator=args.device, precision=precision, compile=compile)
    settings = TrainConfig(epochs=1, batch_size=args.batch, lr=LR, weight_decay=WEIGHT_DECAY, eval_freq=10**9,
                           eval_iter=1, checkpoint_every=10**9, runtime=runtime)
    loader = DataLoader(windows(cfg, (args.warmup + args.steps) * args.batch, args.context), batch_size=args.batch)
    marks: dict[int, float] = {}

    def clock(done: int, total: int) -> None:
        if done in (args.warmup, args.warmup + args.steps):
            synchronize(args.device)
            marks[done] = time.perf_counter()

    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, loader, None, settings, run_dir, hooks=TrainHooks(on_progress=clock), saver=_Discard())
    return args.steps * args.batch * args.context / (marks[args.warmup + args.steps] - marks[args.warmup])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, help="default: 2 on CPU (the workshop's), 8 on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="CPU: add a groundup + torch.compile row")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU column (CUDA: looked up)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.batch = args.batch or (8 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup or (5 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cfg = config_from_preset(args.preset, context_length=args.context, drop_rate=0.1)

    rows = [("reference (workshop style), fp32", reference_tokens_per_second(cfg, args))]
    variants = [("groundup, fp32", "32-true", False)]
    if gpu and torch.cuda.is_bf16_supported():
        variants += [("groundup, bf16-mixed", "bf16-mixed", False), ("groundup, bf16-mixed + compile", "bf16-mixed", True)]
    elif args.compile:
        variants.append(("groundup, fp32 + compile", "32-true", True))
    for name, precision, compile in variants:
        rows.append((name, groundup_tokens_per_second(cfg, args, precision, compile)))

    device = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"Training throughput: {args.preset}, context {args.context}, batch {args.batch}, {args.steps} timed "
          f"steps after {args.warmup} warm-up; {device}; torch {torch.__version__}\n")
    peak = peak_tflops(args)
    flops = training_flops_per_token(cfg, args.context)
    print("| implementation | tokens/s | vs reference | MFU (bf16 peak) |\n| --- | ---: | ---: | ---: |")
    base = rows[0][1]
    for name, speed in rows:
        mfu = f"{speed * flops / (peak * 1e12):.1%}" if peak else "–"
        print(f"| {name} | {speed:,.0f} | {speed / base:.2f}x | {mfu} |")
    print(f"\nMFU: tokens/s × {flops / 1e9:.2f} GFLOP per token (6 · matmul weights + 12 · layers · width · "
          f"context) ÷ peak {peak or '?'} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
