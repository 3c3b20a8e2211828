"""Generation throughput with and without the KV cache, in one process.

    python -m bench.generate                   # gpt2-small, 200 new tokens after an 8-token prompt, CPU
    python -m bench.generate --device cuda --new-tokens 500

Without the cache every new token re-runs the model over the whole (growing) sequence: the workshop's
``generate_text_simple``. With it, groundup's ``generate`` runs the prompt once and then one token per
step. Both are greedy, so their outputs must be identical; the table says whether they are.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from groundup.model.generate import generate, generate_text_simple
from groundup.model.gpt import GPTModel, config_from_preset, init_weights


def timed(device: str, run) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = config_from_preset(args.preset)
    torch.manual_seed(123)
    model = init_weights(GPTModel(cfg)).to(args.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), device=args.device)
    generate(model, prompt, 4)  # warm-up: first-call allocations and kernel selection
    plain, plain_seconds = timed(
        args.device, lambda: generate_text_simple(model, prompt, args.new_tokens, cfg.context_length)
    )
    cached, cached_seconds = timed(args.device, lambda: generate(model, prompt, args.new_tokens, use_cache=True))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Generation: {args.preset}, {args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, "
          f"greedy; {device}; torch {torch.__version__}; outputs identical: "
          f"{'yes' if torch.equal(plain, cached) else 'NO'}\n")
    print("| method | seconds | tokens/s | vs no cache |\n| --- | ---: | ---: | ---: |")
    for name, seconds in (("no KV cache (workshop's generate_text_simple)", plain_seconds),
                          ("KV cache (groundup generate)", cached_seconds)):
        print(f"| {name} | {seconds:.2f} | {args.new_tokens / seconds:,.1f} | {plain_seconds / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
