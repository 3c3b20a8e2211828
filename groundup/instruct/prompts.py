"""Prompt formats for instruction entries: the one place that turns an entry into model input.

Every consumer (our own finetuning and batching, LitGPT finetuning via ``litgpt_prompts``, the response
stage) goes through :func:`format_prompt` / :func:`format_example`, so training and inference always see
the same text. A prompt ends exactly where the model's answer begins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

PromptStyleName = Literal["alpaca", "phi-3"]
Entry = Mapping[str, str]

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_RESPONSE_HEADER = "\n\n### Response:\n"


def format_input(entry: Entry) -> str:
    """The workshop's ``format_input``: preamble, instruction and (only if non-empty) input."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def alpaca(entry: Entry) -> str:
    """Alpaca style, as in the workshop: ``format_input(entry)`` followed by the response header."""
    return format_input(entry) + ALPACA_RESPONSE_HEADER


def phi3(entry: Entry) -> str:
    """Phi-3 style as in the workshop's figure (shorter than Alpaca): user tag, instruction, input if any,
    assistant tag."""
    text = f"<|user|>\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n{entry['input']}"
    return text + "\n<|assistant|>\n"


PROMPT_STYLES: dict[str, Callable[[Entry], str]] = {"alpaca": alpaca, "phi-3": phi3}


def prompt_formatter(style: str) -> Callable[[Entry], str]:
    try:
        return PROMPT_STYLES[style]
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; available: {', '.join(PROMPT_STYLES)}") from None


def format_prompt(entry: Entry, style: str = "alpaca") -> str:
    """The model input for ``entry``: everything up to where the response starts."""
    return prompt_formatter(style)(entry)


def format_example(entry: Entry, style: str = "alpaca") -> str:
    """Prompt plus the expected ``output``: one training example as text."""
    return format_prompt(entry, style) + entry["output"]
