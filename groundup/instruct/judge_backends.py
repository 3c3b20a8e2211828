"""The judge's backends: a local LitGPT model and an OpenAI-compatible chat server.

``litgpt`` runs a model through ``litgpt.LLM`` (optionally 4-bit on CUDA) and scores in one of three ways
(``scoring``): ``probability``, the expected score from the probabilities it gives each number 0-100
(:mod:`groundup.instruct.judge_probabilities`); ``constrained``, decoding restricted to the numbers
(:mod:`groundup.instruct.constrained`); ``free``, the workshop's free decoding, parsed. The first two give
a score for every reply. ``openai-compatible`` posts chat completions over HTTP (Ollama, vLLM, LM Studio,
OpenAI, ``litgpt serve``), asking the server to answer with a score only where it can (a JSON-schema
``response_format``, vLLM's ``guided_regex``) and, scoring by ``probability``, for the ``top_logprobs`` of
its tokens; a server that refuses a field gets requests without it, and a reply without usable logprobs is
parsed (:func:`groundup.instruct.judge_scores.parse_score`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from groundup.errors import SettingsError, SourceUnreachable
from groundup.instruct.judge_probabilities import NumberProbabilities, logprob_number_probabilities


class JudgeError(SourceUnreachable):
    """The judge could not be reached or loaded, or answered with something that is not a reply."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status a server refused the request with


SCORING_MODES = ("probability", "constrained", "free")


@dataclass(frozen=True)
class Reply:
    """What a judge answered: its text, and the numbers' probabilities where it was scored by them."""

    text: str
    probabilities: NumberProbabilities | None = None


class Judge(Protocol):
    judge_id: str
    settings: dict[str, Any]  # everything that shapes the replies, for the resume check

    def reply(self, prompt: str) -> Reply: ...


class LitGPTJudge:
    """A local judge through LitGPT, prompts wrapped in its chat template.

    ``chat_template`` names a LitGPT prompt style (``llama3``, ``phi-3``, ...); ``None`` uses the
    checkpoint's own, which for ``meta-llama/Meta-Llama-3-8B-Instruct`` is Llama 3's. ``scoring``: one of
    :data:`SCORING_MODES` (see the module); scoring by ``probability``, the reply's text is the number that
    constrained decoding writes, computed from the same forward passes.
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
        scoring: str = "probability",
    ) -> None:
        from litgpt.prompts import PromptStyle

        from groundup.instruct.inference import LitGPTModel, Sampling

        if scoring not in SCORING_MODES:
            raise SettingsError(f"judge.scoring {scoring!r} is not one of {', '.join(SCORING_MODES)}")
        style = PromptStyle.from_name(chat_template) if chat_template else None
        self.model = LitGPTModel(model, accelerator=accelerator, quantize=quantize, prompt_style=style)
        self.judge_id = f"litgpt:{self.model.model_id}"
        self.scoring = scoring
        self.sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        decoding = self.sampling.to_dict() if scoring == "free" else {"numbers": "0-100"}
        self.settings = {
            "chat_template": type(self.model.prompt_style).__name__,
            "scoring": scoring,
            **decoding,
        }

    def chat_prompt(self, prompt: str) -> str:
        return self.model.prompt_style.apply(prompt)

    def reply(self, prompt: str) -> Reply:
        chat = self.chat_prompt(prompt)
        stop_ids = [seq[0] for seq in self.model.stop_tokens] + [self.model.eos_id]
        if self.scoring == "probability":
            from groundup.instruct.judge_probabilities import litgpt_number_probabilities

            probabilities = litgpt_number_probabilities(self.model, chat, stop_ids)
            return Reply(str(probabilities.written), probabilities)
        if self.scoring == "constrained":
            from groundup.instruct.constrained import choose_number

            return Reply(str(choose_number(self.model, chat, stop_ids).value))
        return Reply(self.model.complete([chat], self.sampling)[0].strip())


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
        scoring: str = "probability",
        top_logprobs: int = 20,
    ) -> None:
        import requests

        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge base_url {base_url!r} must start with http:// or https://")
        if scoring not in SCORING_MODES:
            raise SettingsError(f"judge.scoring {scoring!r} is not one of {', '.join(SCORING_MODES)}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.judge_id = f"openai-compatible:{model}@{base_url.rstrip('/')}"
        self.body = {"model": model, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        # The server decodes: "constrained" and "free" both mean the reply's text is parsed.
        self.by_logprobs = scoring == "probability" and top_logprobs > 0
        logprob_fields = {"logprobs": True, "top_logprobs": top_logprobs} if self.by_logprobs else {}
        self.settings = {**self.body, "force_format": force_format, "scoring": scoring, **logprob_fields}
        # Sent until the server refuses them; the replies are parsed either way (parse_score reads JSON).
        self.optional_fields = [group for group in (FORMAT_FIELDS[force_format], logprob_fields) if group]
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.session = requests.Session()
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def reply(self, prompt: str) -> Reply:
        messages = [{"role": "user", "content": prompt}]
        while True:
            optional = {name: value for group in self.optional_fields for name, value in group.items()}
            try:
                return self._post({**self.body, **optional, "messages": messages})
            except JudgeError as exc:
                if exc.status not in REFUSED_FIELD_STATUS or not self.optional_fields:
                    raise
                # This server does not take them: requests without the fields it names (all if it names
                # none) from now on.
                named = [group for group in self.optional_fields if any(name in str(exc) for name in group)]
                for group in named or list(self.optional_fields):
                    self.optional_fields.remove(group)

    def _post(self, body: dict[str, Any]) -> Reply:
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

    def _content(self, response: Any) -> Reply:
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: not a chat completion: {response.text[:300]}") from None
        probabilities = None
        if self.by_logprobs:
            try:
                probabilities = logprob_number_probabilities((choice.get("logprobs") or {}).get("content"))
            except (AttributeError, TypeError, ValueError):
                probabilities = None  # logprobs in a shape we do not know: the text is parsed
        return Reply((content or "").strip(), probabilities)
