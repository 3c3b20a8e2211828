"""Our prompt formats as LitGPT prompt styles.

LitGPT's own ``Alpaca`` style differs from the workshop's (another preamble when there is an input), so the
finetuning subprocess is given these classes instead. LitGPT records the class path in the finetuned
checkpoint's ``prompt_style.yaml``; ``litgpt.LLM.load`` / ``litgpt serve`` then format prompts with
``groundup.instruct.prompts`` too. Imports LitGPT, so only the LitGPT paths import this module.
"""

from __future__ import annotations

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
