"""Text generation: the workshop's greedy loop, sampling (temperature, top-k, top-p), end-of-text stop,
streaming, and a KV cache.

With the cache, the prompt is run through the model once ("prefill") and every later step feeds only the
newest token, attending to the keys and values stored for the earlier ones: linear instead of quadratic
work in the output length. Position embeddings are absolute, so a cache cannot slide: once the sequence
outgrows the context window, every step re-prefills the cropped window, which is exactly what the uncached
loop computes. That keeps greedy output identical with and without the cache at any length.

Greedy decoding can also draft tokens by *prompt lookup* (``lookahead``): when the last few tokens occurred
earlier in the row (in the prompt, or in what the model already wrote), the tokens that followed them there
are a guess at what comes next. One pass over the newest token plus the guesses gives the model's own next
token after each of them; the guesses that agree are kept, with the model's token after the last of them.
The kept tokens are the greedy ones (each one is the argmax the model gives after its prefix; a wider
pass rounds differently, which could only flip a near-exact tie, as batching could), several per pass
wherever text repeats: answers that copy from their input, a model stuck in a loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

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
    lookahead: int,
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
    if lookahead < 0:
        raise GenerationError(f"lookahead must be >= 0 (0: no drafted tokens), got {lookahead}")
    if lookahead and (temperature != 0 or not use_cache):
        raise GenerationError(
            f"lookahead={lookahead} checks drafted tokens against greedy decoding with the KV cache; "
            "use temperature 0 and use_cache=True, or lookahead 0"
        )
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
    lookahead: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield the next ``(batch, 1)`` tokens one step at a time.

    ``lengths`` (``(batch,)``) batches prompts of different lengths: row ``i`` of ``idx`` holds its prompt in
    the first ``lengths[i]`` columns, whatever follows is padding that no token attends to. Each row ends at
    its first ``eos_id``, which is not yielded; generation stops once every row has ended, and a row that
    ended earlier is padded with ``eos_id`` meanwhile. ``seed`` makes sampling reproducible without touching
    the global RNG. ``compile`` runs the one-token step through ``torch.compile`` (the first call compiles;
    greedy output stays the same). ``lookahead`` (greedy only) drafts up to that many tokens per pass by
    prompt lookup and keeps those the model agrees with (see the module's docstring): the same tokens,
    fewer passes where text repeats; each row of a batch keeps what it agrees with, and a column is
    yielded once every row has it. The model runs in eval mode, then gets its mode back. Arguments are
    checked here, before the first token is asked for.
    """
    window = _check_arguments(
        model, idx, lengths, context_size, temperature, top_k, top_p, use_cache, lookahead
    )
    if lengths is None:
        lengths = torch.full((idx.shape[0],), idx.shape[1], dtype=torch.long, device=idx.device)
    step = _compiled_decode_step() if compile and use_cache else decode_step
    return _stream(
        model, idx, lengths.to(idx.device), max_new_tokens, window, temperature, top_k, top_p, eos_id,
        use_cache, step, seed, lookahead,
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
    last = lengths - offsets - 1  # each row's newest token in `cropped`
    if cache is None:  # causal attention: padding after a row's end cannot change it
        logits = model(cropped, logits_at=last)
    else:
        logits = model(cropped, cache, columns.expand_as(cropped), logits_at=last)
    return logits.squeeze(1), offsets


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
    lookahead: int,
) -> Iterator[torch.Tensor]:
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    batch = idx.shape[0]
    # Each row's tokens so far, left-aligned; the next token of row i goes to column lengths[i]. Rows may
    # run ahead of each other (a pass can keep several drafted tokens of one row and none of another), so
    # the rows' new tokens are yielded a column at a time once every row has that column.
    tokens = torch.cat([idx, idx.new_zeros(batch, max_new_tokens)], dim=1)
    lengths = lengths.clone()
    first_new = lengths.clone()  # column of each row's first new token
    rows = torch.arange(batch, device=idx.device)
    made = torch.zeros_like(lengths)  # new tokens each row has, up to and including its end-of-text
    ended = torch.zeros(batch, dtype=torch.bool, device=idx.device)  # the row's last token was end-of-text
    # A cache no longer than the sequence can get keeps every step's attention short.
    cache = model.new_cache(batch, min(window, tokens.shape[1])) if use_cache else None
    offsets = torch.zeros_like(lengths)  # tokens cropped off each row's front when it was last prefilled
    prefilled = False
    drafting = DraftLength(lookahead)
    yielded = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            while yielded < max_new_tokens:
                running = ~ended & (made < max_new_tokens)
                longest = int((lengths - offsets).max())  # the longest row, newest token included
                if cache is None or not prefilled or longest > window:
                    # Without a cache, or once the window is full: the absolute positions cannot slide,
                    # so the (cropped) window is fed again from position 0, as the uncached loop does.
                    logits, offsets = _prefill(model, tokens, lengths, window, cache)
                    new_tokens = sample_next(logits, temperature, top_k, top_p, generator)
                    counts = torch.ones_like(lengths)
                    prefilled = True
                else:  # each row's newest token at the position after its cached ones (and any drafts)
                    newest = tokens.gather(1, (lengths - 1).unsqueeze(1))
                    positions = lengths - 1 - offsets
                    # Drafts must leave a token to the model and fit in the cache after the newest one;
                    # those bounds read device values back, so only when there is something to draft.
                    wanted = drafting.next()
                    most = wanted and min(
                        wanted,
                        int((max_new_tokens - made[running]).min()) - 1,
                        cache.max_length - int(positions[running].max()) - 1,
                    )
                    drafts = lookup_drafts(tokens, lengths, running, most) if most > 0 else None
                    if drafts is None:
                        logits = step(model, newest, cache, positions.unsqueeze(1))
                        new_tokens = sample_next(logits, temperature, top_k, top_p, generator)
                        counts = torch.ones_like(lengths)
                    else:
                        new_tokens, counts = _verify(model, newest, *drafts, cache, positions, cache.max_length)
                        drafting.kept(int(counts[running].max()) - 1, drafts[0].shape[1])
                # Each running row keeps its first `counts` new tokens, within its budget and up to its
                # end-of-text (all rows at once: no per-row reads from the device).
                counts = torch.where(running, torch.minimum(counts, max_new_tokens - made), 0)
                within = torch.arange(new_tokens.shape[1], device=idx.device) < counts.unsqueeze(1)
                if eos_id is not None:
                    at_end = (new_tokens == eos_id) & within
                    ended |= at_end.any(dim=1)
                    within &= at_end.long().cumsum(dim=1) - at_end.long() == 0  # nothing after the first
                    counts = within.sum(dim=1)
                columns = lengths.unsqueeze(1) + torch.arange(new_tokens.shape[1], device=idx.device)
                tokens[rows.unsqueeze(1).expand_as(columns)[within], columns[within]] = new_tokens[within]
                lengths += counts
                made += counts
                # Columns every row has: a row that ended has them all (end-of-text from then on). Once all
                # rows have ended, the column where the last of them ended is not yielded.
                ready = int(torch.where(ended, max_new_tokens, made).min())
                last = int(made.max()) - 1 if bool(ended.all()) else max_new_tokens
                for column in range(yielded, min(ready, last)):
                    next_token = tokens.gather(1, (first_new + column).unsqueeze(1))
                    if eos_id is not None:  # rows that ended before this column
                        next_token = next_token.masked_fill((made <= column).unsqueeze(1) & ended.unsqueeze(1), eos_id)
                    yielded += 1
                    yield next_token
                if yielded == last:
                    return
    finally:
        model.train(was_training)


