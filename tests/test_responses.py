"""Test-set responses: both backends for real (tiny LitGPT checkpoint, tiny groundup GPT + LoRA adapter),
checked against each library's own generation, batching, resume after an interruption, cache hits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from groundup.config import GenerationConfig
from groundup.instruct import responses
from groundup.instruct.inference import GroundupModel, ModelLoadError, length_buckets, similar_length_batches
from groundup.instruct.prompts import format_prompt
from groundup.instruct.resumable import read_jsonl
from tests.eval_fixtures import save_tiny_adapter, save_tiny_gpt

ENTRIES = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a planet.", "input": "", "output": "Mars."},
    {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
    },
    {"instruction": "Name a flower.", "input": "", "output": "A rose."},
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome."},
]


@pytest.fixture(scope="module")
def test_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "test.json"
    path.write_text(json.dumps(ENTRIES), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory, gpt2_vocab_dir) -> Path:
    return save_tiny_gpt(tmp_path_factory.mktemp("gpt") / "base")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_gpt, tmp_path_factory) -> Path:
    return save_tiny_adapter(tiny_gpt, tmp_path_factory.mktemp("gpt") / "adapter")


def settings(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 6, "accelerator": "cpu", "batch_size": 4, **overrides})


@pytest.mark.parametrize(
    ("text", "style", "expected"),
    [
        ("  The car is as fast as a cheetah.\n", "alpaca", "The car is as fast as a cheetah."),
        ("### Response:\nBlue.", "alpaca", "Blue."),
        ("Blue.\n\n### Instruction:\nName a planet.", "alpaca", "Blue."),
        ("PROMPT\n\n### Response:\nBlue.", "alpaca", "Blue."),  # the prompt echoed back
        ("Rome.<|end|>\n<|user|>\nNext", "phi-3", "Rome."),
        ("<|assistant|>\nRome.", "phi-3", "Rome."),
        ("### Response:\n", "alpaca", ""),
        # Alpaca-style output that goes on with another section (seen with SmolLM2 under Alpaca prompts)
        ("The three forms of water are:\n1. Ice\n\n### Explanation:\nThe three", "alpaca", "The three forms of water are:\n1. Ice"),
        ("Paris.<|im_end|>\n<|im_start|>user", "chat", "Paris."),
        ("### Step 1\nBoil water.", "chat", "### Step 1\nBoil water."),  # a chat answer's own Markdown stays
    ],
)
def test_clean_response(text, style, expected):
    assert responses.clean_response(text, "PROMPT", style) == expected


def test_length_buckets_group_equal_lengths_in_order():
    assert length_buckets([3, 5, 3, 3, 5, 7], batch_size=2) == [[0, 2], [1, 4], [3], [5]]
    assert length_buckets([], batch_size=4) == []


def test_similar_length_batches_sort_by_length_then_cut():
    assert similar_length_batches([3, 5, 3, 9, 5, 7], batch_size=4) == [[0, 2, 1, 4], [5, 3]]
    assert similar_length_batches([], batch_size=4) == []


def test_responses_of_both_backends_match_their_own_generation(
    test_data, tiny_gpt, tiny_litgpt_dir, tmp_path
):
    result = responses.generate_responses(
        test_data, tiny_gpt, tiny_litgpt_dir, tmp_path, settings(prompt_style="alpaca")
    )
    records = read_jsonl(result.path)
    assert not result.cached and len(records) == len(ENTRIES)
    prompts = [format_prompt(e, "alpaca") for e in ENTRIES]
    first = records[0]
    assert {k: first[k] for k in ("instruction", "input", "output")} == ENTRIES[0]
    assert first["base_model_id"] == str(tiny_gpt.resolve())
    assert first["finetuned_model_id"] == str(tiny_litgpt_dir.resolve())
    assert len(first["base_model_sha256"]) == 64
    assert first["generation"] == {
        "prompt_style": "alpaca",
        "max_new_tokens": 6,
        "temperature": 0.0,
        "top_k": None,
        "top_p": None,
        "seed": 123,
    }

    # our GPT: the plain generate() loop on each prompt's token ids gives the stored responses
    from groundup.model.generate import generate
    from groundup.model.loading import load_model
    from groundup.text.tokenizers import get_tokenizer

    model, tokenizer = load_model(tiny_gpt), get_tokenizer("gpt2")
    for record, prompt in zip(records, prompts, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt)])
        new = generate(model, ids, 6, eos_id=tokenizer.eot_token)[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.eot_token)] if tokenizer.eot_token in new else new
        assert record["base_model"] == responses.clean_response(tokenizer.decode(new), prompt)
    # our GPT batches padded prompts: a batch really held prompts of different lengths
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    assert any(len({lengths[i] for i in batch}) > 1 for batch in similar_length_batches(lengths, 4))

    # LitGPT: LLM.generate on the formatted prompt (not the dict) gives the stored responses
    from litgpt import LLM
    from litgpt.prompts import Default

    llm = LLM.load(str(tiny_litgpt_dir), distribute=None)
    llm.distribute(accelerator="cpu", precision="32-true")
    llm.prompt_style = Default()
    for record, prompt in zip(records, prompts, strict=True):
        text = llm.generate(prompt, max_new_tokens=6, temperature=0.0)
        assert record["finetuned_model"] == responses.clean_response(text, prompt)

    # batch size does not change greedy answers
    one_by_one = responses.generate_responses(
        test_data, tiny_gpt, tiny_litgpt_dir, tmp_path / "b1", settings(batch_size=1, prompt_style="alpaca")
    )
    assert [r["base_model"] for r in read_jsonl(one_by_one.path)] == [r["base_model"] for r in records]


def test_each_model_answers_in_its_own_prompt_style(tiny_gpt, tiny_adapter, tiny_litgpt_dir, tmp_path):
    from litgpt.prompts import save_prompt_style

    from groundup.instruct import litgpt_prompts

    entry = ENTRIES[2]
    # our GPT-2 and an adapter on it: Alpaca, as finetuned
    for model in (tiny_gpt, tiny_adapter):
        style = litgpt_prompts.model_prompt_style(model)
        assert litgpt_prompts.format_entry(style, entry) == format_prompt(entry, "alpaca")
    # a LitGPT checkpoint: its recorded style (what finetuning wrote), else the template LitGPT knows by name
    finetuned = tmp_path / "finetuned"
    finetuned.mkdir()
    (finetuned / "model_config.yaml").write_text((tiny_litgpt_dir / "model_config.yaml").read_text())
    save_prompt_style(litgpt_prompts.Phi3(), finetuned)
    assert isinstance(litgpt_prompts.model_prompt_style(finetuned), litgpt_prompts.Phi3)
    chat = litgpt_prompts.model_prompt_style("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert litgpt_prompts.format_entry(chat, entry).endswith(
        "<|im_start|>user\nRewrite the sentence using a simile.\n\nThe car is very fast.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert litgpt_prompts.answer_format(chat) == "chat"
    # a setting other than auto: that style for every model
    assert isinstance(litgpt_prompts.model_prompt_style(finetuned, "alpaca"), litgpt_prompts.Alpaca)


def test_interrupted_run_resumes_where_it_stopped(test_data, tiny_gpt, tiny_adapter, tmp_path, monkeypatch):
    reference = responses.generate_responses(test_data, tiny_gpt, tiny_adapter, tmp_path / "ref", settings())

    def interrupt(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        responses.generate_responses(
            test_data, tiny_gpt, tiny_adapter, tmp_path / "run", settings(), on_progress=interrupt
        )
    assert not (tmp_path / "run" / reference.path.name).exists()  # nothing half-written in the final file
    partial = tmp_path / "run" / f"{reference.path.stem}.base_model.partial.jsonl"
    done_before = len(read_jsonl(partial)) - 1
    assert 3 <= done_before < len(ENTRIES)
    with open(partial, "a", encoding="utf-8") as fh:
        fh.write('{"index": 4, "respo')  # killed in the middle of a line

    reports = []
    resumed = responses.generate_responses(
        test_data,
        tiny_gpt,
        tiny_adapter,
        tmp_path / "run",
        settings(),
        on_progress=lambda d, t: reports.append(d),
    )
    assert reports[0] == done_before  # the first report counts what was already there
    assert reports[-1] == 2 * len(ENTRIES)
    assert resumed.path.read_text() == reference.path.read_text()
    assert not partial.exists()
    # the adapter really changes the model
    records = read_jsonl(resumed.path)
    assert [r["base_model"] for r in records] != [r["finetuned_model"] for r in records]

    # a finished file is a cache hit: no model is loaded, nothing is rewritten
    def no_loading(*args, **kwargs):
        raise AssertionError("a cached run must not load a model")

    monkeypatch.setattr(responses, "load_causal_lm", no_loading)
    mtime = resumed.path.stat().st_mtime_ns
    again = responses.generate_responses(test_data, tiny_gpt, tiny_adapter, tmp_path / "run", settings())
    assert again.cached and again.path == resumed.path and resumed.path.stat().st_mtime_ns == mtime
    # other settings are not a cache hit of this file
    with pytest.raises(AssertionError, match="must not load"):
        responses.generate_responses(
            test_data, tiny_gpt, tiny_adapter, tmp_path / "run", settings(max_new_tokens=3)
        )


@pytest.mark.slow  # compiles a graph with inductor (a C++ compiler), ~1 min on a loaded 2-core CPU
def test_compiled_decoding_gives_the_same_responses(test_data, tiny_gpt, tiny_adapter, tmp_path):
    eager = responses.generate_responses(test_data, tiny_gpt, tiny_adapter, tmp_path / "eager", settings())
    compiled = responses.generate_responses(test_data, tiny_gpt, tiny_adapter, tmp_path / "compiled", settings(compile=True))
    assert read_jsonl(compiled.path) == read_jsonl(eager.path)


def test_prompt_lookup_gives_the_same_responses(test_data, tiny_gpt, tiny_adapter, tmp_path, monkeypatch):
    from groundup.model import generate

    plain = responses.generate_responses(
        test_data, tiny_gpt, tiny_adapter, tmp_path / "plain", settings(max_new_tokens=24)
    )
    looked_up = []  # the setting reached the decoding loop, which looked for drafts
    lookup = generate.lookup_drafts
    monkeypatch.setattr(generate, "lookup_drafts", lambda *args: looked_up.append(1) or lookup(*args))
    drafted = responses.generate_responses(
        test_data, tiny_gpt, tiny_adapter, tmp_path / "drafted", settings(max_new_tokens=24, lookahead=6)
    )
    assert read_jsonl(drafted.path) == read_jsonl(plain.path)
    assert looked_up
    with pytest.raises(ValueError, match="set generation.temperature=0, or generation.lookahead=0"):
        settings(lookahead=6, temperature=0.7)


def test_sampling_is_seeded(test_data, tiny_gpt, tmp_path):
    sampled = settings(temperature=1.0, top_k=50, seed=7, limit=3)
    first = responses.generate_responses(test_data, tiny_gpt, tiny_gpt, tmp_path / "a", sampled)
    second = responses.generate_responses(test_data, tiny_gpt, tiny_gpt, tmp_path / "b", sampled)
    assert first.path.read_text() == second.path.read_text()
    greedy = responses.generate_responses(test_data, tiny_gpt, tiny_gpt, tmp_path / "c", settings(limit=3))
    assert [r["base_model"] for r in read_jsonl(first.path)] != [
        r["base_model"] for r in read_jsonl(greedy.path)
    ]


def test_bad_model_references_fail_before_anything_is_written(test_data, tiny_gpt, tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        responses.generate_responses(test_data, tiny_gpt, tmp_path / "missing", tmp_path / "out", settings())
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a LitGPT checkpoint"):
        responses.generate_responses(test_data, junk, tiny_gpt, tmp_path / "out", settings())
    assert not (tmp_path / "out").exists()


def test_groundup_model_slides_past_its_context_window(tiny_gpt):
    """Prompts longer than the window (128 tokens here) still get answers (the window slides)."""
    model = GroundupModel(tiny_gpt, accelerator="cpu")
    from groundup.instruct.inference import Sampling

    long_prompt = "word " * 200
    assert len(model.encode(long_prompt)) > model.context_length
    assert len(model.encode(model.complete([long_prompt], Sampling(max_new_tokens=5))[0])) <= 5
