"""Instruction data: parsing, validation (every problem named), the workshop's split, prompt formats."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from groundup.config import ConfigError, InstructDataConfig, load_config
from groundup.files import sha256_file
from groundup.instruct import data as instruct_data
from groundup.instruct.data import InstructionDataError
from groundup.instruct.prompts import format_example, format_input, format_prompt, prompt_formatter


def entries(n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Do task {i}.", "input": "" if i % 2 else f"x{i}", "output": f"done {i}"}
        for i in range(n)
    ]


def test_workshop_split_is_first_85_percent(instruction_data_path, tmp_path):
    config = InstructDataConfig(source=str(instruction_data_path))
    split = instruct_data.prepare_instruction_data(config, tmp_path / "out", tmp_path / "cache")

    original = json.loads(instruction_data_path.read_text(encoding="utf-8"))
    train = json.loads(split.train.read_text(encoding="utf-8"))
    test = json.loads(split.test.read_text(encoding="utf-8"))
    assert (len(original), split.n_train, split.n_test) == (1100, 935, 165)
    assert train == original[:935] and test == original[935:]
    assert split.train_sha256 == sha256_file(split.train)
    assert split.source_sha256 == sha256_file(instruction_data_path)


def test_seeded_shuffle_is_reproducible_and_keeps_every_entry():
    data = entries(40)
    train_a, test_a = instruct_data.split_entries(data, 0.85, shuffle=True, seed=7)
    train_b, test_b = instruct_data.split_entries(data, 0.85, shuffle=True, seed=7)
    train_c, _ = instruct_data.split_entries(data, 0.85, shuffle=True, seed=8)
    assert (train_a, test_a) == (train_b, test_b)
    assert train_a != train_c
    assert train_a != data[:34]
    assert Counter(e["instruction"] for e in train_a + test_a) == Counter(e["instruction"] for e in data)


def test_limit_takes_the_first_entries(tmp_path):
    source = tmp_path / "data.json"
    source.write_text(json.dumps(entries(30)), encoding="utf-8")
    config = InstructDataConfig(source=str(source), limit=20)
    split = instruct_data.prepare_instruction_data(config, tmp_path / "out", tmp_path / "cache")
    assert (split.n_train, split.n_test) == (17, 3)
    assert json.loads(split.test.read_text())[-1]["instruction"] == "Do task 19."


def test_jsonl_is_read(tmp_path):
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps(e) for e in entries(5)) + "\n", encoding="utf-8")
    assert instruct_data.load_entries(source) == entries(5)


def test_download_from_url(file_server, tmp_path):
    (file_server.root / "instructions.json").write_text(json.dumps(entries(20)), encoding="utf-8")
    config = InstructDataConfig(source=f"{file_server.url}/instructions.json")
    split = instruct_data.prepare_instruction_data(config, tmp_path / "out", tmp_path / "cache")
    assert (split.n_train, split.n_test) == (17, 3)
    assert (tmp_path / "cache" / split.source_sha256 / "instructions.json").is_file()


def test_every_problem_is_reported_with_entry_and_field(tmp_path):
    bad = entries(6)
    del bad[1]["output"]
    bad[2]["instruction"] = "   "
    bad[3]["input"] = 42
    bad[4] = "not an object"
    del bad[5]["input"]
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(bad), encoding="utf-8")
    out = tmp_path / "out"

    with pytest.raises(InstructionDataError) as info:
        instruct_data.prepare_instruction_data(
            InstructDataConfig(source=str(source)), out, tmp_path / "cache"
        )
    message = str(info.value)
    assert str(source) in message and "5 problem(s)" in message
    for expected in (
        "entry 1: field 'output' is missing",
        "entry 2: field 'instruction' is empty",
        "entry 3: field 'input' must be a string, got int",
        "entry 4: expected an object, got str",
        "entry 5: field 'input' is missing",
    ):
        assert expected in message
    assert not out.exists()


def test_empty_input_is_allowed_but_empty_output_is_not():
    ok = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    assert instruct_data.validate_entries(ok, "ok") == ok
    with pytest.raises(InstructionDataError, match="entry 0: field 'output' is empty"):
        instruct_data.validate_entries([{**ok[0], "output": ""}], "bad")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[{"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c"',
            "not valid JSON: .* line 2",
        ),
        (
            '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": oops}\n',
            "not valid JSON Lines:\n  line 2",
        ),
        ('{"entries": []}', "must be a list of objects, got dict"),
        ("[]", "has no entries"),
        ("  \n", "is empty"),
    ],
)
def test_malformed_files_are_named_errors(tmp_path, text, expected):
    source = tmp_path / "data.json"
    source.write_text(text, encoding="utf-8")
    with pytest.raises(InstructionDataError, match=expected) as info:
        instruct_data.prepare_instruction_data(
            InstructDataConfig(source=str(source)), tmp_path / "out", tmp_path / "c"
        )
    assert str(source) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_split_leaving_an_empty_part_is_an_error():
    with pytest.raises(InstructionDataError, match="leaves the test set empty"):
        instruct_data.split_entries(entries(10), 1.0)
    with pytest.raises(InstructionDataError, match="leaves the training set empty"):
        instruct_data.split_entries(entries(1), 0.85)
    with pytest.raises(ConfigError, match="train_fraction"):
        load_config(InstructDataConfig, None, ["train_fraction=1.0"])


def test_holdout_validation_is_seeded_and_disjoint():
    data = entries(50)
    fit, val = instruct_data.holdout_validation(data, 0.1, seed=3)
    assert (len(fit), len(val)) == (45, 5)
    assert instruct_data.holdout_validation(data, 0.1, seed=3) == (fit, val)
    assert instruct_data.holdout_validation(data, 0.1, seed=4)[1] != val
    assert sorted(e["instruction"] for e in fit + val) == sorted(e["instruction"] for e in data)
    assert instruct_data.holdout_validation(data, 0.0) == (data, [])
    with pytest.raises(InstructionDataError, match="leaves none to train on"):
        instruct_data.holdout_validation(entries(1), 0.5)


# ---------------------------------------------------------------------------------------------------------
# Prompt formats
# ---------------------------------------------------------------------------------------------------------

WITH_INPUT = {
    "instruction": "Evaluate the following phrase by transforming it into the spelling given.",
    "input": "freind --> friend",
    "output": 'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".',
}
WITHOUT_INPUT = {
    "instruction": "What is an antonym of 'complicated'?",
    "input": "",
    "output": "An antonym of 'complicated' is 'simple'.",
}


def test_alpaca_is_the_workshops_format():
    # The workshop's printed examples (format_input + desired_response), character for character.
    assert format_example(WITH_INPUT, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling given."
        "\n\n### Input:\nfreind --> friend"
        '\n\n### Response:\nThe spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".'
    )
    assert format_example(WITHOUT_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
        "\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
    )
    assert format_prompt(WITHOUT_INPUT) == format_input(WITHOUT_INPUT) + "\n\n### Response:\n"


def test_phi3_style():
    assert format_prompt(WITH_INPUT, "phi-3") == (
        "<|user|>\nEvaluate the following phrase by transforming it into the spelling given.\nfreind --> friend"
        "\n<|assistant|>\n"
    )
    assert format_example(WITHOUT_INPUT, "phi-3") == (
        "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>\nAn antonym of 'complicated' is 'simple'."
    )
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'; available: alpaca, phi-3"):
        prompt_formatter("chatml")
