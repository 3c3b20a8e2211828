"""An LLM judge scores both models' test-set responses from 0 to 100 (workshop section 6, part 4).

The prompt is the workshop's, sent through the judge model's chat template (Llama 3 Instruct's for the
default judge). Unlike the workshop, no reply is dropped: a reply without a usable score is kept, counted
and reported as unparsed next to the statistics of the parsed ones.

Over 350 lines: the judge prompt, score parsing, both backends and the statistics are one stage's logic;
splitting the backends out is the evaluation work's call.

Score parsing (:func:`parse_score`) reads the first number in the reply and accepts it only if it is a
whole number from 0 to 100:

==================  =========  ===============================================================
reply               score      why
==================  =========  ===============================================================
``85``              85
``Score: 85/100``   85         the first number is the score; ``/100`` is the scale
``I'd give it 85.`` 85         a full stop after the number ends the sentence, not a decimal
``eighty``          unparsed   number words are not read (judges asked for digits give digits)
``150``             unparsed   out of range; later numbers are not tried (they are rarely scores)
``""``              unparsed   empty reply
``-3``              unparsed   negative; not read as 3
``85.5``            unparsed   not an integer; rounding would make up a rule the prompt does not state
==================  =========  ===============================================================

Backends: ``litgpt`` (a local model through ``litgpt.LLM``, optionally 4-bit on CUDA) and
``openai-compatible`` (chat completions over HTTP: Ollama, vLLM, LM Studio, OpenAI, ...).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from groundup.config import JudgeConfig
from groundup.errors import SourceUnreachable
from groundup.files import atomic_path, sha256_file

MODEL_KEYS = ("base_model", "finetuned_model")

JUDGE_TEMPLATE = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)


def judge_prompt(entry: Mapping[str, Any], response: str) -> str:
    """The workshop's judge prompt for one response (plain text, before any chat template)."""
    from groundup.instruct.prompts import format_input

    return JUDGE_TEMPLATE.format(input=format_input(entry), output=entry["output"], response=response)


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------

# A number not glued to a preceding word or decimal point ("v2", ".5"), with an optional minus sign and
# an optional decimal part; a trailing "." without digits is punctuation.
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d+)(\.\d+)?(?!\d)")


@dataclass(frozen=True)
class ParsedScore:
    score: int | None
    problem: str | None = None  # why the reply is unparsed

    @property
    def parsed(self) -> bool:
        return self.score is not None


def parse_score(reply: str | None) -> ParsedScore:
    """The first number in ``reply`` if it is an integer from 0 to 100; otherwise unparsed, with a reason."""
    if reply is None or not reply.strip():
        return ParsedScore(None, "empty reply")
    match = _NUMBER.search(reply)
    if match is None:
        return ParsedScore(None, "no number")
    sign, digits, fraction = match.groups()
    if fraction:
        return ParsedScore(None, f"not an integer: {match.group(0)}")
    if sign:
        return ParsedScore(None, f"negative: {match.group(0)}")
    value = int(digits)
    if value > 100:
        return ParsedScore(None, f"out of range: {value}")
    return ParsedScore(value)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def describe_scores(scores: Sequence[int | None]) -> dict[str, float | int | None]:
    """Count, unparsed count and share, and mean / median / sample standard deviation of parsed scores."""
    parsed = np.array([s for s in scores if s is not None], dtype=float)
    total = len(scores)
    unparsed = total - len(parsed)
    return {
        "count": total,
        "parsed": int(len(parsed)),
        "unparsed": unparsed,
        "unparsed_share": unparsed / total if total else None,
        "mean": float(parsed.mean()) if len(parsed) else None,
        "median": float(np.median(parsed)) if len(parsed) else None,
        "std": float(parsed.std(ddof=1)) if len(parsed) > 1 else None,
    }


def paired_difference(
    base: Sequence[int | None], finetuned: Sequence[int | None], *, samples: int = 10_000, seed: int = 123
) -> dict[str, float | int | None]:
    """Mean of ``finetuned - base`` over entries where both scores parsed, with a paired bootstrap 95%
    percentile interval: entries are resampled with replacement, keeping each entry's two scores together,
    so the interval reflects that both models answered the same questions."""
    if len(base) != len(finetuned):
        raise ValueError(f"paired scores need equal lengths, got {len(base)} and {len(finetuned)}")
    diffs = np.array(
        [f - b for b, f in zip(base, finetuned, strict=True) if b is not None and f is not None], dtype=float
    )
    result: dict[str, float | int | None] = {
        "pairs": int(len(diffs)),
        "mean": None,
        "ci_low": None,
        "ci_high": None,
    }
    if len(diffs) == 0:
        return result
    result["mean"] = float(diffs.mean())
    if len(diffs) > 1:
        rng = np.random.default_rng(seed)
        means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


