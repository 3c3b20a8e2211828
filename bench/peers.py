"""groundup against what users would pick instead, Hugging Face ``transformers``, on the same weights.

    python -m bench.peers                          # gpt2-small shape, CPU, 3 interleaved rounds
    python -m bench.peers --rounds 1 --skip train  # loading and generation only
    python -m bench.peers --device cuda            # the GPU rows (see bench/gpu.sh)

A random GPT-2 is built with transformers' own ``GPT2LMHeadModel`` (every tensor perturbed, as in the tests'
fixtures), saved as Hugging Face safetensors and converted with groundup's own converter, so both libraries
hold the same weights; the bench checks that they compute the same logits. In one process, round after
round, each library in turn (every other round in reverse order):

- load: checkpoint directory -> model ready for inference (``load_model``, which lays the weights out for
  decoding where that pays, ``loading.layout_pays``, and ``load_checkpoint`` alone / ``from_pretrained``),
  and the same followed by the first token (both libraries read the file's pages lazily, when first used);
- generate: ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt, KV cache on both sides
  (groundup ``generate``, eager as ``load_model`` loads it, with the other layout and with ``compile=True``;
  ``GPT2LMHeadModel.generate(do_sample=False)``, sdpa attention); then both with prompt lookup (groundup ``lookahead``, transformers
  ``prompt_lookup_num_tokens``, ``--lookahead`` drafted tokens); then ``--batch-prompts`` prompts at once
  (groundup as ``load_model`` loads it and with plain ``nn.Linear``, ``load_checkpoint``); the tokens must
  be identical in every row;
- train: tokens/s on the same random batches, ``--batch`` x ``--context``, fp32, dropout 0.1. groundup runs
  through ``groundup.train.loop.fit`` (fused AdamW), eager and with ``train.compile``; transformers in a
  plain loop with fused AdamW (what its ``Trainer`` picks by default, ``adamw_torch_fused``), also with freed
  memory kept in the process as ``fit`` keeps it on a CPU (``groundup.train.cpu_memory``), and groundup's
  model in that same plain loop (what the model costs without ``fit``).

On a CPU it also prints how much of a one-token decoding step is its matrix products, what a pass's
products cost for a few rows through MKL and through oneDNN (``row_products``, why ``FewRowsLinear``
exists), and what narrower weights (bf16, int8) would buy those products here (``narrow_products``;
``--skip narrow`` leaves it out).

First calls (allocation, compilation) are untimed warm-ups; their seconds are printed separately. Peak
memory is the process's resident size sampled every 2 ms during a measurement, above its start. Each round
on a CPU also measures what the machine allows at fp32, whatever the library (see ``ceilings``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (~15 s) just to look for it

import torch  # noqa: E402

SIZES = ("124M", "355M", "gpt-tiny")  # groundup presets (gpt-tiny: bench/gpu.sh's rehearsal)
PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M", choices=SIZES)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument(
        "--batch-prompts", type=int, default=8, help="prompts generated at once in the batch rows (0: none)"
    )
    p.add_argument("--batch", type=int, help="training batch (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--context", type=int, default=256, help="training sequence length")
    p.add_argument("--steps", type=int, help="timed training steps per round (default: 3 on CPU, 20 on CUDA)")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed training steps before the timed ones (the first steps allocate, compiling takes two)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["load", "generate", "train", "compile", "narrow"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--lookahead",
        type=int,
        default=10,
        help="drafted tokens per pass in the prompt-lookup rows (groundup lookahead, transformers "
        "prompt_lookup_num_tokens); 0 skips those rows",
    )
    return p.parse_args(argv)


def progress(line: str) -> None:
    """Each measurement as it is taken (stderr), so a run cut short still tells what it measured."""
    print(f"[{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}] {line}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """Highest resident size above the start while the block runs (a sampling thread; CUDA: allocator)."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes() - self.start)


