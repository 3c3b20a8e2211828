"""Prefect task ``fetch_gpt2_weights``: GPT-2 weights fetched, converted into our model, tracked, registered.

Cached on content: the settings plus, for a local ``from_dir``, the files in it. Downloads themselves are
cached too (OpenAI's files checked against the digests recorded at the first download, the Hugging Face
Hub's own cache), and a checkpoint already converted from the same source files is not converted again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from groundup import tracking
from groundup.config import WeightsConfig
from groundup.tasks.common import (
    StageResult,
    content_key_with,
    progress_reporter,
    retry_if_transient,
    stage_run,
)
from groundup.weights import ConvertedGPT2, prepare_gpt2

STAGE = "gpt2_weights"


@dataclasses.dataclass
class FetchedGPT2(StageResult):
    """GPT-2 converted into our model: the checkpoint, its registered version and the source it came from."""

    checkpoint: str
    model_version: str  # ``gpt2-124m/N``
    model_name: str
    parent: str  # the source (``openai:124M``, ``hf:gpt2``, ``dir:...``), the version's lineage parent
    source_format: str
    source_digest: str
    converted: bool  # False when a checkpoint converted from the same source files was reused
    n_parameters: int
    smoke_text: str
    run_id: str


def _markdown_summary(result: ConvertedGPT2, model_ref: str) -> str:
    cfg = result.config
    rows = "\n".join(f"| {f.name} | {f.size:,} | `{f.sha256[:16]}…` | {f.location} |" for f in result.source.files)
    return (
        f"# GPT-2 weights: {model_ref}\n\n"
        f"Source **{result.source.parent}** ({result.source.format} format"
        + (f", revision `{result.source.revision}`" if result.source.revision else "")
        + f") → `{result.checkpoint}`\n\n"
        f"{cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, context {cfg.context_length}, "
        f"vocab {cfg.vocab_size}\n\n"
        f"| file | bytes | sha256 | from |\n| --- | ---: | --- | --- |\n{rows}\n\n"
        f"Greedy smoke generation:\n\n> {result.smoke_text!r}\n"
    )


@task(
    name="fetch_gpt2_weights",
    cache_key_fn=content_key_with("config.from_dir"),
    persist_result=True,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
)
def fetch_gpt2_weights(
    config: WeightsConfig,
    output_dir: str = "artifacts",
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    out_dir: str | None = None,
) -> FetchedGPT2:
    """Fetch and convert the GPT-2 ``config`` names into ``out_dir`` (default ``<output_dir>/models/...``),
    log its source files as datasets and register it (``gpt2-124m`` …) with the source as its parent."""
    out = Path(output_dir).resolve()
    with stage_run(STAGE, config=config, parent_run_id=parent_run_id, output_dir=out, experiment=experiment) as run:
        result = prepare_gpt2(
            config,
            download_dir=out / "downloads" / "gpt2",
            models_dir=out / "models",
            out_dir=out_dir,
            on_progress=progress_reporter("GPT-2 weights: files fetched"),
        )
        source = result.source
        for f in source.files:
            run.log_dataset(source.directory / f.name, name=f.name, digest=f.sha256, context="weights", source=f.location)
        run.log_params({
            "source_format": source.format,
            "source_parent": source.parent,
            "source_revision": source.revision,
            "source_digest": source.digest,
            "checkpoint": str(result.checkpoint),
            "model": result.config.to_dict(),
        })
        run.log_metrics({
            "n_parameters": result.n_parameters,
            "source_bytes": sum(f.size for f in source.files),
            **{f"{step}_seconds": value for step, value in result.seconds.items()},
        })
        run.log_text(result.smoke_text, "smoke_generation.txt")
        version = run.register_directory(
            result.checkpoint,
            result.name,
            parent=source.parent,
            datasets={f.name: f.sha256 for f in source.files},
            params={"model": result.config.to_dict(), "source_format": source.format},
            tags={
                tracking.TAG + "source_digest": source.digest,
                **({tracking.TAG + "source_revision": source.revision} if source.revision else {}),
                **{f"{tracking.TAG}source_url.{f.name}": f.location for f in source.files},
            },
        )
        model_ref = tracking.version_ref(version)
        create_markdown_artifact(
            key="gpt2-weights", markdown=_markdown_summary(result, model_ref), description="GPT-2 weights"
        )
        return FetchedGPT2(
            checkpoint=str(result.checkpoint),
            model_version=model_ref,
            model_name=result.name,
            parent=source.parent,
            source_format=source.format,
            source_digest=source.digest,
            converted=result.converted,
            n_parameters=result.n_parameters,
            smoke_text=result.smoke_text,
            run_id=run.run_id,
        )
