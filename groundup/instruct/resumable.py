"""JSON Lines logs written record by record, so a long run that is interrupted resumes where it stopped.

The first line of a log is a header naming what the records were computed with (model ids, settings); a
rerun with a different header is refused instead of silently mixing two runs' records in one file. Every
record is flushed and fsynced as soon as it is written; a process killed mid-line leaves a torn last line,
which is cut off when the log is reopened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from groundup.errors import InputDataError
from groundup.files import atomic_open

HEADER_KEY = "__header__"


class LogMismatchError(InputDataError):
    """A log on disk that was written for other inputs or settings, or is not a log at all."""


def _dump(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def _canonical(value: Any) -> Any:
    """JSON round trip, so a header compares equal to its stored form (tuples become lists, etc.)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a complete JSON Lines file; a malformed line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LogMismatchError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    return records


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write a whole JSON Lines file atomically (a reader never sees half of it)."""
    with atomic_open(path) as fh:
        for record in records:
            fh.write(_dump(record) + "\n")
    return Path(path)


class ResumableLog:
    """An append-only JSON Lines log of records keyed by ``key``, opened as a context manager.

    ``records`` holds what earlier runs already wrote (in file order); ``done`` their keys.
    """

    def __init__(self, path: str | Path, header: Mapping[str, Any], key: str = "index") -> None:
        self.path = Path(path)
        self.header = _canonical(dict(header))
        self.key = key
        self.records: list[dict[str, Any]] = []
        self._fh: IO[str] | None = None

    @property
    def done(self) -> set[Any]:
        return {record[self.key] for record in self.records}

    def __enter__(self) -> ResumableLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.records = self._recover()
        else:
            with atomic_open(self.path) as fh:
                fh.write(_dump({HEADER_KEY: self.header}) + "\n")
        self._fh = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def append(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            raise RuntimeError(f"{self.path}: log is not open")
        if self.key not in record:
            raise ValueError(f"{self.path}: record has no {self.key!r} key: {sorted(record)}")
        self._fh.write(_dump(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.append(dict(record))

    def _recover(self) -> list[dict[str, Any]]:
        """Read an existing log: check its header, cut a torn last line, return its records."""
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        if not lines:
            raise LogMismatchError(f"{self.path}: empty log without a header; delete it to start over")
        try:
            header = json.loads(lines[0]).get(HEADER_KEY)
        except (json.JSONDecodeError, AttributeError):
            header = None
        if header is None:
            raise LogMismatchError(f"{self.path}: not a resumable log (its first line is no header)")
        if header != self.header:
            differing = sorted(k for k in {*header, *self.header} if header.get(k) != self.header.get(k))
            raise LogMismatchError(
                f"{self.path} was written for different inputs or settings ({', '.join(differing)} differ); "
                "delete it or choose another output path"
            )
        records = []
        for number, line in enumerate(lines[1:], 2):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LogMismatchError(f"{self.path}: line {number} is not valid JSON ({exc.msg})") from None
        return records

