"""Text generation: the workshop's greedy loop, sampling (temperature, top-k, top-p), end-of-text stop,
streaming, and a KV cache.

With the cache, the prompt is run through the model once ("prefill") and every later step feeds only the
newest token, attending to the keys and values stored for the earlier ones: linear instead of quadratic
work in the output length. Position embeddings are absolute, so a cache cannot slide: once the sequence
outgrows the context window, every step re-prefills the cropped window, which is exactly what the uncached
loop computes. That keeps greedy output identical with and without the cache at any length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from groundup.errors import SettingsError
from groundup.model.gpt import KVCache


class GenerationError(SettingsError):
    """Bad generation arguments (temperature, top-k, top-p, a context size the model cannot take)."""


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The workshop's greedy loop: recompute the (cropped) context each step, append the argmax."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from ``(batch, vocab)`` logits; returns ``(batch, 1)``.

    ``temperature == 0`` is greedy (top-k/top-p cannot change the argmax). Otherwise the logits are scaled
    by ``1/temperature``, cut to the ``top_k`` largest and to the smallest set whose probability reaches
    ``top_p`` (always at least one token), and sampled.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first one always stays.
        outside = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


def _check_arguments(
    model: nn.Module,
    idx: torch.Tensor,
    lengths: torch.Tensor | None,
    context_size: int | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    use_cache: bool,
) -> int:
    """The context window to crop to, after checking every argument."""
    if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype != torch.long:
        raise GenerationError(
            f"idx must be a (batch, tokens) LongTensor with at least one token, got {idx.dtype} {tuple(idx.shape)}"
        )
    if lengths is not None and (
        lengths.shape != idx.shape[:1] or int(lengths.min()) < 1 or int(lengths.max()) > idx.shape[1]
    ):
        raise GenerationError(
            f"lengths must hold one count in 1..{idx.shape[1]} per row of idx, got {lengths.tolist()}"
        )
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    model_context = getattr(getattr(model, "cfg", None), "context_length", None)
    if use_cache and not hasattr(model, "new_cache"):
        raise GenerationError(f"{type(model).__name__} has no KV cache (new_cache); pass use_cache=False")
    window = context_size if context_size is not None else model_context
    if window is None:
        raise GenerationError(f"{type(model).__name__} does not say its context length; pass context_size")
    if window < 1:
        raise GenerationError(f"context_size must be positive, got {window}")
    return min(window, model_context) if model_context else window


def stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    lengths: torch.Tensor | None = None,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next ``(batch, 1)`` tokens one step at a time.

    ``lengths`` (``(batch,)``) batches prompts of different lengths: row ``i`` of ``idx`` holds its prompt in
    the first ``lengths[i]`` columns, whatever follows is padding that no token attends to. Each row ends at
    its first ``eos_id``, which is not yielded; generation stops once every row has ended, and a row that
    ended earlier is padded with ``eos_id`` meanwhile. ``seed`` makes sampling reproducible without touching
    the global RNG. ``compile`` runs the one-token step through ``torch.compile`` (the first call compiles;
    greedy output stays the same). The model runs in eval mode, then gets its mode back. Arguments are
    checked here, before the first token is asked for.
    """
    window = _check_arguments(model, idx, lengths, context_size, temperature, top_k, top_p, use_cache)
    if lengths is None:
        lengths = torch.full((idx.shape[0],), idx.shape[1], dtype=torch.long, device=idx.device)
    step = _compiled_decode_step() if compile and use_cache else decode_step
    return _stream(
        model, idx, lengths.to(idx.device), max_new_tokens, window, temperature, top_k, top_p, eos_id,
        use_cache, step, seed,
    )


def decode_step(
    model: nn.Module, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor
) -> torch.Tensor:
    """One token per row at its position in the cache: the ``(batch, vocab)`` logits of the next one."""
    return model(tokens, cache, positions)[:, -1]


@functools.cache
def _compiled_decode_step() -> Callable[..., torch.Tensor]:
    # Every step of a run has the same shapes (one token per row, a fixed-size cache), so one graph serves
    # all its steps; a second run with another batch size or cache length makes those sizes dynamic.
    return torch.compile(decode_step)


def _prefill(
    model: nn.Module,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    cache: KVCache | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each row's last ``window`` tokens at positions ``0 …`` (into the cache, if any): the logits of
    every row's next token, and how many tokens of each row were cropped off its front."""
    offsets = (lengths - window).clamp(min=0)
    width = min(int(lengths.max()), window)
    columns = torch.arange(width, device=tokens.device)
    # Rows shorter than `width` read past their end (clamped): padding, only ever seen by itself.
    cropped = tokens.gather(1, (offsets.unsqueeze(1) + columns).clamp(max=tokens.shape[1] - 1))
    if cache is None:
        logits = model(cropped)  # causal attention: padding after a row's end cannot change it
    else:
        logits = model(cropped, cache, columns.expand_as(cropped))
    last = (lengths - offsets - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    return logits.gather(1, last).squeeze(1), offsets


def _stream(
    model: nn.Module,
    idx: torch.Tensor,
    lengths: torch.Tensor,
    max_new_tokens: int,
    window: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    use_cache: bool,
    step: Callable[..., torch.Tensor],
    seed: int | None,
) -> Iterator[torch.Tensor]:
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    batch = idx.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
    # Each row's tokens so far, left-aligned; the next token of row i goes to column lengths[i].
    tokens = torch.cat([idx, idx.new_zeros(batch, max_new_tokens)], dim=1)
    lengths = lengths.clone()
    rows = torch.arange(batch, device=idx.device)
    # A cache no longer than the sequence can get keeps every step's attention short.
    cache = model.new_cache(batch, min(window, tokens.shape[1])) if use_cache else None
    offsets = torch.zeros_like(lengths)  # tokens cropped off each row's front when it was last prefilled
    longest = None  # tokens of the longest row counted from its offset; None until the first prefill
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                if cache is None or longest is None or longest > window:
                    # Without a cache, or once the window is full: the absolute positions cannot slide,
                    # so the (cropped) window is fed again from position 0, as the uncached loop does.
                    logits, offsets = _prefill(model, tokens, lengths, window, cache)
                    longest = min(int(lengths.max()), window)
                else:  # only each row's newest token, at the position after its cached ones
                    newest = tokens.gather(1, (lengths - 1).unsqueeze(1))
                    logits = step(model, newest, cache, (lengths - 1 - offsets).unsqueeze(1))
                next_token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_token = next_token.masked_fill(finished.unsqueeze(1), eos_id)
                    finished |= next_token.squeeze(1) == eos_id
                    if finished.all():
                        return
                tokens[rows, lengths] = next_token.squeeze(1)
                lengths += 1
                longest += 1
                yield next_token
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    lengths: torch.Tensor | None = None,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """``idx`` followed by up to ``max_new_tokens`` generated tokens (see :func:`stream`); with ``lengths``
    the new tokens start after ``idx``'s last column, whatever each row's own length."""
    new = list(
        stream(
            model, idx, max_new_tokens, lengths=lengths, context_size=context_size, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_id=eos_id, use_cache=use_cache, compile=compile, seed=seed,
        )
    )
    return torch.cat([idx, *new], dim=1)
