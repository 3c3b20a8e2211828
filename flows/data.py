"""Flow ``prepare-data``: the pretraining text downloaded, GPT-2 BPE tokenized into Parquet, and recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from groundup import tracking
from groundup.config import DataConfig
from groundup.flows.common import Stages, parent_run
from groundup.tasks.data import download_text, record_corpus, tokenize_to_parquet


@flow(name="prepare-data", log_prints=True)
def prepare_data(
    config: DataConfig = DataConfig(),
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Fetch ``config.source`` and tokenize it into ``<output_dir>/data/*.parquet``.

    Returns ``parquet`` (the token store), ``tokens``, ``text`` (the local text file), ``text_sha256``,
    ``parquet_sha256``, ``characters``, ``unique_tokens`` and the stage's MLflow ``run_id``.
    """
    output_dir = str(Path(output_dir).resolve())
    with parent_run(
        "prepare-data", config=config, output_dir=output_dir, experiment=experiment, parent_run_id=parent_run_id
    ) as run_id:
        stages = Stages()
        stages.submit("download_text", download_text, config.source, output_dir=output_dir, sha256=config.sha256)
        text = stages.result("download_text", "path")
        stages.submit("tokenize_to_parquet", tokenize_to_parquet, text["path"], config.tokenizer, config.vocab_dir, output_dir)
        tokens = stages.result("tokenize_to_parquet", "parquet")
        record = record_corpus(config, text, tokens, output_dir=output_dir, experiment=experiment, parent_run_id=run_id)
        print(f"{tokens['tokens']:,} tokens ({tokens['unique_tokens']:,} distinct) from {text['path']} -> {tokens['parquet']}")
        return {
            "parquet": tokens["parquet"],
            "tokens": tokens["tokens"],
            "text": text["path"],
            "text_sha256": text["sha256"],
            "parquet_sha256": tokens["parquet_sha256"],
            "characters": tokens["characters"],
            "unique_tokens": tokens["unique_tokens"],
            "run_id": record["run_id"],
        }