def timed(device: str, run: Callable[[], object]) -> tuple[object, float, int]:
    """``run()``'s result, seconds and peak memory above the start (bytes)."""
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return out, seconds, memory.peak


def same_weights(args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """A random GPT-2 as HF safetensors, and its conversion by groundup's converter."""
    from groundup.weights import convert_checkpoint
    from groundup.weights.fetch import local_checkpoint
    from tests.gpt2_fixtures import random_gpt2, save_hf

    model = random_gpt2(args.size)
    hf_dir = save_hf(model, root / "hf")
    del model
    return hf_dir, convert_checkpoint(local_checkpoint(hf_dir), root / "groundup")


def load_groundup(directory: Path, device: str):
    """What ``groundup generate`` and the responses stage load: weights laid out for decoding where it pays."""
    from groundup.model.loading import load_model

    return load_model(directory, device)


def load_groundup_as_stored(directory: Path, device: str):
    """The checkpoint alone, weights as stored (what training starts from)."""
    from groundup.model.io import load_checkpoint

    return load_checkpoint(directory, device)


def load_groundup_other_layout(directory: Path, device: str) -> tuple[object, str]:
    """The same model in the layout ``load_model`` did not pick here, and that layout's row label: what the
    choice (``loading.layout_pays``) is worth, side by side."""
    from groundup.model.gpt import decoding_layout
    from groundup.model.loading import layout_pays

    if layout_pays(device):
        return load_groundup_as_stored(directory, device), "weights as stored (`load_checkpoint`)"
    return decoding_layout(load_groundup_as_stored(directory, device)), "weights laid out (`decoding_layout`)"


def ready_to_answer(load: Callable, generate: Callable, prompt: torch.Tensor) -> Callable[..., object]:
    """``load`` then one greedy token: what a first answer waits for, file reads deferred by either included."""
    return lambda directory, device: generate(load(directory, device), prompt, 1)


def load_transformers(directory: Path, device: str):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa").to(device).eval()


def generate_groundup(
    model, prompt: torch.Tensor, new_tokens: int, compile: bool = False, lookahead: int = 0
) -> torch.Tensor:
    from groundup.model.generate import generate

    return generate(model, prompt, new_tokens, compile=compile, lookahead=lookahead)


def generate_transformers(model, prompt: torch.Tensor, new_tokens: int, lookahead: int = 0) -> torch.Tensor:
    # No end-of-text stop (groundup's generate has none unless asked): both run all new_tokens steps. Prompt
    # lookup insists on an end-of-text id, so it gets one no token has.
    lookup = {"prompt_lookup_num_tokens": lookahead, "eos_token_id": -1} if lookahead else {"eos_token_id": None}
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **lookup,
    )


def ceilings(model, args: argparse.Namespace) -> tuple[float, float]:
    """What this machine allows at fp32, whatever the library: (1) one-token-per-pass decoding, tok/s: every
    weight must be read from memory once per pass, so the time to read them all bounds a pass from below,
    taken as the faster of two full reads: a sum of each tensor, and a vector times each matrix stored
    along its longer side (faster than a sum here; sums for the vectors); (2) training, tok/s: a step
    costs ~6 FLOPs per parameter per token plus attention's 12 * layers * context * width / 2 (causal),
    at the speed of one large matrix product."""
    weights = list({id(p): p for p in model.parameters()}.values())
    long_rows = [w.detach().reshape(-1, max(w.shape)).contiguous() if w.dim() == 2 else None for w in weights]
    vectors = [None if m is None else torch.ones(1, m.shape[0], device=m.device) for m in long_rows]

    def best_of_five(run: Callable[[], object]) -> float:
        run()
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
        return min(seconds)

    # Whole passes, not tensor by tensor: a small tensor read five times in a row would come from the cache.
    read_all = min(
        best_of_five(lambda: [w.sum() for w in weights]),
        best_of_five(
            lambda: [
                w.sum() if m is None else v @ m for w, m, v in zip(weights, long_rows, vectors, strict=True)
            ]
        ),
    )
    a = torch.randn(1024, 1024, device=args.device)
    flops_per_second = 2 * 1024**3 / best_of_five(lambda: a @ a)
    cfg = model.cfg
    parameters = sum(w.numel() for w in weights) - cfg.context_length * cfg.emb_dim  # position table: no FLOPs
    attention = 12 * cfg.n_layers * args.context * cfg.emb_dim / 2
    return 1 / read_all, flops_per_second / (6 * parameters + attention)


