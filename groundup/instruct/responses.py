"""Test-set responses of the base and the finetuned model (workshop section 6, part 2, exercises 1-2).

Every test entry is formatted in each model's own prompt style (``generation.prompt_style: auto``): the
style a model was finetuned with, an instruct model's chat template, Alpaca for our GPT-2 (the workshop
notebook passes the raw dict to ``llm.generate`` by mistake). Each model answers; an answer ends at
end-of-text, at the template's stop tokens, or where the model moves on (the next ``###`` section of
Alpaca-style output, a turn marker of a chat template), and is stored beside the entry under
``base_model`` and ``finetuned_model`` with the exact prompt, the model ids, styles and generation settings.

One model is in memory at a time (the workshop deletes the first LLM before loading the second): each
model's answers go to its own JSON Lines log, flushed entry by entry, so an interrupted run resumes where it
stopped. When both logs are complete they are merged into the responses file in one atomic write; an
existing complete responses file for the same inputs is returned as it is.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groundup.config import GenerationConfig, config_digest
from groundup.files import sha256_file
from groundup.instruct.data import load_entries
from groundup.instruct.inference import Sampling, load_causal_lm, model_identity
from groundup.instruct.prompts import ALPACA_PREAMBLE
from groundup.instruct.resumable import LogMismatchError, ResumableLog, read_jsonl, write_jsonl

MODEL_KEYS = ("base_model", "finetuned_model")

# What opens a response (models often write it themselves) and what shows the model has moved on (a new
# turn, a new example), per answer format (``litgpt_prompts.answer_format``). Text from there on is not part
# of the answer.
TURN_MARKERS = (
    "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|start_header_id|>", "<|end|>", "<|user|>", "<|assistant|>",
    "<|endoftext|>", "</s>",
)  # fmt: skip
RESPONSE_HEADERS = {"alpaca": "### Response:", "phi-3": "<|assistant|>", "chat": ""}
NEXT_EXAMPLE = {"alpaca": (ALPACA_PREAMBLE, *TURN_MARKERS), "phi-3": TURN_MARKERS, "chat": TURN_MARKERS}
# Alpaca-style output goes on with more sections ("### Explanation:", "### Instruction:"); in the chat
# formats "###" is the answer's own Markdown.
SECTION_HEADER = re.compile(r"^[ \t]*###", re.MULTILINE)


def clean_response(text: str, prompt: str, style: str = "alpaca") -> str:
    """The answer in a model's continuation: without an echoed prompt, a leading response header, or
    whatever follows once the model moves on."""
    text = text.strip()
    echoed = prompt.strip()
    if echoed and text.startswith(echoed):
        text = text[len(echoed) :].lstrip()
    header = RESPONSE_HEADERS[style]
    if header and text.startswith(header):
        text = text[len(header) :].lstrip()
    cuts = [text.find(marker) for marker in NEXT_EXAMPLE[style] if marker in text]
    if style == "alpaca" and (section := SECTION_HEADER.search(text)):
        cuts.append(section.start())
    return (text[: min(cuts)] if cuts else text).strip()


@dataclass
class ResponsesResult:
    path: Path
    entries: int
    cached: bool  # the complete file was already there
    models: dict[str, dict[str, str | None]]


def generation_sampling(settings: GenerationConfig) -> Sampling:
    return Sampling(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=settings.seed,
    )


def generation_settings(settings: GenerationConfig) -> dict[str, Any]:
    """The settings that shape the text (not batch size, device or limit), stored with every entry."""
    return {"prompt_style": settings.prompt_style, **generation_sampling(settings).to_dict()}


def generate_responses(
    test_data: str | Path,
    base_model: str | Path,
    finetuned_model: str | Path,
    output_dir: str | Path,
    settings: GenerationConfig,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> ResponsesResult:
    """Write ``responses-<key>.jsonl`` into ``output_dir``: each test entry plus both models' responses.

    ``key`` is a digest of the test data, both models' contents and the generation settings, so a rerun
    with the same inputs finds (or resumes) its file. Models are
    LitGPT checkpoint dirs / hub ids or groundup checkpoint / LoRA adapter dirs (``instruct.inference``).
    """
    from groundup.instruct.litgpt_prompts import format_entry, model_prompt_style, style_name

    entries = load_entries(test_data)[: settings.limit]
    generation = generation_settings(settings)
    sources = {"base_model": base_model, "finetuned_model": finetuned_model}
    models = {key: model_identity(source) for key, source in sources.items()}
    styles = {key: model_prompt_style(source, settings.prompt_style) for key, source in sources.items()}
    meta = {
        **{f"{key}_id": models[key]["id"] for key in MODEL_KEYS},
        **{f"{key}_sha256": models[key]["sha256"] for key in MODEL_KEYS},
        **{f"{key}_prompt_style": style_name(styles[key]) for key in MODEL_KEYS},
        "generation": generation,
    }
    common = {"test_data_sha256": sha256_file(test_data), "entries": len(entries), "generation": generation}
    output = Path(output_dir) / f"responses-{config_digest({**common, **meta})}.jsonl"
    if output.exists():
        _check_complete(output, entries)
        return ResponsesResult(output, len(entries), True, models)

    prompts = {key: [format_entry(styles[key], entry) for entry in entries] for key in MODEL_KEYS}
    progress = _Progress(len(entries) * len(MODEL_KEYS), on_progress)
    answers = {}
    for key, source in sources.items():
        log_path = _part_log(output, key)
        header = {**common, "model": models[key], "prompt_style": meta[f"{key}_prompt_style"]}
        answers[key] = _answer(source, styles[key], prompts[key], log_path, header, settings, progress)

    merged = [
        {
            **entry,
            **{key: answers[key][index] for key in MODEL_KEYS},
            **{f"{key}_prompt": prompts[key][index] for key in MODEL_KEYS},
            **meta,
        }
        for index, entry in enumerate(entries)
    ]
    write_jsonl(output, merged)
    for key in MODEL_KEYS:
        _part_log(output, key).unlink(missing_ok=True)
    return ResponsesResult(output, len(entries), False, models)


def _part_log(output: Path, key: str) -> Path:
    return output.with_name(f"{output.stem}.{key}.partial.jsonl")


def _check_complete(output: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """The file is written whole (atomically), so anything but one record per entry is foreign to it."""
    records = read_jsonl(output)
    if len(records) != len(entries) or any(
        record.get("instruction") != entry["instruction"] or any(k not in record for k in MODEL_KEYS)
        for record, entry in zip(records, entries, strict=True)
    ):
        raise LogMismatchError(
            f"{output} is not a responses file for these test entries; delete it to regenerate"
        )


class _Progress:
    """Counts answers over both models for one ``(done, total)`` callback."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.total, self.done, self.callback = total, 0, callback

    def advance(self, count: int) -> None:
        self.done += count
        if self.callback and count:
            self.callback(self.done, self.total)