class DraftLength:
    """How many tokens to draft for the next pass, at most ``lookahead``: doubled after a pass in which a
    row kept all its drafts, halved after one in which no row kept any. A wider pass costs more than a
    one-token step (on a CPU, up to three times as much), so text that does not repeat itself soon
    decodes a token a pass again, trying a one-token draft every ``PROBE_EVERY`` steps."""

    PROBE_EVERY = 16

    def __init__(self, lookahead: int) -> None:
        self.lookahead, self.length, self.steps_since_draft = lookahead, lookahead, 0

    def next(self) -> int:
        if self.length == 0 and self.lookahead:
            self.steps_since_draft += 1
            return 1 if self.steps_since_draft % self.PROBE_EVERY == 0 else 0
        return self.length

    def kept(self, kept: int, drafted: int) -> None:
        """After a pass that verified ``drafted`` tokens: the most any row kept."""
        if kept == drafted:
            self.length = min(self.lookahead, max(1, 2 * self.length))
        elif kept == 0:
            self.length //= 2


# Prompt lookup matches the row's last 3 tokens, else its last 2. A single repeated token is too weak a
# hint: in text that does not repeat itself its guesses are mostly wrong, and a wrong guess costs a wider pass.
LOOKUP_NGRAM = 3
LOOKUP_MIN_NGRAM = 2


