"""The token store: a corpus as GPT-2 token ids in one Parquet file, written in bounded memory.

Layout: a single non-null column ``token_ids`` (``uint16`` while the vocabulary fits, else ``uint32``) in
row groups of ``row_group_size`` tokens, zstd-compressed. Documents follow each other separated by one
``<|endoftext|>`` id. The file's key-value metadata ``groundup.tokens`` holds a JSON object: tokenizer name,
vocabulary size, end-of-text id, token/character/document counts, the sources' sha256 digests, and the
number of distinct tokens and the most frequent ones (for summaries without rereading the tokens).

Streaming: text is read in blocks, re-cut into pieces only where GPT-2's pre-tokenizer is certain to start
a new pre-token (see :data:`SAFE_CUT`), and the pieces are encoded on a thread pool (tiktoken releases
the GIL) while earlier ones are written. Reading back gives exactly ``encoding.encode(text,
allowed_special={"<|endoftext|>"}, disallowed_special=())`` for each document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from tqdm.auto import tqdm

from groundup.errors import InputDataError
from groundup.files import atomic_path
from groundup.text.corpus import CorpusError, iter_text
from groundup.text.tokenizers import END_OF_TEXT, get_tokenizer

COLUMN = "token_ids"
METADATA_KEY = b"groundup.tokens"
FORMAT = 1
TOP_TOKENS = 20
MAX_LISTED_SOURCES = 1000

# Where a text may be cut without changing its GPT-2 tokens: before a lone whitespace character between
# two visible ones. GPT-2's pre-tokenizer ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s)
# ends a pre-token of visible characters at the first whitespace, and a lone " " or "\n" before a visible
# character starts the next one (" word", or "\n" alone) - in the whole text and in either piece alike.
# Whitespace runs are never cut: at the end of a piece \s+$ would make "\n\n" one pre-token where the whole
# text has two. Python's \S is narrower than the regex's (Python calls U+001C whitespace), which only
# forgoes some cuts, never makes a wrong one.
SAFE_CUT = re.compile(r"(?<=\S)(?=[ \t\n\r\f\v]\S)")

Progress = Callable[[int, int], None]


class TokenStoreError(InputDataError):
    """A file that is not a readable token store; the message names it."""


@dataclass
class Document:
    """One document to tokenize: a name (for metadata and errors) and its text in chunks of any size."""

    name: str
    chunks: Iterable[str]
    characters: int = 0
    size: int = 0  # UTF-8 bytes
    tokens: int = 0
    _sha256: Any = field(default_factory=hashlib.sha256, repr=False)

    def read(self, report: Callable[[int], None]) -> Iterator[str]:
        """The chunks, counted and hashed (the sha256 of a file's text is that of the file) as they pass."""
        for chunk in self.chunks:
            data = chunk.encode("utf-8")
            self._sha256.update(data)
            self.characters += len(chunk)
            self.size += len(data)
            report(len(data))
            yield chunk

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self._sha256.hexdigest(), "characters": self.characters, "tokens": self.tokens}


def _file_document(path: Path) -> Document:
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, expected a text file")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: the file is empty")
    return Document(name=str(path), chunks=iter_text(path))


def _as_documents(sources: Any) -> Iterator[Document]:
    """Paths (one or many) and :class:`Document` objects, in order."""
    if isinstance(sources, str | os.PathLike | Document):
        sources = [sources]
    for source in sources:
        yield source if isinstance(source, Document) else _file_document(Path(source))


def _total_bytes(sources: Any) -> int:
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if not isinstance(sources, list | tuple):
        return 0  # an iterator: don't consume it
    return sum(Path(s).stat().st_size for s in sources if isinstance(s, str | os.PathLike) and Path(s).is_file())


# ---------------------------------------------------------------------------------------------------------
# Cutting text into independently encodable pieces
# ---------------------------------------------------------------------------------------------------------


CUT_WINDOW = 4096  # how far before the target length a cut is looked for, before looking after it


def _find_cut(text: str, start: int, end: int, forward_from: int) -> int | None:
    """A safe cut in ``text`` after ``start``: the last one in the few thousand characters up to ``end``,
    else the first one from ``forward_from`` on, else None (more text is needed)."""
    last = None
    # endpos end + 2: the pattern's lookahead needs the two characters after a cut at ``end``.
    for match in SAFE_CUT.finditer(text, max(start + 1, end - CUT_WINDOW), end + 2):
        last = match.start()
    if last is not None:
        return last
    match = SAFE_CUT.search(text, max(forward_from, start + 1))
    return match.start() if match else None


