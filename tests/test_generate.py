"""Generation: greedy with and without the KV cache, sampling, end-of-text, streaming, `groundup generate`."""

from __future__ import annotations

import pytest
import torch

from groundup.model.generate import (
    GenerationError,
    generate,
    generate_text_simple,
    lookup_drafts,
    sample_next,
    stream,
)
from groundup.model.gpt import GPTModel, config_from_preset, few_rows_through_onednn, init_weights
from groundup.model.io import save_checkpoint

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(1)
    # Larger-than-GPT-2 init spread: confident, varied predictions instead of a near-uniform tie-fest.
    gpt = GPTModel(config_from_preset("gpt-tiny", vocab_size=VOCAB, context_length=32, drop_rate=0.2))
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt.eval()


def prompts(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("new_tokens", [5, 25, 60])  # within, up to and well past the context of 32
def test_greedy_is_the_same_with_and_without_cache(model, new_tokens):
    idx = prompts()
    cached = generate(model, idx, new_tokens, use_cache=True)
    uncached = generate(model, idx, new_tokens, use_cache=False)
    assert cached.shape == (2, 7 + new_tokens)
    assert torch.equal(cached, uncached)
    assert torch.equal(uncached, generate_text_simple(model, idx, new_tokens, context_size=32))


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_output_head_runs_on_one_token_per_row(model, use_cache):
    """A prompt pass, and without the cache every pass, gives the head only each row's newest token: the
    head is the largest product, and only that token's logits choose the next one."""
    rows_seen = []
    hook = model.out_head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[:2]))
    try:
        generate(model, prompts(batch=2, length=9), 4, lengths=torch.tensor([9, 5]), use_cache=use_cache)
    finally:
        hook.remove()
    assert rows_seen == [(2, 1)] * 4


def test_a_shorter_context_size_crops_the_same_way_with_the_cache(model):
    idx = prompts(batch=1, length=12)
    cached = generate(model, idx, 20, context_size=8)
    assert torch.equal(cached, generate(model, idx, 20, context_size=8, use_cache=False))
    assert torch.equal(cached, generate_text_simple(model, idx, 20, context_size=8))
    assert not torch.equal(cached, generate(model, idx, 20))  # the window really was shorter


def test_batched_rows_match_single_prompts(model):
    idx = prompts(batch=3)
    batched = generate(model, idx, 10)
    for row in range(3):
        assert torch.equal(batched[row : row + 1], generate(model, idx[row : row + 1], 10))


@pytest.mark.parametrize("use_cache", [True, False])
def test_right_padded_prompts_of_different_lengths_match_single_prompts(model, use_cache):
    rows = [prompts(batch=1, length=n, seed=n)[0] for n in (3, 9, 6)]
    padded = torch.full((3, 9), VOCAB - 1)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    lengths = torch.tensor([len(row) for row in rows])
    # 40 new tokens pass the context of 32: the cropped re-prefill must crop each row by its own length.
    batched = generate(model, padded, 40, lengths=lengths, use_cache=use_cache)[:, 9:]
    for i, row in enumerate(rows):
        alone = generate(model, row.unsqueeze(0), 40, use_cache=False)[0, len(row) :]
        assert torch.equal(batched[i], alone)


@pytest.mark.slow  # compiles a graph with inductor (a C++ compiler), ~1 min on a loaded 2-core CPU
def test_compiled_one_token_step_is_greedy_identical(model):
    idx = prompts(batch=2, length=5)
    compiled = generate(model, idx, 12, compile=True)
    assert torch.equal(compiled, generate(model, idx, 12))
    assert torch.equal(compiled, generate(model, idx, 12, use_cache=False))


def through_onednn(model: GPTModel) -> GPTModel:
    """A copy of ``model`` whose every linear layer, however small, sends 4-15 rows to oneDNN."""
    fast = few_rows_through_onednn(GPTModel(model.cfg), min_weight=0)
    fast.load_state_dict(model.state_dict())
    return fast.eval()


