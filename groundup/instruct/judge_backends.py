"""The judge's backends: a local LitGPT model and an OpenAI-compatible chat server.

``litgpt`` runs a model through ``litgpt.LLM`` (optionally 4-bit on CUDA), by default with decoding
constrained to the numbers 0-100 (:mod:`groundup.instruct.constrained`), so every reply is a score.
``openai-compatible`` posts chat completions over HTTP (Ollama, vLLM, LM Studio, OpenAI, ``litgpt serve``),
asking the server to answer with a score only where it can (a JSON-schema ``response_format``, vLLM's
``guided_regex``); a server that refuses those fields gets plain requests, and the replies are parsed
either way (:func:`groundup.instruct.judge_scores.parse_score`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from groundup.errors import SourceUnreachable


class JudgeError(SourceUnreachable):
    """The judge could not be reached or loaded, or answered with something that is not a reply."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status a server refused the request with


class Judge(Protocol):
    judge_id: str
    settings: dict[str, Any]  # everything that shapes the replies, for the resume check

    def reply(self, prompt: str) -> str: ...


class LitGPTJudge:
    """A local judge through LitGPT, prompts wrapped in its chat template.

    ``chat_template`` names a LitGPT prompt style (``llama3``, ``phi-3``, ...); ``None`` uses the
    checkpoint's own, which for ``meta-llama/Meta-Llama-3-8B-Instruct`` is Llama 3's. ``constrained``
    restricts decoding to the numbers 0-100 (:mod:`groundup.instruct.constrained`): every reply is a score.
    """

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 123,
        chat_template: str | None = None,
        accelerator: str = "auto",
        quantize: str | None = None,
        constrained: bool = True,
    ) -> None:
        from litgpt.prompts import PromptStyle

        from groundup.instruct.inference import LitGPTModel, Sampling

        style = PromptStyle.from_name(chat_template) if chat_template else None
        self.model = LitGPTModel(model, accelerator=accelerator, quantize=quantize, prompt_style=style)
        self.judge_id = f"litgpt:{self.model.model_id}"
        self.constrained = constrained
        self.sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        decoding = {"decoding": "numbers 0-100"} if constrained else self.sampling.to_dict()
        self.settings = {"chat_template": type(self.model.prompt_style).__name__, **decoding}

    def chat_prompt(self, prompt: str) -> str:
        return self.model.prompt_style.apply(prompt)

    def reply(self, prompt: str) -> str:
        if self.constrained:
            from groundup.instruct.constrained import choose_number

            stop_ids = [seq[0] for seq in self.model.stop_tokens] + [self.model.eos_id]
            return str(choose_number(self.model, self.chat_prompt(prompt), stop_ids).value)
        return self.model.complete([self.chat_prompt(prompt)], self.sampling)[0].strip()


# What the format-forcing fields ask of a server: one whole number from 0 to 100.
SCORE_REGEX = r"(100|[1-9]?[0-9])"
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
    "additionalProperties": False,
}
FORMAT_FIELDS: dict[str, dict[str, Any]] = {
    # OpenAI, vLLM, Ollama (>= 0.5), LM Studio, llama.cpp's server
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "judge_score", "strict": True, "schema": SCORE_SCHEMA},
        }
    },
    # vLLM's guided decoding
    "guided_regex": {"guided_regex": SCORE_REGEX},
    "none": {},
}
# Statuses with which a server refuses a field it does not know (then the request goes again without it).
REFUSED_FIELD_STATUS = {400, 422}


class OpenAICompatibleJudge:
    """A judge behind an OpenAI-style ``POST {base_url}/chat/completions``; the server applies the chat
    template. The API key is read from the environment variable ``api_key_env`` and sent only as the
    ``Authorization`` header; it never appears in logs, errors or results."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 123,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        force_format: str = "json_schema",
    ) -> None:
        import requests

        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge base_url {base_url!r} must start with http:// or https://")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.judge_id = f"openai-compatible:{model}@{base_url.rstrip('/')}"
        self.body = {"model": model, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        self.settings = {**self.body, "force_format": force_format}
        # Sent until the server refuses them; the replies are parsed either way (parse_score reads JSON).
        self.format_fields = FORMAT_FIELDS[force_format]
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.session = requests.Session()
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def reply(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.format_fields:
            try:
                return self._post({**self.body, **self.format_fields, "messages": messages})
            except JudgeError as exc:
                if exc.status not in REFUSED_FIELD_STATUS:
                    raise
                self.format_fields = {}  # this server does not take them: plain requests from now on
        return self._post({**self.body, "messages": messages})

    def _post(self, body: dict[str, Any]) -> str:
        import requests

        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.post(self.url, json=body, timeout=self.timeout_s)
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise JudgeError(
                    f"{self.url}: HTTP {response.status_code}: {response.text[:300]}",
                    status=response.status_code,
                )
            return self._content(response)
        raise JudgeError(f"{self.url}: no reply after {self.retries + 1} attempts ({problem})")

    def _content(self, response: Any) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: not a chat completion: {response.text[:300]}") from None
        return (content or "").strip()
