"""Our prompt formats as LitGPT prompt styles, and which style a model answers in.

LitGPT's own ``Alpaca`` style differs from the workshop's (another preamble when there is an input), so the
finetuning subprocess is given these classes instead. LitGPT records the class path in the finetuned
checkpoint's ``prompt_style.yaml``; ``litgpt.LLM.load`` / ``litgpt serve`` then format prompts with
``groundup.instruct.prompts`` too.

Every model's prompt format is a LitGPT ``PromptStyle`` here (:func:`model_prompt_style`): a LitGPT
checkpoint's own (its ``prompt_style.yaml``, else the chat template LitGPT knows for its name, e.g. ChatML
for SmolLM2-Instruct), and ours for our GPT-2 checkpoints and adapters. :func:`format_entry` turns a test
entry into that format; :func:`answer_format` says how its answers end (see ``responses.clean_response``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from litgpt.prompts import PromptStyle

from groundup.instruct.prompts import format_prompt

if TYPE_CHECKING:
    from litgpt.tokenizer import Tokenizer


class _GroundupStyle(PromptStyle):
    style = "alpaca"

    def apply(self, prompt: str, *, sys_prompt: str | None = None, **kwargs: Any) -> str:
        # LitGPT's SFT dataset passes the whole entry as keyword arguments; LLM.generate passes only a string.
        return format_prompt({"instruction": prompt, "input": kwargs.get("input") or ""}, self.style)

    def stop_tokens(self, tokenizer: Tokenizer) -> tuple[list[int], ...]:
        return ([tokenizer.eos_id],)


class Alpaca(_GroundupStyle):
    style = "alpaca"


class Phi3(_GroundupStyle):
    style = "phi-3"


LITGPT_PROMPT_STYLES: dict[str, type[PromptStyle]] = {"alpaca": Alpaca, "phi-3": Phi3}


def class_path(style: str) -> str:
    """The import path LitGPT's argument parser and ``prompt_style.yaml`` use for ``style``."""
    try:
        cls = LITGPT_PROMPT_STYLES[style]
    except KeyError:
        raise ValueError(
            f"unknown prompt style {style!r}; available: {', '.join(LITGPT_PROMPT_STYLES)}"
        ) from None
    return f"{cls.__module__}.{cls.__name__}"


def model_prompt_style(model: str | Path, setting: str = "auto") -> PromptStyle:
    """The style ``model`` answers in: ``setting`` (``alpaca``, ``phi-3``) for every model, or with
    ``auto`` the model's own: a LitGPT checkpoint's recorded or known style, an adapter's recorded style,
    Alpaca for our GPT-2 checkpoints (the format the workshop finetunes them in)."""
    from litgpt.prompts import has_prompt_style, load_prompt_style, model_name_to_prompt_style

    if setting != "auto":
        return LITGPT_PROMPT_STYLES[setting]()
    path = Path(model)
    if has_prompt_style(path):
        return load_prompt_style(path)
    if (path / "model_config.yaml").is_file():
        from litgpt import Config

        return model_name_to_prompt_style(Config.from_file(path / "model_config.yaml").name)
    if (path / "adapter.json").is_file():
        recorded = json.loads((path / "adapter.json").read_text(encoding="utf-8")).get("prompt_style")
        return LITGPT_PROMPT_STYLES.get(recorded or "alpaca", Alpaca)()
    if path.is_dir():
        return Alpaca()
    return model_name_to_prompt_style(str(model).split("/")[-1])  # a hub id


def style_name(style: PromptStyle) -> str:
    """The import path of a style's class: what the responses file records."""
    return f"{type(style).__module__}.{type(style).__name__}"


def format_entry(style: PromptStyle, entry: Mapping[str, str]) -> str:
    """An instruction entry as ``style``'s prompt. Instruction formats take the input as a field; a chat
    template gets one user message, the instruction followed by the input."""
    from litgpt.prompts import Alpaca as LitGPTAlpaca

    if isinstance(style, (_GroundupStyle, LitGPTAlpaca)):
        return style.apply(entry["instruction"], input=entry.get("input") or "")
    message = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    return style.apply(message)


def answer_format(style: PromptStyle) -> str:
    """``alpaca`` (an answer ends at the next ``###`` section), ``phi-3``, or ``chat`` (the template's turn
    markers end it); the keys of ``responses.NEXT_EXAMPLE``."""
    from litgpt.prompts import Alpaca as LitGPTAlpaca

    if isinstance(style, _GroundupStyle):
        return style.style
    return "alpaca" if isinstance(style, LitGPTAlpaca) else "chat"
