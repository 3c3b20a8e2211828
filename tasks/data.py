"""Prefect tasks of the data stage: fetch the text, tokenize it into the Parquet token store, record both.

- ``download_text`` is retried, but only for failures that may pass (connection, timeout, 5xx); a 404, a
  wrong checksum or a file that is not UTF-8 text fails at once. It is not cached itself: what a URL serves
  may change, and everything downstream is keyed on the bytes that actually arrived.
- ``tokenize_to_parquet`` is cached on content: the same bytes with the same tokenizer are a hit wherever
  the file lies; one changed byte is a miss.
- ``record_corpus`` runs every time (it is cheap): the stage's MLflow run with the raw text and the
  Parquet file as dataset inputs, the corpus statistics, and a Prefect markdown summary.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from groundup import tracking
from groundup.config import DataConfig
from groundup.files import sha256_file
from groundup.tasks.common import StageResult, content_key, progress_reporter, retry_if_transient, stage_run
from groundup.text.corpus import fetch_text
from groundup.text.store import read_metadata, write_tokens
from groundup.text.tokenizers import get_tokenizer

STAGE = "data"
ARTIFACT_KEY = "data-corpus"


@dataclasses.dataclass
class DownloadedText(StageResult):
    """The text as it arrived: a local file, its digest and size, and where it came from."""

    path: str
    sha256: str
    size: int
    source: str


@dataclasses.dataclass
class TokenizedText(StageResult):
    """The Parquet token store written from a text, and the corpus statistics read back from it."""

    parquet: str
    parquet_sha256: str
    text_sha256: str
    tokenizer: str
    tokens: int
    characters: int
    unique_tokens: int
    tokenize_seconds: float


@dataclasses.dataclass
class CorpusRecord(StageResult):
    """The data stage's MLflow run and the corpus summary it logged (also a Prefect artifact)."""

    run_id: str
    markdown: str


@task(name="download_text", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)
def download_text(
    source: str,
    output_dir: str = "artifacts",
    sha256: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> DownloadedText:
    """The text at ``source`` (URL or path), checked to be non-empty UTF-8, in ``<output_dir>/downloads``
    (local paths are used in place). ``retries``/``backoff``/``timeout`` are per download attempt."""
    fetched = fetch_text(
        source, Path(output_dir) / "downloads", sha256=sha256, retries=retries, backoff=backoff, timeout=timeout
    )
    return DownloadedText(path=str(fetched.path), sha256=fetched.sha256, size=fetched.size, source=source)


def parquet_name(text_path: Path, text_sha256: str, tokenizer: str) -> str:
    """Readable and content-addressed: the same text and tokenizer always map to the same file."""
    return f"{text_path.stem}-{text_sha256[:12]}-{tokenizer}.parquet"


@task(name="tokenize_to_parquet", cache_key_fn=content_key, persist_result=True)
def tokenize_to_parquet(
    text_path: str,
    tokenizer: str = "gpt2",
    vocab_dir: str | None = None,
    output_dir: str = "artifacts",
) -> TokenizedText:
    """Tokenize the text file into ``<output_dir>/data/<name>-<sha256>-<tokenizer>.parquet``."""
    text = Path(text_path)
    dest = Path(output_dir) / "data" / parquet_name(text, sha256_file(text), tokenizer)
    started = time.perf_counter()
    write_tokens(text, dest, tokenizer, vocab_dir=vocab_dir, on_progress=progress_reporter(f"tokenizing {text.name}"))
    seconds = time.perf_counter() - started
    metadata = read_metadata(dest)
    return TokenizedText(
        parquet=str(dest),
        parquet_sha256=sha256_file(dest),
        text_sha256=metadata["source_sha256"],
        tokenizer=tokenizer,
        tokens=metadata["tokens"],
        characters=metadata["characters"],
        unique_tokens=metadata["unique_tokens"],
        tokenize_seconds=seconds,
    )


def _token_text(tokenizer, token_id: int) -> str:
    """A token as a markdown table cell: quoted, escapes visible (``"\\n"``), pipes escaped."""
    text = tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
    return "`" + json.dumps(text, ensure_ascii=False).replace("|", "\\|").replace("`", "'") + "`"


def corpus_markdown(source: str, text: DownloadedText, metadata: dict[str, Any], parquet: TokenizedText,
                    train_ratio: float, vocab_dir: str | None) -> str:  # fmt: skip
    tokenizer = get_tokenizer(metadata["tokenizer"], vocab_dir)
    tokens = metadata["tokens"]
    split = int(train_ratio * tokens)
    rows = "\n".join(
        f"| {rank} | {token_id} | {_token_text(tokenizer, token_id)} | {count:,} | {count / tokens:.2%} |"
        for rank, (token_id, count) in enumerate(metadata["top_tokens"], start=1)
    )
    return (
        f"# Corpus: {Path(text.path).name}\n\n"
        f"| | |\n| --- | --- |\n"
        f"| source | `{source}` |\n"
        f"| text | `{text.path}` ({text.size:,} bytes, sha256 `{text.sha256[:16]}…`) |\n"
        f"| characters | {metadata['characters']:,} |\n"
        f"| tokens | {tokens:,} ({metadata['tokenizer']}, vocabulary {metadata['vocab_size']:,}) |\n"
        f"| unique tokens | {metadata['unique_tokens']:,} |\n"
        f"| documents | {metadata['documents']:,} |\n"
        f"| train / validation tokens (ratio {train_ratio}) | {split:,} / {tokens - split:,} |\n"
        f"| Parquet | `{parquet.parquet}` ({metadata['dtype']}, sha256 `{parquet.parquet_sha256[:16]}…`) |\n\n"
        f"## Most frequent tokens\n\n| rank | id | token | count | share |\n| ---: | ---: | --- | ---: | ---: |\n{rows}\n"
    )


@task(name="record_corpus")
def record_corpus(
    config: DataConfig,
    text: DownloadedText,
    parquet: TokenizedText,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> CorpusRecord:
    """Log the corpus to MLflow (datasets with digests, statistics) and summarise it as a Prefect artifact."""
    metadata = read_metadata(parquet.parquet)
    markdown = corpus_markdown(config.source, text, metadata, parquet, config.train_ratio, config.vocab_dir)
    remote = config.source if config.source.startswith(("http://", "https://")) else None
    with stage_run(STAGE, config=config, parent_run_id=parent_run_id, output_dir=output_dir, experiment=experiment) as run:
        run.log_dataset(text.path, name=Path(text.path).name, digest=text.sha256, context="training", source=remote)
        run.log_dataset(parquet.parquet, name=Path(parquet.parquet).name, digest=parquet.parquet_sha256)
        run.log_params({"text_path": text.path, "parquet_path": parquet.parquet, "dtype": metadata["dtype"]})
        split = int(config.train_ratio * metadata["tokens"])
        run.log_metrics({
            "characters": metadata["characters"],
            "tokens": metadata["tokens"],
            "unique_tokens": metadata["unique_tokens"],
            "documents": metadata["documents"],
            "train_tokens": split,
            "val_tokens": metadata["tokens"] - split,
            "tokenize_seconds": parquet.tokenize_seconds,
        })
        run.log_text(markdown, "corpus.md")
        create_markdown_artifact(key=ARTIFACT_KEY, markdown=markdown, description="the tokenized pretraining corpus")
        return CorpusRecord(run_id=run.run_id, markdown=markdown)