def lookup_drafts(
    tokens: torch.Tensor, lengths: torch.Tensor, running: torch.Tensor, most: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Guesses at the tokens after each running row's last one: what followed an earlier occurrence of the
    row's last ``n`` tokens (the largest ``n`` in ``LOOKUP_MIN_NGRAM … LOOKUP_NGRAM`` that occurred; of its occurrences, the latest
    one followed by the most tokens), at most ``most`` of them. Returns ``(batch, k)`` drafts, right-padded,
    and each row's count (0: no guess, or not running); ``None`` when no row has a guess."""
    guesses = [
        _continuation(tokens[row, : int(lengths[row])], most) if running[row] else None
        for row in range(tokens.shape[0])
    ]
    counts = torch.tensor([0 if guess is None else len(guess) for guess in guesses], device=tokens.device)
    if not counts.any():
        return None
    drafts = tokens.new_zeros(tokens.shape[0], int(counts.max()))
    for row, guess in enumerate(guesses):
        if guess is not None:
            drafts[row, : len(guess)] = guess
    return drafts, counts


def _continuation(sequence: torch.Tensor, most: int) -> torch.Tensor | None:
    length = sequence.shape[0]
    for n in range(min(LOOKUP_NGRAM, length - 1), LOOKUP_MIN_NGRAM - 1, -1):
        # Every n-gram that has a token after it, i.e. starts before the last n tokens' own start.
        earlier = sequence[:-1].unfold(0, n, 1)
        starts = (earlier == sequence[-n:]).all(dim=1).nonzero().squeeze(1)
        if len(starts):
            following = (length - n - starts).clamp(max=most)
            start = int(starts[following == following.max()].max())
            return sequence[start + n : start + n + most]
    return None


def _verify(
    model: nn.Module,
    newest: torch.Tensor,
    drafts: torch.Tensor,
    draft_counts: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor,
    slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over each row's newest token and its drafts: the model's greedy token after each of them,
    and how many of those each row keeps: the ones after drafts it agreed with, and one more (the model's
    own token after its last agreed draft, or instead of its first wrong one). Each kept token was thus
    predicted after the row's greedy tokens only."""
    fed = torch.cat([newest, drafts], dim=1)
    # Rows that are done are fed too (the batch is one tensor); their positions may run past the cache.
    fed_positions = (positions.unsqueeze(1) + torch.arange(fed.shape[1], device=fed.device)).clamp(max=slots - 1)
    predicted = model(fed, cache, fed_positions).argmax(dim=-1)  # predicted[:, j]: the token after fed[:, j]
    drafted = torch.arange(drafts.shape[1], device=fed.device) < draft_counts.unsqueeze(1)
    agreed = ((predicted[:, :-1] == drafts) & drafted).long().cumprod(dim=1).sum(dim=1)
    return predicted, agreed + 1


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
    lookahead: int = 0,
) -> torch.Tensor:
    """``idx`` followed by up to ``max_new_tokens`` generated tokens (see :func:`stream`); with ``lengths``
    the new tokens start after ``idx``'s last column, whatever each row's own length."""
    new = list(
        stream(
            model, idx, max_new_tokens, lengths=lengths, context_size=context_size, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_id=eos_id, use_cache=use_cache, compile=compile, seed=seed,
            lookahead=lookahead,
        )
    )
    return torch.cat([idx, *new], dim=1)


# `groundup generate` stops after this many blank lines in a row (an undertrained model's favourite output).
BLANK_LINES_STOP = 2


def until_blank_lines(pieces: Iterable[str], limit: int = BLANK_LINES_STOP) -> Iterator[str]:
    """The decoded pieces of a generation, ending before the whitespace after the last visible character
    holds more than ``limit`` blank lines: a small model that only emits blank lines has nothing more to say."""
    blank_run = ""  # the whitespace generated since the last visible character
    for text in pieces:
        blank_run = blank_run + text if not text.strip() else text[len(text.rstrip()) :]
        if blank_run.count("\n") > limit:
            return
        yield text
