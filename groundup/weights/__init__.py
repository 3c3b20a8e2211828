"""Pretrained GPT-2 weights in our from-scratch model.

Fetch a checkpoint (OpenAI's TensorFlow files, ``openai-community/gpt2*`` from the Hugging Face Hub, or a
local directory in either format), convert it into a groundup checkpoint (``model.safetensors`` +
``config.json`` recording the source files and their digests), and check it with a greedy generation::

    result = prepare_gpt2(WeightsConfig(size="124M"), download_dir="artifacts/downloads/gpt2",
                          models_dir="artifacts/models")
    model = groundup.model.io.load_checkpoint(result.checkpoint)

The model's shape comes from the checkpoint's own ``hparams.json`` / ``config.json``, so any GPT-2-shaped
checkpoint converts, OpenAI's four sizes and small ones alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from groundup.config import WeightsConfig
from groundup.files import atomic_directory
from groundup.model.gpt import GPTConfig
from groundup.model.io import WEIGHTS_FILE, CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from groundup.model.io import read_config as read_checkpoint_config
from groundup.weights.convert import build_model, model_name, parameter_count, size_of
from groundup.weights.fetch import fetch_gpt2, read_config, read_weights
from groundup.weights.source import SourceCheckpoint, WeightsError

__all__ = [
    "SMOKE_PROMPT",
    "SMOKE_TOKENS",
    "ConvertedGPT2",
    "WeightsError",
    "convert_checkpoint",
    "prepare_gpt2",
    "smoke_generate",
]

log = logging.getLogger(__name__)

SMOKE_PROMPT = "Every effort moves you"
SMOKE_TOKENS = 10


@dataclass(frozen=True)
class ConvertedGPT2:
    checkpoint: Path
    name: str  # registry name: gpt2-124m … or gpt2-custom
    config: GPTConfig
    n_parameters: int
    source: SourceCheckpoint
    converted: bool  # False when the same source files had already been converted there
    smoke_text: str
    seconds: dict[str, float] = field(default_factory=dict)


def is_conversion_of(directory: Path, source: SourceCheckpoint) -> bool:
    """Whether ``directory`` already holds a complete conversion of exactly these source files."""
    try:
        metadata = read_metadata(directory)
    except (OSError, ValueError):
        return False
    return (directory / WEIGHTS_FILE).is_file() and metadata.get("source", {}).get("digest") == source.digest


def _check_replaceable(directory: Path) -> None:
    """Only an earlier checkpoint (or an empty folder) may be replaced, never a folder of other files."""
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return
    try:
        read_checkpoint_config(directory)
    except CheckpointError:
        raise WeightsError(f"{directory}: exists and is not a groundup checkpoint; not replacing it") from None


def convert_checkpoint(source: SourceCheckpoint, out_dir: str | Path) -> Path:
    """Read, convert and write ``source`` as a groundup checkpoint in ``out_dir`` (replaced as a whole)."""
    _check_replaceable(Path(out_dir))
    model = build_model(read_weights(source))
    # Two runs converting the same source (content-addressed name) at once: the first one published stays.
    with atomic_directory(out_dir, keep=lambda published: is_conversion_of(published, source)) as staging:
        save_checkpoint(model, staging, {"tokenizer": "gpt2", "source": source.to_dict()})
    return Path(out_dir)


def smoke_generate(checkpoint: str | Path, vocab_dir: str | Path | None = None) -> str:
    """The workshop's check: greedy "Every effort moves you" for 10 tokens, from the checkpoint on disk."""
    from groundup.model.generate import generate
    from groundup.text.tokenizers import get_tokenizer, text_to_token_ids, token_ids_to_text

    model = load_checkpoint(checkpoint)
    tokenizer = get_tokenizer("gpt2", vocab_dir)
    ids = generate(model, text_to_token_ids(SMOKE_PROMPT, tokenizer), SMOKE_TOKENS)
    return token_ids_to_text(ids, tokenizer)


def _bpe_dir(source: SourceCheckpoint) -> Path | None:
    """OpenAI ships the BPE files with the weights; otherwise the tokenizer's own default applies."""
    has_bpe = all((source.directory / name).is_file() for name in ("encoder.json", "vocab.bpe"))
    return source.directory if has_bpe else None


def prepare_gpt2(
    config: WeightsConfig,
    *,
    download_dir: str | Path,
    models_dir: str | Path,
    out_dir: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ConvertedGPT2:
    """Fetch, convert (unless already converted) and smoke-test the GPT-2 ``config`` asks for.

    The checkpoint goes to ``out_dir``, else to ``models_dir/<name>-<source digest>``, so different sources
    never overwrite each other and the same source is converted once.
    """
    started = time.perf_counter()
    source = fetch_gpt2(config, download_dir, on_progress)
    fetched = time.perf_counter()
    cfg = read_config(source)
    name = model_name(cfg)
    if not config.from_dir and size_of(cfg) != config.size:
        log.warning("%s: asked for GPT-2 %s, got a %s-shaped checkpoint", source.parent, config.size, name)
    out = Path(out_dir) if out_dir else Path(models_dir) / f"{name}-{source.digest[:12]}"
    converted = not is_conversion_of(out, source)
    if converted:
        convert_checkpoint(source, out)
    done = time.perf_counter()
    smoke = smoke_generate(out, _bpe_dir(source))
    seconds = {"fetch": fetched - started, "convert": done - fetched, "smoke": time.perf_counter() - done}
    return ConvertedGPT2(out.resolve(), name, cfg, parameter_count(cfg), source, converted, smoke, seconds)
