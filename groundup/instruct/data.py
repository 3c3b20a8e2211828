"""Instruction data: fetch, validate, split into train/test (and a validation share of train), write.

An entry is an object with string ``instruction``, ``input`` (may be empty) and ``output``; other keys are
kept as they are. The split is the workshop's: the first ``train_fraction`` of the entries (rounded down)
train, the rest test — 935/165 of the 1100 workshop entries — optionally after a seeded shuffle.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groundup.config import InstructDataConfig
from groundup.download import fetch
from groundup.errors import InputDataError
from groundup.files import atomic_path, sha256_file, write_json

REQUIRED_FIELDS = ("instruction", "input", "output")
# ``input`` is the only field that may be empty: many instructions need no input.
NON_EMPTY_FIELDS = ("instruction", "output")
MAX_LISTED_PROBLEMS = 50

Entry = dict[str, Any]


class InstructionDataError(InputDataError):
    """Instruction data that cannot be used; the message names the source and every problem found."""


@dataclass(frozen=True)
class InstructionSplit:
    """Where a split was written and what is in it."""

    source: str
    source_sha256: str
    train: Path
    test: Path
    n_train: int
    n_test: int
    train_sha256: str
    test_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "train": str(self.train), "test": str(self.test)}


# ---------------------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------------------


def parse_entries(path: Path, source: str | None = None) -> Any:
    """Parse a JSON document or JSON Lines (one object per line); syntax errors name the line and column."""
    name = source or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InstructionDataError(f"instruction data {name!r} is not UTF-8 text: {exc}") from None
    except (FileNotFoundError, IsADirectoryError):
        raise InstructionDataError(f"instruction data {name!r}: no such file") from None
    if not text.strip():
        raise InstructionDataError(f"instruction data {name!r} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        whole_document_error = exc
    # Not one JSON document: maybe JSON Lines. Only report JSONL errors if the first line parses as an object.
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        first = json.loads(lines[0][1])
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict):
        exc = whole_document_error
        raise InstructionDataError(
            f"instruction data {name!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    entries, problems = [], []
    for number, line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: {exc.msg} at column {exc.colno}")
    if problems:
        raise InstructionDataError(_problem_message(name, "is not valid JSON Lines", problems))
    return entries


def entry_problems(index: int, entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return [f"entry {index}: expected an object, got {type(entry).__name__}"]
    problems = []
    for field in REQUIRED_FIELDS:
        if field not in entry:
            problems.append(f"entry {index}: field {field!r} is missing")
        elif not isinstance(entry[field], str):
            problems.append(
                f"entry {index}: field {field!r} must be a string, got {type(entry[field]).__name__}"
            )
        elif field in NON_EMPTY_FIELDS and not entry[field].strip():
            problems.append(f"entry {index}: field {field!r} is empty")
    return problems


def validate_entries(data: Any, source: str) -> list[Entry]:
    """Return ``data`` as a list of entries, or raise listing every problem (entry index and field)."""
    if not isinstance(data, list):
        raise InstructionDataError(
            f"instruction data {source!r} must be a list of objects, got {type(data).__name__}"
        )
    if not data:
        raise InstructionDataError(f"instruction data {source!r} has no entries")
    problems = [problem for index, entry in enumerate(data) for problem in entry_problems(index, entry)]
    if problems:
        raise InstructionDataError(_problem_message(source, f"has {len(problems)} problem(s)", problems))
    return data


def _problem_message(source: str, summary: str, problems: Sequence[str]) -> str:
    shown = list(problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    return f"instruction data {source!r} {summary}:\n  " + "\n  ".join(shown)


def load_entries(path: str | Path, source: str | None = None) -> list[Entry]:
    """Read and validate a local JSON / JSON Lines file of entries."""
    path = Path(path)
    return validate_entries(parse_entries(path, source), source or str(path))


# ---------------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------------


def split_entries(
    entries: Sequence[Entry], train_fraction: float = 0.85, *, shuffle: bool = False, seed: int = 123
) -> tuple[list[Entry], list[Entry]]:
    """The workshop's split: ``int(n * train_fraction)`` entries train, the rest test."""
    ordered = list(entries)
    if shuffle:
        random.Random(seed).shuffle(ordered)
    n_train = int(len(ordered) * train_fraction)
    if n_train == 0 or n_train == len(ordered):
        empty = "training" if n_train == 0 else "test"
        raise InstructionDataError(
            f"splitting {len(ordered)} entries with train_fraction={train_fraction} leaves the {empty} set "
            "empty; use more entries or another train_fraction"
        )
    return ordered[:n_train], ordered[n_train:]


def holdout_validation(
    entries: Sequence[Entry], fraction: float, seed: int = 123
) -> tuple[list[Entry], list[Entry]]:
    """Set aside ``fraction`` of the training entries (at least one, chosen with ``seed``) for validation.

    Both finetuning engines call this, so they validate on the same entries. Order is kept in both parts.
    """
    if fraction <= 0:
        return list(entries), []
    n_val = max(1, round(len(entries) * fraction))
    if n_val >= len(entries):
        raise InstructionDataError(
            f"a validation fraction of {fraction} of {len(entries)} training entries leaves none to train on"
        )
    chosen = set(random.Random(seed).sample(range(len(entries)), n_val))
    fit = [entry for index, entry in enumerate(entries) if index not in chosen]
    val = [entry for index, entry in enumerate(entries) if index in chosen]
    return fit, val


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def prepare_instruction_data(
    config: InstructDataConfig, out_dir: str | Path, cache_dir: str | Path
) -> InstructionSplit:
    """Fetch ``config.source`` (into ``cache_dir`` if remote), validate, split and write ``train.json`` and
    ``test.json`` into ``out_dir``. Invalid data raises before anything is written; each file appears whole."""
    fetched = fetch(config.source, cache_dir, sha256=config.sha256)
    entries = load_entries(fetched.path, config.source)
    if config.limit is not None:
        entries = entries[: config.limit]
    train, test = split_entries(entries, config.train_fraction, shuffle=config.shuffle, seed=config.seed)
    out = Path(out_dir)
    train_path = write_json(out / "train.json", train, indent=4)
    test_path = write_json(out / "test.json", test, indent=4)
    return InstructionSplit(
        source=config.source,
        source_sha256=fetched.sha256,
        train=train_path.resolve(),
        test=test_path.resolve(),
        n_train=len(train),
        n_test=len(test),
        train_sha256=sha256_file(train_path),
        test_sha256=sha256_file(test_path),
    )


def copy_split(split: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Copy a written split's ``train.json`` and ``test.json`` into ``out_dir``; returns the new paths."""
    copies = {}
    for part in ("train", "test"):
        destination = Path(out_dir).resolve() / f"{part}.json"
        with atomic_path(destination) as tmp:
            shutil.copyfile(split[part], tmp)
        copies[part] = str(destination)
    return copies