@pytest.mark.slow  # compiles twice (a second batch size makes it dynamic), ~1-2 min on a 2-core CPU
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a PyTorch built with oneDNN")
def test_compiled_step_of_a_model_with_few_rows_through_onednn_is_greedy_identical(model):
    """torch.compile traces FewRowsLinear as F.linear, also once the batch size is symbolic."""
    fast = through_onednn(model)
    for batch in (8, 5):
        idx = prompts(batch=batch, length=5, seed=batch)
        assert torch.equal(generate(fast, idx, 12, compile=True), generate(model, idx, 12))


def count_passes(model: GPTModel) -> list[int]:
    """Tokens fed in each forward pass from now on (the hook stays on the module-scoped model, harmlessly)."""
    passes: list[int] = []
    model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[1]))
    return passes


def test_prompt_lookup_drafts_what_followed_the_last_tokens_earlier():
    tokens = torch.tensor([[5, 6, 7, 8, 5, 6, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 1, 2, 1, 2, 1, 2]])
    lengths = torch.tensor([6, 8, 8])
    # Row 0 ends in 5 6, seen at the start, followed by 7 8 5 6; row 1 repeats nothing; row 2 is not running.
    drafts, counts = lookup_drafts(tokens, lengths, torch.tensor([True, True, False]), most=3)
    assert drafts.tolist() == [[7, 8, 5], [0, 0, 0], [0, 0, 0]] and counts.tolist() == [3, 0, 0]
    assert lookup_drafts(tokens[1:2], lengths[1:2], torch.tensor([True]), most=3) is None
    # The longest match wins: 2 3 occurs twice, 1 2 3 once (followed by 9 4).
    tokens = torch.tensor([[1, 2, 3, 9, 4, 2, 3, 5, 1, 2, 3]])
    drafts, counts = lookup_drafts(tokens, torch.tensor([11]), torch.tensor([True]), most=2)
    assert drafts.tolist() == [[9, 4]] and counts.tolist() == [2]
    # Of several occurrences, the latest that is followed by `most` tokens: 7 8 7 8 ... ends in 8.
    tokens = torch.tensor([[7, 8, 1, 7, 8, 2, 7, 8]])
    drafts, _ = lookup_drafts(tokens, torch.tensor([8]), torch.tensor([True]), most=2)
    assert drafts.tolist() == [[2, 7]]


def test_draft_length_backs_off_when_guesses_fail_and_grows_when_they_hold():
    from groundup.model.generate import DraftLength

    drafting = DraftLength(8)
    for expected in (8, 4, 2, 1):
        assert drafting.next() == expected
        drafting.kept(0, expected)
    # Guesses kept failing: one-token steps, with a one-token draft every PROBE_EVERY steps.
    lengths = [drafting.next() for _ in range(2 * DraftLength.PROBE_EVERY)]
    assert lengths.count(1) == 2 and set(lengths) == {0, 1}
    drafting.kept(1, 1)  # the probe held: 1, 2, 4, 8, and no more than the lookahead
    for expected in (1, 2, 4, 8, 8):
        assert drafting.next() == expected
        drafting.kept(expected, expected)
    drafting.kept(3, 8)  # some kept: the length stays
    assert drafting.next() == 8
    assert DraftLength(0).next() == 0