def safe_pieces(chunks: Iterable[str], target: int = 1 << 18) -> Iterator[str]:
    """Re-cut text given in arbitrary chunks into pieces of about ``target`` characters (longer where no
    safe cut turns up) whose token ids, concatenated, are exactly those of the whole text."""
    buffer, start, scanned = "", 0, 0
    for chunk in chunks:
        buffer = buffer[start:] + chunk
        scanned, start = max(scanned - start, 0), 0
        while len(buffer) - start > target:
            cut = _find_cut(buffer, start, start + target, scanned)
            if cut is None:
                # Nothing up to here; the last two characters may still begin a cut once more text comes.
                scanned = len(buffer) - 2
                break
            yield buffer[start:cut]
            start, scanned = cut, 0
    if len(buffer) > start:
        yield buffer[start:]


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


class _RowGroupWriter:
    """Buffers token arrays and writes them as row groups of exactly ``row_group_size`` (the last: fewer)."""

    def __init__(self, path: Path, dtype: np.dtype, row_group_size: int) -> None:
        self.dtype, self.row_group_size = dtype, row_group_size
        self.schema = pa.schema([pa.field(COLUMN, pa.from_numpy_dtype(dtype), nullable=False)])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd", use_dictionary=False)
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def append(self, ids: np.ndarray) -> None:
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.pending_size += len(ids)
        if self.pending_size >= self.row_group_size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending_size:
            return
        ids = np.concatenate(self.pending)
        full = len(ids) if final else len(ids) - len(ids) % self.row_group_size
        for start in range(0, full, self.row_group_size):
            group = ids[start : start + self.row_group_size]
            table = pa.Table.from_arrays([pa.array(group)], schema=self.schema)
            self.writer.write_table(table, row_group_size=self.row_group_size)
        rest = ids[full:]
        self.pending = [rest] if len(rest) else []
        self.pending_size = len(rest)

    def close(self, metadata: dict[str, Any]) -> None:
        self._flush(final=True)
        self.writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()  # releases the file; the caller deletes it


def _encode_in_order(
    items: Iterable[tuple[Document, str | None]], encode: Callable[[str], np.ndarray], separator: np.ndarray,
    pool: ThreadPoolExecutor, lookahead: int,
) -> Iterator[tuple[Document, np.ndarray]]:
    """Encode pieces on ``pool`` with up to ``lookahead`` in flight, yielding results in input order.
    A ``None`` piece stands for the separator between two documents."""
    pending: deque[tuple[Document, Future | np.ndarray]] = deque()
    for document, piece in items:
        pending.append((document, separator if piece is None else pool.submit(encode, piece)))
        if len(pending) >= lookahead:
            document, result = pending.popleft()
            yield document, result if isinstance(result, np.ndarray) else result.result()
    while pending:
        document, result = pending.popleft()
        yield document, result if isinstance(result, np.ndarray) else result.result()


def _pieces(
    documents: Iterable[Document], target: int, seen: list[Document], report: Callable[[int], None]
) -> Iterator[tuple[Document, str | None]]:
    """Each document's safe pieces, a ``None`` between documents; ``seen`` collects the documents."""
    for index, document in enumerate(documents):
        seen.append(document)
        if index:
            yield document, None
        for piece in safe_pieces(document.read(report), target):
            yield document, piece


def _source_digest(summaries: list[dict[str, Any]]) -> str:
    """A single document's sha256, else the sha256 of the documents' digests, one per line."""
    if len(summaries) == 1:
        return summaries[0]["sha256"]
    return hashlib.sha256("\n".join(s["sha256"] for s in summaries).encode()).hexdigest()