def matrix_kinds(cfg) -> dict[str, tuple[int, int, int]]:
    """Each kind of weight matrix of a one-token step: (outputs, inputs, how many a step multiplies)."""
    d = cfg.emb_dim
    return {
        "output head": (cfg.vocab_size, d, 1),
        "query / key / value / attention output": (d, d, 4 * cfg.n_layers),
        "feed-forward, first layer": (4 * d, d, cfg.n_layers),
        "feed-forward, second layer": (d, 4 * d, cfg.n_layers),
    }


def best_ms(runs: dict[str, Callable[[int], object]], calls: int = 1, rounds: int = 3) -> dict[str, float]:
    """ms per call of each run, the best of ``rounds`` rounds in which the runs take turns. A round calls
    each run ``calls`` times, ``run(i)``: a product over ``calls`` different weights in turn, enough of them
    (``copies_past_cache``) that they come from memory, as in a real step, not from the CPU's cache."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for label, run in runs.items():
            started = time.perf_counter()
            for i in range(calls):
                run(i)
            best[label] = min(best.get(label, float("inf")), (time.perf_counter() - started) / calls * 1e3)
    return best


def copies_past_cache(outputs: int, inputs: int) -> int:
    return max(2, int(400e6 // (outputs * inputs * 4)))  # ~400 MB of fp32: well past any cache


def layout_products(model) -> list[tuple[str, float, float]]:
    """What ``decoding_layout`` is for: a vector times each kind of weight matrix, ms per product, stored
    output-major (as loaded) and input-major (laid out)."""
    rows = []
    for name, (outputs, inputs, _) in matrix_kinds(model.cfg).items():
        ms = layout_ms(outputs, inputs)
        rows.append((f"{name} ({outputs} × {inputs})", ms["stored"], ms["laid out"]))
    return rows


def layout_ms(outputs: int, inputs: int) -> dict[str, float]:
    import torch.nn.functional as F

    copies = copies_past_cache(outputs, inputs)
    stored = [torch.randn(outputs, inputs) for _ in range(copies)]
    laid_out = [w.t().contiguous().t() for w in stored]
    x = torch.randn(1, inputs)
    return best_ms(
        {"stored": lambda i: F.linear(x, stored[i]), "laid out": lambda i: F.linear(x, laid_out[i])}, copies
    )


NARROW_FORMATS = ("fp32", "bf16", "int8, `_weight_int8pack_mm`", "int8, compiled")


def narrow_products(model) -> list[tuple[str, dict[str, float]]]:
    """Fewer bytes per token: would narrower weights pay on this CPU? A vector times each kind of weight
    matrix, ms per product, with the weights in fp32 (what groundup and transformers decode with), bf16
    (half the bytes) and int8 with one scale per output (a quarter), the int8 product through PyTorch's
    weight-only kernel and through one that ``torch.compile`` generates (dequantize, multiply, sum). Both
    narrower formats round the weights, so the tokens change: this measures what they would buy, it is not
    an option of groundup's. The last row adds the kinds up as a one-token step multiplies them."""

    def dequantized_product(x, weight, scales):
        return (weight.to(x.dtype) * x).sum(-1) * scales

    compiled = torch.compile(dequantized_product, dynamic=False)
    rows = []
    step = dict.fromkeys(NARROW_FORMATS, 0.0)
    for name, (outputs, inputs, per_step) in matrix_kinds(model.cfg).items():
        ms = narrow_ms(outputs, inputs, compiled)
        rows.append((f"{name} ({outputs} × {inputs})", ms))
        for label in NARROW_FORMATS:
            step[label] += ms[label] * per_step
    rows.append((f"one token's products ({model.cfg.n_layers} layers and the head)", step))
    return rows


