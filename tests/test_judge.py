"""The judge: score parsing, statistics, the workshop prompt, and both backends for real (a tiny LitGPT model
through litgpt, and an OpenAI-compatible server on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from groundup.errors import DeviceError
from groundup.instruct import judge
from groundup.instruct.resumable import LogMismatchError, read_jsonl
from tests.chat_server import ChatServer

ENTRIES = [
    {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
        "base_model": "The car is fast.",
        "finetuned_model": "The car is as fast as a cheetah.",
    },
    {
        "instruction": "What is the atomic number of helium?",
        "input": "",
        "output": "The atomic number of helium is 2.",
        "base_model": "It is 3.",
        "finetuned_model": "The atomic number of helium is 2.",
    },
    {
        "instruction": "Name an antonym of 'complicated'.",
        "input": "",
        "output": "Simple.",
        "base_model": "Complex.",
        "finetuned_model": "Simple.",
    },
    {
        "instruction": "Translate 'thank you' into German.",
        "input": "",
        "output": "Danke.",
        "base_model": "Merci.",
        "finetuned_model": "Danke schön.",
    },
]


@pytest.fixture
def responses_file(tmp_path: Path) -> Path:
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in ENTRIES), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Parsing and statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score", "problem"),
    [
        ("85", 85, None),
        ("Score: 85/100", 85, None),
        ("I'd give it 85.", 85, None),
        ("eighty", None, "no number"),
        ("150", None, "out of range: 150"),
        ("", None, "empty reply"),
        ("-3", None, "negative: -3"),
        ("85.5", None, "not an integer: 85.5"),
        # further awkward ones
        ("  100\n", 100, None),
        ("0", 0, None),
        ("101", None, "out of range: 101"),
        ("85%", 85, None),
        ("Model v2 deserves 70", 70, None),  # "2" is glued to a word: not a number
        ("<|eot_id|>", None, "no number"),
        (None, None, "empty reply"),
        ("150, no wait, 85", None, "out of range: 150"),  # only the first number counts
    ],
)
def test_parse_score(reply, score, problem):
    parsed = judge.parse_score(reply)
    assert parsed.score == score
    assert parsed.problem == problem
    assert parsed.parsed is (score is not None)


def test_describe_scores_reports_unparsed_beside_the_statistics():
    stats = judge.describe_scores([50, None, 70, 90, None])
    assert stats["count"] == 5 and stats["parsed"] == 3 and stats["unparsed"] == 2
    assert stats["unparsed_share"] == pytest.approx(0.4)
    assert stats["mean"] == pytest.approx(70.0)
    assert stats["median"] == pytest.approx(70.0)
    assert stats["std"] == pytest.approx(20.0)  # sample standard deviation (ddof=1)

    nothing = judge.describe_scores([None, None])
    assert nothing["unparsed"] == 2 and nothing["mean"] is None and nothing["std"] is None


def test_paired_difference_uses_entries_where_both_parsed():
    base = [50, 60, None, 70, 40]
    finetuned = [60, 80, 90, None, 40]
    result = judge.paired_difference(base, finetuned, samples=2000, seed=1)
    assert result["pairs"] == 3  # entries 0, 1 and 4
    assert result["mean"] == pytest.approx((10 + 20 + 0) / 3)
    assert 0 <= result["ci_low"] <= result["mean"] <= result["ci_high"] <= 20
    assert judge.paired_difference(base, finetuned, samples=2000, seed=1) == result  # seeded

    single = judge.paired_difference([50], [70])
    assert single == {"pairs": 1, "mean": 20.0, "ci_low": None, "ci_high": None}
    with pytest.raises(ValueError, match="equal lengths"):
        judge.paired_difference([1, 2], [1])


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    base = rng.integers(20, 60, size=400)
    finetuned = np.clip(base + rng.normal(8, 10, size=400).round(), 0, 100).astype(int)
    diffs = finetuned - base
    result = judge.paired_difference(base.tolist(), finetuned.tolist(), samples=5000, seed=3)
    half_width = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert result["ci_low"] == pytest.approx(diffs.mean() - half_width, abs=0.25 * half_width)
    assert result["ci_high"] == pytest.approx(diffs.mean() + half_width, abs=0.25 * half_width)


def test_judge_prompt_is_the_workshops():
    prompt = judge.judge_prompt(ENTRIES[0], "The car is fast.")
    assert prompt == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model "
        "response `The car is fast.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )
    assert "### Input" not in judge.judge_prompt(ENTRIES[1], "x")


# ---------------------------------------------------------------------------------------------------------
# The litgpt backend, for real, on a tiny model
# ---------------------------------------------------------------------------------------------------------


def test_litgpt_judge_on_a_tiny_model_counts_unparsed_replies(tiny_litgpt_dir, responses_file, tmp_path):
    tiny = judge.LitGPTJudge(
        str(tiny_litgpt_dir), max_new_tokens=6, chat_template="llama3", accelerator="cpu"
    )
    chat = tiny.chat_prompt("PROMPT")
    assert chat.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "<|start_header_id|>user<|end_header_id|>\n\nPROMPT<|eot_id|>" in chat
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")

    result = judge.judge_responses(responses_file, tmp_path / "judge", tiny, bootstrap_samples=200)
    table = pd.read_parquet(result.scores)
    assert len(table) == len(ENTRIES)
    for key in judge.MODEL_KEYS:
        replies = table[f"{key}_reply"].tolist()
        # the raw reply of every entry is kept, and its parse is what the table says
        assert [judge.parse_score(r).score for r in replies] == [
            None if pd.isna(s) else int(s) for s in table[f"{key}_score"]
        ]
        unparsed = sum(judge.parse_score(r).score is None for r in replies)
        assert result.summary[key]["count"] == len(ENTRIES)
        assert result.summary[key]["unparsed"] == unparsed
        assert table[f"{key}_problem"].notna().sum() == unparsed
    assert len(read_jsonl(result.judgments)) == len(ENTRIES) + 1  # header + one record per entry
    assert result.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # greedy decoding: the same judge gives the same replies
    again = [tiny.reply(judge.judge_prompt(e, e["base_model"])) for e in ENTRIES[:2]]
    assert again == table["base_model_reply"].tolist()[:2]


def test_quantized_litgpt_judge_needs_cuda(tiny_litgpt_dir):
    from groundup.config import JudgeConfig

    settings = JudgeConfig(model=str(tiny_litgpt_dir), quantize="bnb.nf4", accelerator="cpu")
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        judge.make_judge(settings)


# ---------------------------------------------------------------------------------------------------------
# The openai-compatible backend against a real server on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------

CANNED = {  # judge replies by the response being scored
    "The car is fast.": "Score: 40/100",
    "The car is as fast as a cheetah.": "85",
    "It is 3.": "I'd give it 10.",
    "The atomic number of helium is 2.": "100",
    "Complex.": "eighty",  # unparsed
    "Simple.": "95",
    "Merci.": "20",
    "Danke schön.": "85.5",  # unparsed
}


def canned_reply(messages):
    prompt = messages[-1]["content"]
    response = prompt.split("score the model response `", 1)[1].split("` on a scale", 1)[0]
    return CANNED[response]


def http_judge(server: ChatServer, **kwargs) -> judge.OpenAICompatibleJudge:
    return judge.OpenAICompatibleJudge(
        server.base_url, server.model, max_new_tokens=8, backoff_s=0.01, **kwargs
    )


def test_openai_compatible_judge_scores_through_a_local_server(responses_file, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    with ChatServer(canned_reply, model="llama3", api_key="sk-secret-123") as server:
        server.fail(503)  # the first request fails: the client must retry
        client = http_judge(server, api_key_env="JUDGE_TEST_KEY")
        result = judge.judge_responses(responses_file, tmp_path / "judge", client, bootstrap_samples=500)

    bodies = [body for body, _ in server.requests]
    assert len(bodies) == 2 * len(ENTRIES) + 1
    assert all(auth == "Bearer sk-secret-123" for _, auth in server.requests)
    assert (
        bodies[-1]["model"] == "llama3" and bodies[-1]["max_tokens"] == 8 and bodies[-1]["temperature"] == 0.0
    )
    assert bodies[-1]["messages"][0]["role"] == "user"
    assert bodies[-1]["messages"][0]["content"].startswith("Given the input `Below is an instruction")

    table = pd.read_parquet(result.scores)
    assert table["base_model_score"].tolist()[:2] == [40, 10]
    assert table["base_model_score"].isna().tolist() == [False, False, True, False]
    assert table["finetuned_model_score"].isna().tolist() == [False, False, False, True]
    assert table.loc[2, "base_model_reply"] == "eighty" and table.loc[2, "base_model_problem"] == "no number"

    s = result.summary
    assert (s["base_model"]["unparsed"], s["finetuned_model"]["unparsed"]) == (1, 1)
    assert s["base_model"]["mean"] == pytest.approx((40 + 10 + 20) / 3)
    assert s["finetuned_model"]["mean"] == pytest.approx((85 + 100 + 95) / 3)
    assert s["difference"]["pairs"] == 2  # entries 0 and 1
    assert s["difference"]["mean"] == pytest.approx(((85 - 40) + (100 - 10)) / 2)
    metrics = judge.summary_metrics(s)
    assert metrics["judge.finetuned_model.unparsed"] == 1.0 and "judge.difference.ci_low" in metrics

    # the API key is sent, never stored
    for path in (result.scores, result.judgments):
        assert b"sk-secret-123" not in path.read_bytes()
    assert "sk-secret-123" not in client.judge_id + json.dumps(client.settings)


def test_openai_compatible_judge_reports_what_went_wrong(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    with ChatServer(lambda m: "50", api_key="sk-secret-123") as server:
        server.fail(503, times=5)
        with pytest.raises(judge.JudgeError, match=r"no reply after 3 attempts \(HTTP 503\)"):
            http_judge(server, api_key_env="JUDGE_TEST_KEY", retries=2).reply("x")
        with pytest.raises(judge.JudgeError, match="HTTP 401") as excinfo:
            http_judge(server, api_key_env="NO_SUCH_VARIABLE_SET").reply("x")
        assert "sk-secret-123" not in str(excinfo.value)
        url = server.base_url
    with pytest.raises(judge.JudgeError, match="ConnectionError"):
        judge.OpenAICompatibleJudge(url, "judge", max_new_tokens=4, retries=1, backoff_s=0.01).reply("x")
    from groundup.config import JudgeConfig

    with pytest.raises(judge.JudgeError, match="needs judge.base_url"):
        judge.make_judge(JudgeConfig(backend="openai-compatible", model="llama3"))


def test_judging_resumes_after_an_interruption(responses_file, tmp_path):
    with ChatServer(canned_reply) as server:
        client = http_judge(server)

        def interrupt_after_two(done, total):
            if done == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            judge.judge_responses(responses_file, tmp_path / "judge", client, on_progress=interrupt_after_two)
        assert len(server.requests) == 4  # two entries, two responses each
        result = judge.judge_responses(responses_file, tmp_path / "judge", client)
        assert len(server.requests) == 2 * len(ENTRIES)  # only the remaining entries were judged
        assert pd.read_parquet(result.scores)["index"].tolist() == [0, 1, 2, 3]

        other = judge.OpenAICompatibleJudge(server.base_url, server.model, max_new_tokens=9)
        with pytest.raises(LogMismatchError, match="max_tokens"):
            judge.judge_responses(responses_file, tmp_path / "judge", other)


def test_a_tiny_litgpt_model_served_over_http_is_a_judge(tiny_litgpt_dir, responses_file, tmp_path):
    from groundup.instruct.inference import LitGPTModel, Sampling

    model = LitGPTModel(tiny_litgpt_dir, accelerator="cpu")
    served = ChatServer(lambda m: model.complete([m[-1]["content"]], Sampling(max_new_tokens=5))[0])
    with served:
        result = judge.judge_responses(responses_file, tmp_path / "judge", http_judge(served))
    table = pd.read_parquet(result.scores)
    assert table["finetuned_model_reply"].tolist() == [
        model.complete([judge.judge_prompt(e, e["finetuned_model"])], Sampling(max_new_tokens=5))[0].strip()
        for e in ENTRIES
    ]
    assert result.summary["base_model"]["count"] == len(ENTRIES)


def test_responses_file_without_responses_is_rejected(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n", encoding="utf-8")
    with ChatServer(canned_reply) as server, pytest.raises(ValueError, match="groundup respond"):
        judge.judge_responses(path, tmp_path / "judge", http_judge(server))
