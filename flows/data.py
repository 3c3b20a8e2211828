"""Flow ``prepare-data``: the pretraining text downloaded, GPT-2 BPE tokenized into Parquet, and recorded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from groundup import tracking
from groundup.config import DataConfig
from groundup.flows.common import Stages, stage_context
from groundup.tasks.common import StageResult
from groundup.tasks.data import (
    CorpusRecord,
    DownloadedText,
    TokenizedText,
    download_text,
    record_corpus,
    tokenize_to_parquet,
)


@dataclasses.dataclass
class PreparedData(StageResult):
    """The data stage's three results: the local text, its Parquet token store, the corpus's MLflow run."""

    text: DownloadedText
    tokens: TokenizedText
    corpus: CorpusRecord


@flow(name="prepare-data", log_prints=True)
def prepare_data(
    config: DataConfig = DataConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> PreparedData:
    """Fetch ``config.source`` and tokenize it into ``<output_dir>/data/*.parquet``.

    Returns ``text`` (the local file, its sha256), ``tokens`` (``parquet``, its sha256, ``tokens``,
    ``characters``, ``unique_tokens``) and ``corpus`` (the stage's MLflow ``run_id``).
    """
    output_dir = str(Path(output_dir).resolve())
    with stage_context(
        "prepare-data", config=config, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as context:
        stages = Stages()
        stages.submit("download_text", download_text, config.source, output_dir=output_dir, sha256=config.sha256)
        text = stages.result("download_text", "path")
        stages.submit("tokenize_to_parquet", tokenize_to_parquet, text.path, config.tokenizer, config.vocab_dir, output_dir)
        tokens = stages.result("tokenize_to_parquet", "parquet")
        corpus = record_corpus(config, text, tokens, **context.kwargs)
        print(f"{tokens.tokens:,} tokens ({tokens.unique_tokens:,} distinct) from {text.path} -> {tokens.parquet}")
        return PreparedData(text=text, tokens=tokens, corpus=corpus)