def narrow_ms(outputs: int, inputs: int, compiled: Callable) -> dict[str, float]:
    import torch.nn.functional as F

    copies = copies_past_cache(outputs, inputs)
    fp32 = [torch.randn(outputs, inputs) * 0.02 for _ in range(copies)]
    bf16 = [w.to(torch.bfloat16) for w in fp32]
    scales = [w.abs().amax(dim=1) / 127 for w in fp32]
    int8 = [torch.round(w / s.unsqueeze(1)).to(torch.int8) for w, s in zip(fp32, scales, strict=True)]
    x = torch.randn(1, inputs)
    x_bf16 = x.to(torch.bfloat16)
    compiled(x[0], int8[0], scales[0])  # compiles once per shape, untimed
    return best_ms(
        {
            "fp32": lambda i: F.linear(x, fp32[i]),
            "bf16": lambda i: F.linear(x_bf16, bf16[i]),
            "int8, `_weight_int8pack_mm`": lambda i: torch.ops.aten._weight_int8pack_mm(x, int8[i], scales[i]),
            "int8, compiled": lambda i: compiled(x[0], int8[i], scales[i]),
        },
        copies,
    )


PRODUCT_ROWS = (1, 3, 4, 8, 11, 16)


def row_products(model) -> list[tuple[int, float, float]]:
    """What ``FewRowsLinear`` is for: one pass's matrix products (every Linear of the model once, in order)
    for passes of a few rows, as batched decoding and prompt lookup's checking passes make them: ms through
    ``F.linear`` (MKL) and through the layers as ``load_model`` loaded them (``FewRowsLinear`` sends 4-15
    rows by a large matrix to oneDNN), best of four."""
    with torch.no_grad():
        return [(rows, *pass_ms(model, rows)) for rows in PRODUCT_ROWS]


