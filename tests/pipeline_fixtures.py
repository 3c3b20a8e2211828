"""Builders the pipeline tests share: the smallest settings that run every stage for real, offline."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TEXT_CHARS = 6000  # enough of the-verdict for a few training windows of the tiny model


def judge_reply(messages: list[dict[str, str]]) -> str:
    """A deterministic stand-in judge that knows right from wrong (its controls pass): the reference answer
    scores 90-100, any other answer 0-79, by a digest of the whole prompt (so of the response)."""
    prompt = messages[-1]["content"]
    response = prompt.split("score the model response `", 1)[1].split("` on a scale", 1)[0]
    correct = prompt.split("correct output `", 1)[1].split("`, score the model", 1)[0]
    digest = sum(map(ord, prompt))
    return str(90 + digest % 11 if response == correct else digest % 80)


def sources_dir(directory: Path, verdict: Path, instructions: Path, vocab_dir: Path, gpt2_dir: Path) -> Path:
    """A sources dir laid out as ``groundup run --sources-dir`` expects: the text (shortened, and ours to
    edit), the instruction data, the GPT-2 BPE files in ``vocab/gpt2`` and a GPT-2 checkpoint in ``gpt2``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "the-verdict.txt").write_text(verdict.read_text(encoding="utf-8")[:TEXT_CHARS], encoding="utf-8")
    shutil.copyfile(instructions, directory / "instruction-data.json")
    shutil.copytree(vocab_dir, directory / "vocab" / "gpt2")
    shutil.copytree(gpt2_dir, directory / "gpt2")
    return directory


def tiny_gpt2_dir(directory: Path) -> Path:
    """A tiny random GPT-2 (real vocabulary) in Hugging Face format, as a local weights source."""
    from tests.gpt2_fixtures import save_hf, tiny_gpt2

    return save_hf(tiny_gpt2(), directory)


def tiny_overrides(output_dir: Path, judge_url: str) -> list[str]:
    """``--set`` overrides on top of the quickstart profile and the local sources: tiny and fast."""
    return [
        f"output_dir={output_dir}",
        "experiment=pipeline-test",
        "model.preset=gpt-tiny",
        "model.context_length=32",
        "train.epochs=1",
        "train.max_steps=4",
        "train.eval_freq=2",
        "train.eval_iter=1",
        "train.sample_tokens=4",
        "train.checkpoint_every=2",
        "train.runtime.accelerator=cpu",
        "instruct.limit=24",
        "finetune.engine=groundup",
        "finetune.base=gpt2-124M",
        "finetune.max_steps=2",
        "finetune.micro_batch_size=4",
        "finetune.global_batch_size=4",
        "finetune.eval_interval=2",
        "finetune.max_seq_length=64",
        "finetune.runtime.accelerator=cpu",
        "generation.max_new_tokens=3",
        "generation.limit=3",
        "generation.accelerator=cpu",
        "judge.enabled=true",
        "judge.backend=openai-compatible",
        "judge.model=judge",
        f"judge.base_url={judge_url}",
        "judge.max_new_tokens=4",
        "judge.bootstrap_samples=100",
        "judge.retries=0",
    ]


def tiny_config(sources: Path, output_dir: Path, judge_url: str, extra: list[str] | None = None) -> Any:
    from groundup.config import PipelineConfig, load_config, local_sources

    overrides = [*local_sources(sources), *tiny_overrides(output_dir, judge_url), *(extra or [])]
    return load_config(PipelineConfig, "quickstart", overrides)


# Prefect records task-run states from events, after the flow run has returned: read them until they settle.
UNSETTLED = {"Scheduled", "Pending", "Running", "Retrying", "AwaitingRetry"}


def settled_states(
    read: Callable[[], dict[str, str]], expected: Iterable[str] = (), timeout: float = 120.0
) -> dict[str, str]:
    """``read()`` (task run name -> state name) once every ``expected`` name is there, no state is still
    in flight, and two reads agree; the last read if that takes longer than ``timeout``."""
    expected, deadline, last = set(expected), time.monotonic() + timeout, None
    while True:
        states = read()
        if expected <= set(states) and not UNSETTLED & set(states.values()) and states == last:
            return states
        if time.monotonic() > deadline:
            return states
        last = states
        time.sleep(1)