@pytest.mark.parametrize("lookahead", [1, 4, 16])
def test_prompt_lookup_gives_the_greedy_tokens_in_fewer_passes(model, lookahead):
    # A prompt that repeats itself, right-padded rows of different lengths, past the context of 32 (the
    # window's re-prefill), and an end-of-text that ends rows at different steps.
    rows = [torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 2), prompts(batch=1, length=5, seed=3)[0]]
    padded = torch.zeros((2, 16), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    lengths = torch.tensor([len(row) for row in rows])
    for eos_id in (None, int(generate(model, padded, 30, lengths=lengths)[1, 16 + 20])):
        plain = generate(model, padded, 30, lengths=lengths, eos_id=eos_id)
        passes = count_passes(model)
        drafted = generate(model, padded, 30, lengths=lengths, eos_id=eos_id, lookahead=lookahead)
        assert torch.equal(drafted, plain)
    alone = rows[0].unsqueeze(0)
    plain = generate(model, alone, 16)  # 16 + 16 tokens: the context, no re-prefill
    passes.clear()
    assert torch.equal(generate(model, alone, 16, lookahead=lookahead), plain)
    # The prompt's prefill gives the first token, a pass at a time the others: drafts kept saved passes.
    assert passes[0] == 16 and 1 < max(passes[1:]) <= 1 + lookahead, passes
    assert len(passes) < 16, passes


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a PyTorch built with oneDNN")
def test_few_rows_through_onednn_give_the_same_greedy_tokens(model):
    """Batches of 4-15 rows decode through oneDNN, as do prompt lookup's checking passes: the same tokens."""
    rows = [prompts(batch=1, length=n, seed=n)[0] for n in (3, 9, 6, 4, 8, 5, 7, 9)]
    padded = torch.zeros((8, 9), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    lengths = torch.tensor([len(row) for row in rows])
    repeating = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 2])
    plain = [generate(model, padded, 30, lengths=lengths), generate(model, repeating, 16, lookahead=8)]
    fast = through_onednn(model)
    assert torch.equal(generate(fast, padded, 30, lengths=lengths), plain[0])
    assert torch.equal(generate(fast, repeating, 16, lookahead=8), plain[1])


def test_lengths_must_fit_the_prompts(model):
    with pytest.raises(GenerationError, match="lengths must hold one count in 1..7 per row"):
        generate(model, prompts(), 3, lengths=torch.tensor([7, 8]))


def test_stream_yields_the_generated_tokens_one_by_one(model):
    idx = prompts(batch=1)
    steps = list(stream(model, idx, 8))
    assert len(steps) == 8 and all(step.shape == (1, 1) for step in steps)
    assert torch.equal(torch.cat([idx, *steps], dim=1), generate(model, idx, 8))


def test_generation_keeps_the_models_mode_and_ignores_dropout(model):
    model.train()
    try:
        idx = prompts(batch=1)
        first, second = generate(model, idx, 10), generate(model, idx, 10)
        assert torch.equal(first, second)
        assert model.training
    finally:
        model.eval()


def test_end_of_text_stops_each_row_and_pads_finished_ones(model):
    idx = prompts(batch=2, seed=3)
    free = generate(model, idx, 12)[:, 7:]
    eos = int(free[0, 2])
    stopped = generate(model, idx, 12, eos_id=eos)[:, 7:]
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) if len(hits) else 12
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert bool((stopped[row, end:] == eos).all())
    single = generate(model, idx[:1], 12, eos_id=eos)
    assert single.shape[1] == 7 + int((free[0] == eos).nonzero()[0])  # a lone row: eos itself is not kept


def test_seeded_sampling_is_reproducible_and_does_not_touch_the_global_rng(model):
    idx = prompts(batch=1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = generate(model, idx, 20, temperature=1.5, seed=42)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, generate(model, idx, 20, temperature=1.5, seed=42))
    assert torch.equal(a, generate(model, idx, 20, temperature=1.5, seed=42, use_cache=False))
    assert not torch.equal(a, generate(model, idx, 20, temperature=1.5, seed=43))


def test_top_k_one_and_a_tiny_top_p_are_greedy(model):
    idx = prompts(batch=2)
    greedy = generate(model, idx, 15)
    assert torch.equal(generate(model, idx, 15, temperature=2.0, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, idx, 15, temperature=2.0, top_p=1e-6, seed=0), greedy)