def _answer(
    model_ref: str | Path,
    style: Any,
    prompts: Sequence[str],
    log_path: Path,
    header: Mapping[str, Any],
    settings: GenerationConfig,
    progress: _Progress,
) -> list[str]:
    """One model's answers to every prompt, resuming its log; the model is loaded only if work is left.
    ``style`` (a LitGPT ``PromptStyle``) gives a LitGPT model its stop tokens and every answer its end."""
    from tqdm.auto import tqdm

    from groundup.instruct.litgpt_prompts import answer_format

    ending = answer_format(style)

    with ResumableLog(log_path, header) as log:
        todo = [index for index in range(len(prompts)) if index not in log.done]
        progress.advance(len(prompts) - len(todo))
        if todo:
            model = load_causal_lm(
                model_ref,
                accelerator=settings.accelerator,
                prompt_style=style,
                compile=settings.compile,
                lookahead=settings.lookahead,
            )
            name = Path(str(model_ref)).name or str(model_ref)
            with tqdm(
                total=len(prompts),
                initial=len(prompts) - len(todo),
                desc=f"Responses of {name}",
                disable=None,
            ) as bar:

                def persist(indices: list[int], texts: list[str]) -> None:
                    for index, text in zip(indices, texts, strict=True):
                        response = clean_response(text, prompts[index], ending)
                        log.append({"index": index, "response": response})
                    bar.update(len(indices))
                    progress.advance(len(indices))

                model.complete(
                    [prompts[index] for index in todo],
                    generation_sampling(settings),
                    batch_size=settings.batch_size,
                    ids=todo,
                    on_batch=persist,
                )
            del model
            _free_memory()
        by_index = {record["index"]: record["response"] for record in log.records}
    return [by_index[index] for index in range(len(prompts))]


def _free_memory() -> None:
    """Free a released model before the next one loads (GPU memory is not returned until collected)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
