"""An LLM judge scores both models' test-set responses from 0 to 100 (workshop section 6, part 4).

The prompt is the workshop's, sent through the judge model's chat template (Llama 3 Instruct's for the
default judge). Unlike the workshop, no reply is dropped: a reply without a usable score is kept, counted
and reported as unparsed next to the statistics of the parsed ones. Besides both models' responses the
judge scores controls, the reference answer and another entry's reference for the first
``judge.controls`` entries, so the summary can say whether its scores mean anything
(:mod:`groundup.instruct.judge_scores`: parsing, statistics, the control AUC).

Backends (:mod:`groundup.instruct.judge_backends`): ``litgpt``, by default scored by the probabilities it
gives the numbers 0-100 (the expected score; or decoding constrained to them) so that every reply is a
score, and ``openai-compatible`` (Ollama, vLLM, OpenAI, ...), asked for a score only and for its tokens'
``top_logprobs`` where the server allows it. A score from probabilities is a decimal (``73.4``); the
table keeps the most probable number and the probability mass on numbers beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from groundup.config import JudgeConfig
from groundup.files import atomic_path, sha256_file
from groundup.instruct.judge_backends import (  # noqa: F401
    FORMAT_FIELDS,
    SCORE_REGEX,
    SCORING_MODES,
    Judge,
    JudgeError,
    LitGPTJudge,
    OpenAICompatibleJudge,
    Reply,
)
from groundup.instruct.judge_scores import (  # noqa: F401  (the judge's public names, in one place)
    CONTROL_KEYS,
    MODEL_KEYS,
    ParsedScore,
    control_auc,
    control_verdict,
    describe_scores,
    paired_difference,
    parse_score,
    summarize,
    summary_metrics,
)

SCORED_KEYS = MODEL_KEYS + CONTROL_KEYS

JUDGE_TEMPLATE = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)


def judge_prompt(entry: Mapping[str, Any], response: str) -> str:
    """The workshop's judge prompt for one response (plain text, before any chat template)."""
    from groundup.instruct.prompts import format_input

    return JUDGE_TEMPLATE.format(input=format_input(entry), output=entry["output"], response=response)


def make_judge(settings: JudgeConfig) -> Judge:
    """The backend ``settings`` selects."""
    # What every backend takes from the settings.
    common = {
        "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, "seed": settings.seed,
        "scoring": settings.scoring,
    }  # fmt: skip
    if settings.backend == "litgpt":
        return LitGPTJudge(
            settings.model, chat_template=settings.chat_template, accelerator=settings.accelerator,
            quantize=settings.quantize, **common,
        )  # fmt: skip
    if not settings.base_url:
        raise JudgeError(
            "judge.backend 'openai-compatible' needs judge.base_url (e.g. http://127.0.0.1:11434/v1)"
        )
    if settings.quantize:
        raise JudgeError("judge.quantize applies to the litgpt backend only; the server decides its own")
    return OpenAICompatibleJudge(
        settings.base_url, settings.model, api_key_env=settings.api_key_env, timeout_s=settings.timeout_s,
        retries=settings.retries, force_format=settings.force_format, top_logprobs=settings.top_logprobs, **common,
    )  # fmt: skip


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
    controls: int = 50,
    min_control_auc: float = 0.8,
    bootstrap_samples: int = 10_000,
    seed: int = 123,
    on_progress: Callable[[int, int], None] | None = None,
) -> JudgeResult:
    """Ask ``judge`` to score every entry's two responses, and for the first ``controls`` entries the
    reference answer and a mismatched reference; resumable (replies are logged entry by entry).

    Writes ``judgments.jsonl``, ``scores.parquet`` and ``scores_histogram.png`` into ``output_dir``.
    """
    import pandas as pd

    responses = Path(responses)
    output_dir = Path(output_dir)
    entries = read_responses(responses)
    log_path = output_dir / "judgments.jsonl"
    mismatched = mismatched_answers(entries, controls)
    replies = _collect_replies(entries, mismatched, responses, judge, log_path, on_progress)
    table = scores_table(entries, mismatched, replies)
    # Control scores only of the controlled entries: an entry without controls is not an unparsed reply.
    rows = {key: len(mismatched) if key in CONTROL_KEYS else len(table) for key in SCORED_KEYS}
    scores = {
        key: [None if v is pd.NA else float(v) for v in table[f"{key}_score"][: rows[key]]]
        for key in SCORED_KEYS
    }
    masses = {key: table[f"{key}_number_mass"][: rows[key]].dropna().tolist() for key in SCORED_KEYS}
    summary = summarize(
        scores, samples=bootstrap_samples, seed=seed, auc_threshold=min_control_auc, number_masses=masses
    )
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