def summarize(
    scores: Mapping[str, Sequence[int | None]], *, samples: int = 10_000, seed: int = 123
) -> dict[str, dict[str, float | int | None]]:
    """Per-model statistics plus the paired difference finetuned - base."""
    summary = {key: describe_scores(scores[key]) for key in MODEL_KEYS}
    summary["difference"] = paired_difference(
        scores["base_model"], scores["finetuned_model"], samples=samples, seed=seed
    )
    return summary


def summary_metrics(summary: Mapping[str, Mapping[str, float | int | None]]) -> dict[str, float]:
    """Flat MLflow metric names (``judge.finetuned_model.mean`` ...), leaving out what could not be computed."""
    return {
        f"judge.{group}.{name}": float(value)
        for group, stats in summary.items()
        for name, value in stats.items()
        if value is not None and not (isinstance(value, float) and math.isnan(value))
    }


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


class JudgeError(SourceUnreachable):
    """The judge could not be reached or loaded, or answered with something that is not a reply."""


class Judge(Protocol):
    judge_id: str
    settings: dict[str, Any]  # everything that shapes the replies, for the resume check

    def reply(self, prompt: str) -> str: ...


class LitGPTJudge:
    """A local judge through LitGPT, prompts wrapped in its chat template.

    ``chat_template`` names a LitGPT prompt style (``llama3``, ``phi-3``, ...); ``None`` uses the
    checkpoint's own, which for ``meta-llama/Meta-Llama-3-8B-Instruct`` is Llama 3's.
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
    ) -> None:
        from litgpt.prompts import PromptStyle

        from groundup.instruct.inference import LitGPTModel, Sampling

        style = PromptStyle.from_name(chat_template) if chat_template else None
        self.model = LitGPTModel(model, accelerator=accelerator, quantize=quantize, prompt_style=style)
        self.judge_id = f"litgpt:{self.model.model_id}"
        self.sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.settings = {"chat_template": type(self.model.prompt_style).__name__, **self.sampling.to_dict()}

    def chat_prompt(self, prompt: str) -> str:
        return self.model.prompt_style.apply(prompt)

    def reply(self, prompt: str) -> str:
        return self.model.complete([self.chat_prompt(prompt)], self.sampling)[0].strip()


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
    ) -> None:
        import requests

        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge base_url {base_url!r} must start with http:// or https://")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.judge_id = f"openai-compatible:{model}@{base_url.rstrip('/')}"
        self.body = {"model": model, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        self.settings = dict(self.body)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.session = requests.Session()
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def reply(self, prompt: str) -> str:
        import requests

        body = {**self.body, "messages": [{"role": "user", "content": prompt}]}
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
                raise JudgeError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}")
            return self._content(response)
        raise JudgeError(f"{self.url}: no reply after {self.retries + 1} attempts ({problem})")

    def _content(self, response: Any) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: not a chat completion: {response.text[:300]}") from None
        return (content or "").strip()


def make_judge(settings: JudgeConfig) -> Judge:
    """The backend ``settings`` selects."""
    if settings.backend == "litgpt":
        return LitGPTJudge(
            settings.model,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
            chat_template=settings.chat_template,
            accelerator=settings.accelerator,
            quantize=settings.quantize,
        )
    if not settings.base_url:
        raise JudgeError(
            "judge.backend 'openai-compatible' needs judge.base_url (e.g. http://127.0.0.1:11434/v1)"
        )
    if settings.quantize:
        raise JudgeError("judge.quantize applies to the litgpt backend only; the server decides its own")
    return OpenAICompatibleJudge(
        settings.base_url,
        settings.model,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
        api_key_env=settings.api_key_env,
        timeout_s=settings.timeout_s,
        retries=settings.retries,
    )


# ---------------------------------------------------------------------------------------------------------
# Judging a responses file
# ---------------------------------------------------------------------------------------------------------


@dataclass
class JudgeResult:
    judgments: Path  # JSON Lines: one record per entry with both raw replies
    scores: Path  # Parquet: the per-entry table
    histogram: Path  # PNG
    summary: dict[str, dict[str, float | int | None]]


def judge_responses(
    responses: str | Path,
    output_dir: str | Path,
    judge: Judge,
    *,
    bootstrap_samples: int = 10_000,
    seed: int = 123,
    on_progress: Callable[[int, int], None] | None = None,
) -> JudgeResult:
    """Ask ``judge`` to score every entry's two responses; resumable (replies are logged entry by entry).

    Writes ``judgments.jsonl``, ``scores.parquet`` and ``scores_histogram.png`` into ``output_dir``.
    """
    import pandas as pd

    responses = Path(responses)
    output_dir = Path(output_dir)
    entries = read_responses(responses)
    log_path = output_dir / "judgments.jsonl"
    replies = _collect_replies(entries, responses, judge, log_path, on_progress)
    table = scores_table(entries, replies)
    scores = {key: [None if v is pd.NA else int(v) for v in table[f"{key}_score"]] for key in MODEL_KEYS}
    summary = summarize(scores, samples=bootstrap_samples, seed=seed)
    parquet = output_dir / "scores.parquet"
    with atomic_path(parquet, suffix=".parquet") as tmp:
        table.to_parquet(tmp, index=False)
    png = plot_histogram(table, summary, output_dir / "scores_histogram.png")
    return JudgeResult(judgments=log_path, scores=parquet, histogram=png, summary=summary)


def read_responses(path: Path) -> list[dict[str, Any]]:
    from groundup.instruct.resumable import read_jsonl

    entries = read_jsonl(path)
    required = (*MODEL_KEYS, "instruction", "output")
    missing = [i for i, entry in enumerate(entries) if any(key not in entry for key in required)]
    if missing or not entries:
        raise ValueError(
            f"{path}: {'entries ' + str(missing[:5]) if missing else 'no entry'} with {', '.join(required)}; "
            "is it a responses file from `groundup respond`?"
        )
    return entries


def _collect_replies(
    entries: Sequence[Mapping[str, Any]],
    responses: Path,
    judge: Judge,
    log_path: Path,
    on_progress: Callable[[int, int], None] | None,
) -> dict[int, dict[str, Any]]:
    """The judge's raw replies per entry, logged as they come; a rerun asks only about missing entries."""
    from tqdm.auto import tqdm

    from groundup.instruct.resumable import ResumableLog

    header = {
        "responses_sha256": sha256_file(responses),
        "judge": judge.judge_id,
        "template": JUDGE_TEMPLATE,
        **judge.settings,
    }
    with (
        ResumableLog(log_path, header) as log,
        tqdm(total=len(entries), initial=len(log.done), desc="Judging responses", disable=None) as bar,
    ):
        for index in [i for i in range(len(entries)) if i not in log.done]:
            record: dict[str, Any] = {"index": index}
            for key in MODEL_KEYS:
                record[f"{key}_reply"] = judge.reply(judge_prompt(entries[index], entries[index][key]))
            log.append(record)
            bar.update()
            if on_progress:
                on_progress(len(log.records), len(entries))
        return {record["index"]: record for record in log.records}