def test_top_k_and_top_p_restrict_the_sampled_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(400, 4)
    generator = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=generator).flatten()
    assert set(top2.tolist()) == {1, 3}
    # 0.5 + 0.3 reaches 0.8: tokens 1 and 3 form the nucleus; at 0.81 token 2 joins.
    nucleus = sample_next(logits, temperature=1.0, top_p=0.8, generator=generator).flatten()
    assert set(nucleus.tolist()) == {1, 3}
    wider = sample_next(logits, temperature=1.0, top_p=0.81, generator=generator).flatten()
    assert set(wider.tolist()) == {1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"context_size": 0}, "context_size must be positive"),
        ({"lookahead": -1}, "lookahead must be >= 0"),
        ({"lookahead": 4, "temperature": 0.7}, "use temperature 0"),
        ({"lookahead": 4, "use_cache": False}, "use_cache=True"),
    ],
)
def test_bad_arguments_are_errors_before_generating(model, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        stream(model, prompts(), 5, **kwargs)


def test_prompt_must_be_a_batch_of_token_ids(model):
    with pytest.raises(GenerationError, match=r"\(batch, tokens\) LongTensor"):
        generate(model, torch.tensor([1, 2, 3]), 5)
    with pytest.raises(GenerationError, match="has no KV cache"):
        generate(torch.nn.Identity(), prompts(), 5, context_size=8)


# ---------------------------------------------------------------------------------------------------------
# groundup generate
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def gpt2_checkpoint(tmp_path, gpt2_vocab_dir):
    torch.manual_seed(0)
    gpt = init_weights(GPTModel(config_from_preset("gpt-tiny")))
    return save_checkpoint(gpt, tmp_path / "ckpt", metadata={"tokenizer": "gpt2"}), gpt


def expected_text(gpt: GPTModel, prompt: str, new_tokens: int) -> str:
    from groundup.text.tokenizers import get_tokenizer, text_to_token_ids, token_ids_to_text

    tokenizer = get_tokenizer("gpt2")
    ids = generate(gpt.eval(), text_to_token_ids(prompt, tokenizer), new_tokens, eos_id=tokenizer.eot_token)
    return token_ids_to_text(ids, tokenizer)


@pytest.mark.parametrize("flags", [[], ["--no-kv-cache"], ["--no-stream"], ["--lookahead", "4"]])
def test_cli_generates_from_a_checkpoint_directory(gpt2_checkpoint, capsys, flags):
    from groundup.cli import main

    directory, gpt = gpt2_checkpoint
    assert main(["generate", str(directory), "Every effort moves you", "--max-new-tokens", "12", *flags]) == 0
    assert capsys.readouterr().out == expected_text(gpt, "Every effort moves you", 12) + "\n"


def test_cli_generates_from_a_registered_model(gpt2_checkpoint, mlflow_tracking, monkeypatch, capsys):
    from groundup import tracking
    from groundup.cli import main

    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_API_URL"):
        monkeypatch.delenv(key, raising=False)  # restored after the test: the CLI prepares its environment
    directory, gpt = gpt2_checkpoint
    with tracking.start_run("register", output_dir=mlflow_tracking) as run:
        run.register_directory(directory, "tiny-gpt")
    assert main(["generate", "tiny-gpt/1", "Hello", "--max-new-tokens", "6", "--output-dir", str(mlflow_tracking)]) == 0
    assert capsys.readouterr().out == expected_text(gpt, "Hello", 6) + "\n"


def test_cli_names_a_model_it_cannot_find(tmp_path, mlflow_tracking, monkeypatch, capsys):
    from groundup.cli import main

    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_API_URL"):
        monkeypatch.delenv(key, raising=False)
    assert main(["generate", "no-such-model", "Hi", "--output-dir", str(mlflow_tracking)]) == 1
    assert "'no-such-model' is neither a checkpoint directory nor a registered model" in capsys.readouterr().err


def test_cli_stops_after_two_blank_lines_in_a_row(tmp_path, gpt2_vocab_dir, capsys):
    from groundup.cli import main

    # A model whose every next token is "\n" (GPT-2 id 198): the final norm outputs ones, the head scores one row.
    gpt = GPTModel(config_from_preset("gpt-tiny"))
    with torch.no_grad():
        gpt.final_norm.weight.zero_()
        gpt.final_norm.bias.fill_(1.0)
        gpt.out_head.weight.zero_()
        gpt.out_head.weight[198] = 1.0
    directory = save_checkpoint(gpt, tmp_path / "newlines", metadata={"tokenizer": "gpt2"})
    for flags in ([], ["--no-stream"]):
        assert main(["generate", str(directory), "Every effort moves you", "--max-new-tokens", "40", *flags]) == 0
        assert capsys.readouterr().out == "Every effort moves you\n\n\n"
