"""The judge: score parsing, statistics, the workshop prompt, and both backends for real (a tiny LitGPT model
through litgpt, and an OpenAI-compatible server on 127.0.0.1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from groundup.errors import DeviceError
from groundup.instruct import judge
from groundup.instruct.resumable import LogMismatchError, read_jsonl
from tests.chat_server import ChatServer, Scripted

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
        ("150, no wait, 85", 85, None),  # the only score in range
        # read as a person would: the final or labelled score, never the first incidental number
        ("I'd rate this 4/5... final score 80", 80, None),
        ("Comparing 3 items, I give 65", 65, None),
        ("Score: 70. On reflection, final score: 75", 75, None),
        ("The answer lists 3 facts; score 40", 40, None),
        ("I rate it 90 out of 100.", 90, None),
        ('{"score": 72}', 72, None),  # what a JSON-schema-forced server sends
        ('{"score": 140}', None, "out of range: 140"),
        ("It could be 60 or 70", None, "ambiguous: 60, 70"),  # truly ambiguous: no guess
        ("7 out of 10", None, "no number"),  # another scale
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
        str(tiny_litgpt_dir), max_new_tokens=6, chat_template="llama3", accelerator="cpu", scoring="free"
    )
    chat = tiny.chat_prompt("PROMPT")
    assert chat.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "<|start_header_id|>user<|end_header_id|>\n\nPROMPT<|eot_id|>" in chat
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")

    result = judge.judge_responses(
        responses_file, tmp_path / "judge", tiny, controls=0, bootstrap_samples=200
    )
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
    again = [tiny.reply(judge.judge_prompt(e, e["base_model"])).text for e in ENTRIES[:2]]
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


OUTPUTS = {entry["output"] for entry in ENTRIES}


def canned_reply(messages):
    """A judge that knows right from wrong: a reference answer scores 95, another entry's reference 5."""
    prompt = messages[-1]["content"]
    response = prompt.split("score the model response `", 1)[1].split("` on a scale", 1)[0]
    correct = prompt.split("correct output `", 1)[1].split("`, score the model", 1)[0]
    if response == correct:
        return CANNED.get(response, "95")
    return CANNED[response] if response not in OUTPUTS else "Score: 5"


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
    assert len(bodies) == 4 * len(ENTRIES) + 1  # both responses and both controls of every entry
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
    # the controls: each entry's reference and the next entry's reference
    assert table["mismatched_answer"].tolist() == [ENTRIES[(i + 1) % 4]["output"] for i in range(4)]
    assert table["reference_answer_score"].tolist() == [95, 100, 95, 95]
    assert table["mismatched_answer_score"].tolist() == [5, 5, 5, 5]
    assert s["control"]["auc"] == 1.0 and s["control"]["trusted"] and s["control"]["entries"] == 4
    assert metrics["judge.control.auc"] == 1.0 and metrics["judge.mismatched_answer.mean"] == 5.0
    assert judge.control_verdict(s).startswith("The judge tells right from wrong: control AUC 1.00")

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


AWKWARD = {  # replies that are clear to a person but not to a first-number rule
    "The car is fast.": "I'd rate this 4/5... final score 80",
    "The car is as fast as a cheetah.": "Comparing 3 items, I give 65",
}


def test_format_forcing_fields_are_sent_and_a_refusing_server_gets_plain_requests(responses_file, tmp_path):
    def forced(messages):  # a server that honours the JSON schema: {"score": n}
        return json.dumps({"score": judge.parse_score(canned_reply(messages)).score})

    with ChatServer(forced, model="m") as server:
        client = http_judge(server)
        assert client.reply(judge.judge_prompt(ENTRIES[2], "Simple.")).text == '{"score": 95}'
        assert judge.parse_score(client.reply(judge.judge_prompt(ENTRIES[1], "It is 3.")).text).score == 10
        body = server.requests[-1][0]
        assert body["response_format"]["type"] == "json_schema"
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["score"] == {"type": "integer", "minimum": 0, "maximum": 100}
        assert schema["required"] == ["score"]

    with ChatServer(canned_reply, model="m") as server:  # vLLM's guided decoding by regex
        http_judge(server, force_format="guided_regex").reply(judge.judge_prompt(ENTRIES[1], "It is 3."))
        assert server.requests[-1][0]["guided_regex"] == judge.SCORE_REGEX

    # an older server refuses the field: one refused request, then plain ones, replies parsed as a person would
    replies = {**CANNED, **AWKWARD}
    awkward = ChatServer(
        lambda m: replies[m[-1]["content"].split("response `", 1)[1].split("` on a scale", 1)[0]],
        model="m",
        refuse=("response_format",),
    )
    with awkward:
        client = http_judge(awkward)
        result = judge.judge_responses(responses_file, tmp_path / "judge", client, controls=0)
    statuses = ["response_format" in body for body, _ in awkward.requests]
    assert statuses == [True] + [False] * (2 * len(ENTRIES))
    table = pd.read_parquet(result.scores)
    assert table.loc[0, "base_model_score"] == 80 and table.loc[0, "finetuned_model_score"] == 65
    assert result.summary["base_model"]["unparsed"] == 1  # "eighty" stays unparsed and counted


def scripted(pieces: list[str], alternatives: dict[str, float]) -> Scripted:
    """A reply written as ``pieces``, one token each; the pieces named in ``alternatives`` had those (token:
    probability, most probable first), the others were near certain."""
    logprobs = []
    for piece in pieces:
        top = alternatives if piece in alternatives else {piece: 0.99}
        listed = [{"token": token, "logprob": math.log(p)} for token, p in top.items()]
        logprobs.append({"token": piece, "logprob": math.log(top[piece]), "top_logprobs": listed})
    return Scripted("".join(pieces), logprobs)