def scores_table(entries: Sequence[Mapping[str, Any]], replies: Mapping[int, Mapping[str, str]]):
    """One row per entry: the entry, both responses, raw judge replies, parsed scores, and why unparsed."""
    import pandas as pd

    rows = []
    for index, entry in enumerate(entries):
        row: dict[str, Any] = {
            "index": index,
            "instruction": entry["instruction"],
            "input": entry.get("input", ""),
            "output": entry["output"],
        }
        for key in MODEL_KEYS:
            parsed = parse_score(replies[index][f"{key}_reply"])
            row[key] = entry[key]
            row[f"{key}_reply"] = replies[index][f"{key}_reply"]
            row[f"{key}_score"] = parsed.score
            row[f"{key}_problem"] = parsed.problem
        rows.append(row)
    table = pd.DataFrame(rows)
    for key in MODEL_KEYS:
        table[f"{key}_score"] = table[f"{key}_score"].astype("Int64")  # nullable: unparsed stays missing
    table["difference"] = table["finetuned_model_score"] - table["base_model_score"]
    return table


def plot_histogram(table, summary: Mapping[str, Mapping[str, Any]], destination: Path) -> Path:
    """Both models' parsed scores in 10-point bins; the legend says how many replies were unparsed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.arange(0, 101, 10)  # the last bin, 90-100, includes 100
    for key, colour in zip(MODEL_KEYS, ("tab:gray", "tab:blue"), strict=True):
        values = table[f"{key}_score"].dropna().astype(float).to_numpy()
        stats = summary[key]
        mean = f"mean {stats['mean']:.1f}" if stats["mean"] is not None else "no parsed scores"
        label = f"{key.replace('_', ' ')}: {mean}, {stats['unparsed']}/{stats['count']} unparsed"
        ax.hist(values, bins=bins, alpha=0.6, color=colour, label=label, edgecolor="white")
    ax.set_xlabel("judge score (0-100)")
    ax.set_ylabel("entries")
    ax.set_xticks(bins)
    ax.set_title("Judge scores of the test-set responses")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(destination, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return destination