def linears_and_inputs(model, *leading: int) -> tuple[list, dict[int, torch.Tensor]]:
    """Every ``Linear`` of ``model`` in order (one pass's products), and a random input of shape
    ``(*leading, width)`` for each width they take."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears, {n: torch.randn(*leading, n) for n in {m.in_features for m in linears}}


def pass_ms(model, rows: int) -> tuple[float, float]:
    import torch.nn.functional as F

    linears, inputs = linears_and_inputs(model, rows)
    ms = best_ms(
        {
            "F.linear": lambda _: [F.linear(inputs[m.in_features], m.weight, m.bias) for m in linears],
            "as loaded": lambda _: [m(inputs[m.in_features]) for m in linears],
        },
        rounds=4,
    )
    return ms["F.linear"], ms["as loaded"]


def step_in_products(model, prompt: torch.Tensor) -> tuple[float, float]:
    """How much of a one-token decoding step is its matrix products: (ms a step, ms of the same products on
    their own, every Linear of the model once, in order). Best of six, the first of which warms up."""
    from groundup.model.generate import decode_step

    linears, inputs = linears_and_inputs(model, 1, 1)
    cache = model.new_cache(1, prompt.shape[1] + 100)
    with torch.no_grad():
        model(prompt, cache)
        token, position = prompt[:, -1:], torch.tensor([[prompt.shape[1] + 50]])
        ms = best_ms(
            {
                "step": lambda _: decode_step(model, token, cache, position),
                "products": lambda _: [m(inputs[m.in_features]) for m in linears],
            },
            rounds=6,
        )
    return ms["step"], ms["products"]


def training_batches(args: argparse.Namespace):
    """The same random windows for both libraries, ``warmup + steps`` batches."""
    from torch.utils.data import DataLoader

    from bench.train import windows
    from groundup.model.gpt import GPTConfig

    dataset = windows(GPTConfig(), (args.warmup + args.steps) * args.batch, args.context)
    return DataLoader(dataset, batch_size=args.batch)


def train_groundup(directory: Path, args: argparse.Namespace, compile: bool) -> tuple[float, int]:
    """Tokens/s of ``fit`` on the converted weights (dropout 0.1 like GPT-2's config), and peak memory."""
    from bench.train import _Discard
    from groundup.config import RuntimeConfig, TrainConfig
    from groundup.model.gpt import GPTModel
    from groundup.model.io import load_state, read_config
    from groundup.train.loop import TrainHooks, fit

    cfg = read_config(directory)
    cfg.drop_rate = 0.1
    model = load_state(directory, GPTModel(cfg))
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    runtime = RuntimeConfig(accelerator=args.device, precision=precision, compile=compile)
    settings = TrainConfig(
        epochs=1,
        batch_size=args.batch,
        lr=4e-4,
        weight_decay=0.1,
        eval_freq=10**9,
        eval_iter=1,
        checkpoint_every=10**9,
        runtime=runtime,
    )
    loader = training_batches(args)
    marks: dict[int, float] = {}
    memory = PeakMemory(args.device)

    def clock(done: int, total: int) -> None:
        if done in (args.warmup, args.warmup + args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            marks[done] = time.perf_counter()

    with memory, tempfile.TemporaryDirectory() as run_dir:
        fit(model, loader, None, settings, run_dir, hooks=TrainHooks(on_progress=clock), saver=_Discard())
    return args.steps * args.batch * args.context / (
        marks[args.warmup + args.steps] - marks[args.warmup]
    ), memory.peak


def train_transformers(
    directory: Path, args: argparse.Namespace, keep_freed_memory: bool = False
) -> tuple[float, int]:
    """transformers in a plain loop; ``keep_freed_memory``: with the allocator setting ``fit`` uses on CPUs."""
    from transformers import GPT2LMHeadModel

    from groundup.train.cpu_memory import freed_memory_kept

    model = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa")
    with freed_memory_kept(keep_freed_memory):
        return train_in_plain_loop(model, args, lambda inputs: model(inputs).logits)


def train_groundup_plain(directory: Path, args: argparse.Namespace) -> tuple[float, int]:
    """Our model in transformers' loop: what the model costs, without ``fit``'s bookkeeping."""
    from groundup.model.gpt import GPTModel
    from groundup.model.io import load_state, read_config

    cfg = read_config(directory)
    cfg.drop_rate = 0.1
    model = load_state(directory, GPTModel(cfg))
    return train_in_plain_loop(model, args, model)


def train_in_plain_loop(model, args: argparse.Namespace, logits: Callable) -> tuple[float, int]:
    """Tokens/s and peak memory of forward, loss, backward and a fused AdamW step, nothing else."""
    from groundup.train.loop import lm_loss

    model = model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    with PeakMemory(args.device) as memory:
        for step, (inputs, targets) in enumerate(training_batches(args)):
            if step == args.warmup:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            inputs, targets = inputs.to(args.device), targets.to(args.device)
            with autocast:
                loss = lm_loss(logits(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return args.steps * args.batch * args.context / seconds, memory.peak


def in_turn(round_: int, rows: list) -> list:
    """The rows of a round, every other round in reverse, so that no row always runs in the same place (first
    comes right after the ceilings' reads; on a shared host a row's speed moved ±10% from round to round)."""
    return rows if round_ % 2 == 0 else rows[::-1]


def check_same_function(ours, theirs, device: str) -> float:
    """Largest logit difference on one sequence: the two models must be the same function."""
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        difference = (ours(idx) - theirs(idx).logits).abs().max().item()
    if difference > 1e-3:
        raise SystemExit(
            f"the converted weights do not give the same logits (max difference {difference:.2e})"
        )
    return difference


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (8 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 3)
    compile_too = "compile" not in args.skip
    speeds: dict[str, list[float]] = defaultdict(list)  # row -> one value per round
    memory: dict[str, int] = {}
    first_call: dict[str, float] = {}
    identical: list[bool] = []

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        print(
            f"writing a random {args.size} GPT-2 (HF safetensors + groundup conversion) ...", file=sys.stderr
        )
        hf_dir, ours_dir = same_weights(args, Path(tmp))
        ours, theirs = load_groundup(ours_dir, args.device), load_transformers(hf_dir, args.device)
        ours_other, other_layout = load_groundup_other_layout(ours_dir, args.device)  # the layout's effect
        ours_plain = load_groundup_as_stored(ours_dir, args.device)  # plain nn.Linear: FewRowsLinear's effect
        difference = check_same_function(ours, theirs, args.device)
        decode_ceiling = train_ceiling = 0.0
        products = layout_products(ours) if not gpu and "generate" not in args.skip else []
        few_rows = row_products(ours) if not gpu and "generate" not in args.skip else []
        narrow = narrow_products(ours) if not gpu and "narrow" not in args.skip else []
        prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(2))
        prompt = prompt.to(args.device)
        prompts = torch.randint(
            0, 50257, (args.batch_prompts, args.prompt_tokens), generator=torch.Generator().manual_seed(3)
        ).to(args.device)
        step_split = step_in_products(ours, prompt) if not gpu and "generate" not in args.skip else None
        if "generate" not in args.skip:  # warm-ups: untimed, but the first call's seconds are reported
            warm_ups = {
                "groundup generate": lambda: generate_groundup(ours, prompt, args.new_tokens, False),
                "transformers generate": lambda: generate_transformers(theirs, prompt, args.new_tokens),
                f"groundup generate, {other_layout}": lambda: generate_groundup(
                    ours_other, prompt, args.new_tokens
                ),
            }
            if compile_too:
                warm_ups["groundup generate, compile"] = lambda: generate_groundup(
                    ours, prompt, args.new_tokens, True
                )
            if args.lookahead:
                warm_ups["groundup generate, lookahead"] = lambda: generate_groundup(
                    ours, prompt, args.new_tokens, lookahead=args.lookahead
                )
                warm_ups["transformers generate, prompt lookup"] = lambda: generate_transformers(
                    theirs, prompt, args.new_tokens, args.lookahead
                )
            if args.batch_prompts:
                warm_ups["groundup generate, batch"] = lambda: generate_groundup(
                    ours, prompts, args.new_tokens
                )
                warm_ups["transformers generate, batch"] = lambda: generate_transformers(
                    theirs, prompts, args.new_tokens
                )
                warm_ups["groundup generate, batch, plain nn.Linear"] = lambda: generate_groundup(
                    ours_plain, prompts, args.new_tokens
                )
            for name, run in warm_ups.items():
                first_call[name] = timed(args.device, run)[1]
                progress(f"first call of {name}: {first_call[name]:.1f} s")
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds} ...", file=sys.stderr)
            # The machine's own limits, each round (a shared machine's bandwidth varies): the best seen.
            if not gpu:  # (on a GPU, bench.train reports MFU against the card's bf16 peak instead)
                decode_now, train_now = ceilings(ours, args)
                decode_ceiling, train_ceiling = max(decode_ceiling, decode_now), max(train_ceiling, train_now)
            if "load" not in args.skip:
                for name, load, directory in in_turn(round_, [
                    ("load", load_groundup, ours_dir),
                    ("load as stored", load_groundup_as_stored, ours_dir),
                    ("load ref", load_transformers, hf_dir),
                    ("first token", ready_to_answer(load_groundup, generate_groundup, prompt), ours_dir),
                    ("first token ref", ready_to_answer(load_transformers, generate_transformers, prompt), hf_dir),
                ]):
                    _, seconds, peak = timed(args.device, functools.partial(load, directory, args.device))
                    speeds[name].append(seconds)
                    memory[name] = max(memory.get(name, 0), peak)
                    progress(f"{name}: {seconds:.2f} s")
            if "generate" not in args.skip:
                runs = {
                    "generate": lambda: generate_groundup(ours, prompt, args.new_tokens, False),
                    "generate ref": lambda: generate_transformers(theirs, prompt, args.new_tokens),
                    "generate other layout": lambda: generate_groundup(ours_other, prompt, args.new_tokens),
                }
                if compile_too:
                    runs["generate compile"] = lambda: generate_groundup(ours, prompt, args.new_tokens, True)
                if args.lookahead:
                    runs["generate lookup"] = lambda: generate_groundup(
                        ours, prompt, args.new_tokens, lookahead=args.lookahead
                    )
                    runs["generate ref lookup"] = lambda: generate_transformers(
                        theirs, prompt, args.new_tokens, args.lookahead
                    )
                if args.batch_prompts:
                    runs["generate batch"] = lambda: generate_groundup(ours, prompts, args.new_tokens)
                    runs["generate batch ref"] = lambda: generate_transformers(
                        theirs, prompts, args.new_tokens
                    )
                    runs["generate batch plain"] = lambda: generate_groundup(
                        ours_plain, prompts, args.new_tokens
                    )
                outputs = {}
                for name, run in in_turn(round_, list(runs.items())):
                    outputs[name], seconds, peak = timed(args.device, run)
                    tokens = args.new_tokens * (args.batch_prompts if "batch" in name else 1)
                    speeds[name].append(tokens / seconds)
                    memory[name] = max(memory.get(name, 0), peak)
                    progress(f"{name}: {tokens / seconds:.2f} tok/s")
                identical.append(all(
                    torch.equal(out, outputs["generate batch ref" if "batch" in name else "generate ref"])
                    for name, out in outputs.items()
                ))
            if "train" not in args.skip:
                for name, train in in_turn(round_, [
                    ("train", lambda: train_groundup(ours_dir, args, False)),
                    ("train ref", lambda: train_transformers(hf_dir, args)),
                    ("train ref kept", lambda: train_transformers(hf_dir, args, keep_freed_memory=True)),
                    ("train plain", lambda: train_groundup_plain(ours_dir, args)),
                    ("train compile", lambda: train_groundup(ours_dir, args, True)),
                ]):
                    if (name == "train compile" and not compile_too) or (name == "train ref kept" and gpu):
                        continue
                    speed, peak = train()
                    speeds[name].append(speed)
                    memory[name] = max(memory.get(name, 0), peak)
                    progress(f"{name}: {speed:.1f} tok/s")

    device = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    import transformers

    print(
        f"groundup vs transformers {transformers.__version__} GPT2LMHeadModel (sdpa), {args.size} shape, same "
        f"weights (max logit difference {difference:.1e}); {device}; torch {torch.__version__}; "
        f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(
        "| measurement | groundup | transformers | groundup ÷ transformers (per round) | peak memory MB, groundup / transformers |"
    )
    print("| --- | ---: | ---: | --- | --- |")

    def row(label: str, ours_key: str, ref_key: str, unit: str) -> None:
        if ours_key not in speeds:
            return
        ratios = ", ".join(f"{a / b:.2f}×" for a, b in zip(speeds[ours_key], speeds[ref_key], strict=True))
        mb = f"{memory[ours_key] / 1e6:,.0f} / {memory[ref_key] / 1e6:,.0f}"
        print(
            f"| {label} | {statistics.median(speeds[ours_key]):,.2f} {unit} | "
            f"{statistics.median(speeds[ref_key]):,.2f} {unit} | {ratios} | {mb} |"
        )

    row("load a checkpoint for decoding, `load_model` (lower is better)", "load", "load ref", "s")
    row("… weights as stored, `load_checkpoint`", "load as stored", "load ref", "s")
    row("… `load_model` and the first token (lower is better)", "first token", "first token ref", "s")
    row(f"generate {args.new_tokens} tokens, greedy, KV cache", "generate", "generate ref", "tok/s")
    row(f"… groundup, {other_layout}", "generate other layout", "generate ref", "tok/s")
    row("… groundup with `compile=True`", "generate compile", "generate ref", "tok/s")
    row(f"… groundup with `lookahead={args.lookahead}` (prompt lookup)", "generate lookup", "generate ref", "tok/s")
    row(
        f"… both with prompt lookup ({args.lookahead} drafted tokens a pass)",
        "generate lookup",
        "generate ref lookup",
        "tok/s",
    )
    row(
        f"generate for {args.batch_prompts} prompts at once, {args.new_tokens} tokens each (tok/s, all rows)",
        "generate batch",
        "generate batch ref",
        "tok/s",
    )
    row(
        "… groundup with plain `nn.Linear` (`load_checkpoint`)",
        "generate batch plain",
        "generate batch ref",
        "tok/s",
    )
    row(
        f"train, batch {args.batch} × {args.context}" + (", bf16-mixed" if gpu else ", fp32"),
        "train",
        "train ref",
        "tok/s",
    )
    row(
        "… transformers with freed memory kept as well (what `fit` does on a CPU, `cpu_memory`)",
        "train",
        "train ref kept",
        "tok/s",
    )
    row("… groundup's model in transformers' plain loop (no `fit`)", "train plain", "train ref", "tok/s")
    row("… groundup with `train.compile`", "train compile", "train ref", "tok/s")
    if identical:
        print(f"\ngreedy tokens identical (every groundup and transformers generate row): "
              f"{'yes' if all(identical) else 'NO'} in {sum(identical)}/{len(identical)} rounds")
    if products:
        print("\n| a vector times a matrix (`decoding_layout`) | stored, ms | laid out, ms "
              "| stored ÷ laid out |\n| --- | ---: | ---: | ---: |")
        for name, stored, laid_out in products:
            print(f"| {name} | {stored:.2f} | {laid_out:.2f} | {stored / laid_out:.2f}× |")
        print()
    if few_rows:
        print("| one pass's matrix products for a few rows (`FewRowsLinear`), ms | `F.linear` (MKL) "
              "| as `load_model` loads them | `F.linear` ÷ as loaded |\n| --- | ---: | ---: | ---: |")
        for rows, mkl, onednn in few_rows:
            label = f"{rows} row{'s' if rows > 1 else ''}"
            print(f"| {label} | {mkl:.1f} | {onednn:.1f} | {mkl / onednn:.2f}× |")
        print()
    if step_split:
        step_ms, products_ms = step_split
        print(
            f"a one-token decoding step of groundup: {step_ms:.1f} ms, of which its matrix products on their own "
            f"take {products_ms:.1f} ms ({products_ms / step_ms:.0%})\n"
        )
    if narrow:
        print("| a vector times a matrix, fewer bytes (tokens change), ms | " + " | ".join(NARROW_FORMATS)
              + " |\n| --- |" + " ---: |" * len(NARROW_FORMATS))
        for name, ms in narrow:
            cells = " | ".join(f"{ms[label]:.2f} ({ms['fp32'] / ms[label]:.2f}×)" for label in NARROW_FORMATS)
            print(f"| {name} | {cells} |")
        print()
    if decode_ceiling:
        print(
            f"ceilings at fp32 on this CPU, whatever the library: one-token-per-pass decoding "
            f"{decode_ceiling:.1f} tok/s (every weight read once a pass), training {train_ceiling:.1f} tok/s "
            "(6 FLOPs per parameter and token at one large matrix product's speed)"
        )
    if first_call:
        print(
            "first calls (untimed warm-ups, compilation included): "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in first_call.items())
        )
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