def mismatched_answers(entries: Sequence[Mapping[str, Any]], controls: int) -> list[str]:
    """For each of the first ``controls`` entries, the reference answer of the next entry whose answer
    differs (a wrong answer that is still fluent and on some topic); none with fewer than two answers."""
    outputs = [entry["output"] for entry in entries]
    if len(set(outputs)) < 2:
        return []
    mismatched = []
    for index in range(min(controls, len(entries))):
        offset = 1
        while outputs[(index + offset) % len(outputs)] == outputs[index]:
            offset += 1
        mismatched.append(outputs[(index + offset) % len(outputs)])
    return mismatched


def _collect_replies(
    entries: Sequence[Mapping[str, Any]],
    mismatched: Sequence[str],
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
        "controls": len(mismatched),
        **judge.settings,
    }
    with (
        ResumableLog(log_path, header) as log,
        tqdm(total=len(entries), initial=len(log.done), desc="Judging responses", disable=None) as bar,
    ):
        for index in [i for i in range(len(entries)) if i not in log.done]:
            record: dict[str, Any] = {"index": index}
            answers = {key: entries[index][key] for key in MODEL_KEYS}
            if index < len(mismatched):
                answers.update(reference_answer=entries[index]["output"], mismatched_answer=mismatched[index])
            for key, answer in answers.items():
                reply = judge.reply(judge_prompt(entries[index], answer))
                record[f"{key}_reply"] = reply.text
                if reply.probabilities:
                    record[f"{key}_probabilities"] = reply.probabilities.to_dict()
            log.append(record)
            bar.update()
            if on_progress:
                on_progress(len(log.records), len(entries))
        return {record["index"]: record for record in log.records}


def scores_table(
    entries: Sequence[Mapping[str, Any]], mismatched: Sequence[str], replies: Mapping[int, Mapping[str, str]]
):
    """One row per entry: the entry, both responses (and the control answers), raw judge replies, scores
    (expected from the probabilities where the judge gave them, else parsed from the reply), the most
    probable number and the probability mass on numbers (probability scoring only), and why unparsed;
    control columns are empty past the controlled entries."""
    import pandas as pd

    rows = []
    for index, entry in enumerate(entries):
        row: dict[str, Any] = {
            "index": index,
            "instruction": entry["instruction"],
            "input": entry.get("input", ""),
            "output": entry["output"],
        }
        answers = {key: entry[key] for key in MODEL_KEYS}
        answers["reference_answer"] = entry["output"] if index < len(mismatched) else None
        answers["mismatched_answer"] = mismatched[index] if index < len(mismatched) else None
        for key, answer in answers.items():
            reply = replies[index].get(f"{key}_reply")
            probabilities = replies[index].get(f"{key}_probabilities") if answer is not None else None
            parsed = parse_score(reply) if answer is not None else ParsedScore(None, "no control")
            row[key] = answer
            row[f"{key}_reply"] = reply
            row[f"{key}_score"] = probabilities["expected"] if probabilities else parsed.score
            row[f"{key}_argmax"] = probabilities["argmax"] if probabilities else None
            row[f"{key}_number_mass"] = probabilities["mass"] if probabilities else None
            row[f"{key}_problem"] = None if probabilities else parsed.problem
        rows.append(row)
    table = pd.DataFrame(rows).drop(columns=["reference_answer"])  # the same as "output"
    for key in SCORED_KEYS:  # nullable: unparsed stays missing
        table[f"{key}_score"] = table[f"{key}_score"].astype("Float64")  # decimal when from probabilities
        table[f"{key}_argmax"] = table[f"{key}_argmax"].astype("Int64")
        table[f"{key}_number_mass"] = table[f"{key}_number_mass"].astype("Float64")
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