def write_tokens(
    sources: str | os.PathLike | Document | Iterable[str | os.PathLike | Document],
    dest: str | Path,
    tokenizer_name: str = "gpt2",
    *,
    vocab_dir: str | Path | None = None,
    allowed_special: frozenset[str] = frozenset({END_OF_TEXT}),
    piece_chars: int = 1 << 18,
    row_group_size: int = 1 << 20,
    num_threads: int | None = None,
    on_progress: Progress | None = None,
) -> Path:
    """Tokenize UTF-8 text files (or :class:`Document` objects) into the Parquet token store ``dest``.

    Several sources become several documents joined by ``<|endoftext|>``. A literal ``<|endoftext|>``
    inside a text is that special token too (as in the workshop), unless ``allowed_special`` is empty.
    Memory stays bounded whatever the corpus size (about ``piece_chars`` x threads x a few bytes, plus one
    row group). ``on_progress(bytes_read, total_bytes)`` is called as files are read. ``dest`` appears, by
    rename, only once complete.
    """
    encoding = get_tokenizer(tokenizer_name, vocab_dir)
    dtype = np.dtype(np.uint16 if encoding.n_vocab <= 1 << 16 else np.uint32)
    threads = num_threads or min(8, os.cpu_count() or 1)
    total = _total_bytes(sources)
    done = [0]
    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc="tokenize", disable=not sys.stderr.isatty())

    def report(size: int) -> None:
        done[0] += size
        bar.update(size)
        if on_progress:
            on_progress(done[0], max(total, done[0]))

    def encode(piece: str) -> np.ndarray:
        return encoding.encode_to_numpy(piece, allowed_special=allowed_special, disallowed_special=())

    counts = np.zeros(encoding.n_vocab, dtype=np.int64)
    documents: list[Document] = []
    items = _pieces(_as_documents(sources), piece_chars, documents, report)
    separator = np.array([encoding.eot_token], dtype=np.uint32)
    with atomic_path(dest) as tmp, ThreadPoolExecutor(threads) as pool, bar:
        writer = _RowGroupWriter(tmp, dtype, row_group_size)
        try:
            for document, ids in _encode_in_order(items, encode, separator, pool, lookahead=2 * threads):
                writer.append(ids)
                counts += np.bincount(ids, minlength=encoding.n_vocab)
                if ids is not separator:
                    document.tokens += len(ids)
            if not any(d.characters for d in documents):
                raise CorpusError(f"{_describe(sources, documents)}: no text to tokenize")
        except BaseException:
            writer.abort()
            raise
        writer.close(_metadata(encoding, tokenizer_name, documents, counts, dtype, row_group_size))
    return Path(dest)


def _describe(sources: Any, documents: list[Document]) -> str:
    return ", ".join(d.name for d in documents[:3]) if documents else str(sources)


def _metadata(
    encoding: tiktoken.Encoding, tokenizer_name: str, documents: list[Document], counts: np.ndarray,
    dtype: np.dtype, row_group_size: int,
) -> dict[str, Any]:
    summaries = [d.summary() for d in documents]
    top = np.argsort(-counts, kind="stable")[:TOP_TOKENS]
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_name,
        "vocab_size": encoding.n_vocab,
        "eot_id": encoding.eot_token,
        "dtype": dtype.name,
        "row_group_size": row_group_size,
        "tokens": int(counts.sum()),
        "characters": sum(s["characters"] for s in summaries),
        "documents": len(summaries),
        "source_sha256": _source_digest(summaries),
        "sources": summaries[:MAX_LISTED_SOURCES],
        "unique_tokens": int(np.count_nonzero(counts)),
        "top_tokens": [[int(i), int(counts[i])] for i in top if counts[i]],
    }


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def _open(path: str | Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.exists():
        raise TokenStoreError(f"{path}: no such token file")
    if path.is_dir():
        raise TokenStoreError(f"{path}: is a directory, expected a Parquet token file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TokenStoreError(f"{path}: not a Parquet file ({exc})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """What :func:`write_tokens` recorded: tokenizer, vocab size, eot id, counts, source digests, top tokens."""
    raw = (_open(path).metadata.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TokenStoreError(f"{path}: a Parquet file without groundup token metadata")
    return json.loads(raw)


def read_tokens(path: str | Path) -> np.ndarray:
    """All token ids of the store, in order, in its compact dtype."""
    metadata = read_metadata(path)
    column = _open(path).read(columns=[COLUMN]).column(COLUMN)
    tokens = column.to_numpy()
    if len(tokens) != metadata["tokens"]:
        raise TokenStoreError(f"{path}: holds {len(tokens)} tokens, its metadata says {metadata['tokens']}")
    return tokens


def iter_token_batches(path: str | Path) -> Iterator[np.ndarray]:
    """The token ids row group by row group (for passes over corpora larger than memory)."""
    read_metadata(path)
    parquet = _open(path)
    for index in range(parquet.num_row_groups):
        yield parquet.read_row_group(index, columns=[COLUMN]).column(COLUMN).to_numpy()