WITH_LOGPROBS = {  # replies by the response being scored; without logprobs where plain text
    # the score first, its alternatives numbers but one, and a fourth cut by top_logprobs=3
    "The car is fast.": scripted(["40"], {"40": 0.5, "30": 0.3, " 50": 0.1, "100": 0.05}),
    # a JSON-schema-forced reply: the alternatives where the score is written
    "The car is as fast as a cheetah.": scripted(
        ['{"', "score", '":', " ", "85", "}"], {"85": 0.6, "90": 0.2, "Great": 0.1}
    ),
    "It is 3.": scripted(["I", " give", " ", "10"], {"10": 0.9}),  # not a score first: the text is read
    "Danke schön.": scripted(["8", "5"], {"8": 0.7, "9": 0.2}),  # split over two tokens: the text is read
}


def logprob_reply(messages):
    response = messages[-1]["content"].split("response `", 1)[1].split("` on a scale", 1)[0]
    return WITH_LOGPROBS.get(response) or CANNED[response]


def test_scores_from_a_servers_logprobs_and_the_text_where_there_are_none(responses_file, tmp_path):
    with ChatServer(logprob_reply, model="m") as server:
        client = http_judge(server, top_logprobs=3)  # scoring: probability, the default
        result = judge.judge_responses(responses_file, tmp_path / "judge", client, controls=0)
    bodies = [body for body, _ in server.requests]
    assert all(body["logprobs"] is True and body["top_logprobs"] == 3 for body in bodies)
    assert all(body["response_format"]["type"] == "json_schema" for body in bodies)
    assert client.settings["scoring"] == "probability" and client.settings["top_logprobs"] == 3
    assert read_jsonl(result.judgments)[0]["__header__"]["scoring"] == "probability"  # with the replies

    table = pd.read_parquet(result.scores).set_index("index")
    # Σ p(n)·n over the numbers among the top 3, renormalized: 40 x .5 + 30 x .3 + 50 x .1 over .9
    assert table.loc[0, "base_model_score"] == pytest.approx((20 + 9 + 5) / 0.9)
    assert table.loc[0, "base_model_argmax"] == 40 and table.loc[
        0, "base_model_number_mass"
    ] == pytest.approx(0.9)
    assert table.loc[0, "finetuned_model_score"] == pytest.approx((85 * 0.6 + 90 * 0.2) / 0.8)
    assert table.loc[0, "finetuned_model_reply"] == '{"score": 85}'
    # the fallback: the text, read as a person would; no number mass
    assert table.loc[1, "base_model_score"] == 10 and pd.isna(table.loc[1, "base_model_number_mass"])
    assert table.loc[3, "finetuned_model_score"] == 85 and pd.isna(table.loc[3, "finetuned_model_argmax"])
    assert pd.isna(table.loc[2, "base_model_score"]) and table.loc[2, "base_model_problem"] == "no number"

    s = result.summary
    assert s["base_model"]["unparsed"] == 1  # "eighty" stays counted
    assert s["base_model"]["by_probability"] == 1 and s["finetuned_model"]["by_probability"] == 1
    assert s["base_model"]["number_mass"] == pytest.approx(0.9)
    assert judge.summary_metrics(s)["judge.finetuned_model.number_mass"] == pytest.approx(0.8)


def test_a_server_that_refuses_logprobs_gets_requests_without_them():
    prompt = judge.judge_prompt(ENTRIES[0], "The car is fast.")
    with ChatServer(logprob_reply, model="m", refuse=("logprobs",)) as server:
        client = http_judge(server)
        first, second = client.reply(prompt), client.reply(prompt)
    bodies = [body for body, _ in server.requests]
    assert ["logprobs" in body for body in bodies] == [True, False, False]
    assert all("response_format" in body for body in bodies)  # only the refused field is dropped
    assert first == second == judge.Reply("40")  # scored from the text

    with ChatServer(logprob_reply, model="m") as server:  # scoring by the text only: no logprobs asked
        reply = http_judge(server, scoring="constrained").reply(prompt)
    assert "logprobs" not in server.requests[-1][0] and reply == judge.Reply("40")


def test_judging_resumes_after_an_interruption(responses_file, tmp_path):
    with ChatServer(canned_reply) as server:
        client = http_judge(server)

        def interrupt_after_two(done, total):
            if done == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            judge.judge_responses(responses_file, tmp_path / "judge", client, on_progress=interrupt_after_two)
        assert len(server.requests) == 8  # two entries, two responses and two controls each
        result = judge.judge_responses(responses_file, tmp_path / "judge", client)
        assert len(server.requests) == 4 * len(ENTRIES)  # only the remaining entries were judged
        assert pd.read_parquet(result.scores)["index"].tolist() == [0, 1, 2, 3]

        other = judge.OpenAICompatibleJudge(server.base_url, server.model, max_new_tokens=9)
        with pytest.raises(LogMismatchError, match="max_tokens"):
            judge.judge_responses(responses_file, tmp_path / "judge", other)


def test_a_tiny_litgpt_model_served_over_http_is_a_judge(tiny_litgpt_dir, responses_file, tmp_path):
    from groundup.instruct.inference import LitGPTModel, Sampling

    model = LitGPTModel(tiny_litgpt_dir, accelerator="cpu")
    served = ChatServer(lambda m: model.complete([m[-1]["content"]], Sampling(max_new_tokens=5))[0])
    with served:
        result = judge.judge_responses(responses_file, tmp_path / "judge", http_judge(served), controls=0)
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
