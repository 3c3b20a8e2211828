"""Pretraining text: fetched through :mod:`groundup.download`, then checked to be non-empty UTF-8.

Reading is streamed (:func:`iter_text`), so a corpus far larger than memory can be checked and tokenized;
an invalid byte is reported with the file and its offset, not as a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import codecs
import shutil
from collections.abc import Iterator
from pathlib import Path

from groundup.download import Fetched, fetch, local_path
from groundup.errors import InputDataError
from groundup.files import CHUNK


class CorpusError(InputDataError):
    """A text source that is not usable as a corpus (empty, not UTF-8); the message names it."""


def iter_text(path: str | Path, *, name: str | None = None, chunk_bytes: int = CHUNK) -> Iterator[str]:
    """Decode a UTF-8 file block by block (multi-byte characters may straddle blocks).

    Invalid UTF-8 raises :class:`CorpusError` naming ``name`` (default: the path) and the byte offset.
    """
    label = name or str(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                # exc.start counts from the undecoded bytes the decoder still held from the last block.
                held = len(exc.object) - len(block)
                position = offset - held + exc.start
                raise CorpusError(
                    f"{label}: not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x} at offset {position})"
                ) from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)


def check_text_file(path: str | Path, name: str | None = None) -> None:
    """Raise :class:`CorpusError` unless ``path`` is a non-empty UTF-8 text file."""
    label = name or str(path)
    if Path(path).stat().st_size == 0:
        raise CorpusError(f"{label}: the file is empty")
    for _ in iter_text(path, name=label):
        pass


def fetch_text(source: str, cache_dir: str | Path, sha256: str | None = None, **download_options) -> Fetched:
    """Fetch ``source`` (URL or path) into the content-addressed ``cache_dir`` and check it is usable text.

    ``download_options`` go to :func:`groundup.download.fetch` (retries, backoff, timeout, mirrors...).
    A downloaded file that fails the check is removed from the cache again; a local file used in place is
    of course left alone.
    """
    fetched = fetch(source, cache_dir, sha256=sha256, **download_options)
    try:
        check_text_file(fetched.path, name=source)
    except CorpusError:
        if _is_cached_copy(source, fetched.path, Path(cache_dir)):
            shutil.rmtree(fetched.path.parent, ignore_errors=True)
        raise
    return fetched


def _is_cached_copy(source: str, path: Path, cache_dir: Path) -> bool:
    local = local_path(source)
    if local is not None and not str(source).startswith("file:"):
        return False  # a plain path is used in place, never copied
    return path.resolve().is_relative_to(cache_dir.resolve())

