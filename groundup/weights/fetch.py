"""Getting a GPT-2 checkpoint into one local directory: OpenAI's files, the Hugging Face Hub, or a local dir.

OpenAI's seven files are fetched with :func:`groundup.download.download` (streamed with progress, retried,
resumed with HTTP Range, size-checked against Content-Length, mirror fallback). OpenAI publishes no
checksums, so the first verified download records each file's sha256 and size in ``files.json`` beside
them; later runs check the files against it, fetch again what no longer matches, and make no request for
what does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from groundup.config import WeightsConfig
from groundup.download import download
from groundup.files import sha256_file, write_json
from groundup.model.gpt import GPTConfig
from groundup.weights.convert import check_size
from groundup.weights.huggingface import (
    HF_FILES,
    HF_REPOS,
    download_hf_checkpoint,
    read_hf_config,
    read_hf_weights,
)
from groundup.weights.openai_tf import (
    OPENAI_FILES,
    REQUIRED_FILES,
    read_hparams,
    read_openai_weights,
    require_tensorflow,
)
from groundup.weights.source import (
    CheckpointFormat,
    SourceCheckpoint,
    SourceFile,
    SourceWeights,
    WeightsError,
)

MANIFEST = "files.json"
Progress = Callable[[int, int], None]


def _manifest(directory: Path) -> dict[str, dict]:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def fetch_openai(
    size: str,
    directory: str | Path,
    *,
    base_url: str,
    mirror_url: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    on_progress: Progress | None = None,
) -> SourceCheckpoint:
    """OpenAI's files for ``size`` (``<base_url>/<size>/<file>``, else the mirror's) in ``directory``."""
    check_size(size)
    require_tensorflow()
    directory = Path(directory)
    known = _manifest(directory)
    files = []
    for done, name in enumerate(OPENAI_FILES, 1):
        url = f"{base_url.rstrip('/')}/{size}/{name}"
        mirrors = [f"{mirror_url.rstrip('/')}/{size}/{name}"] if mirror_url else []
        # A digest recorded for another source says nothing about this one.
        pinned = known.get(name) if known.get(name, {}).get("location") in (url, *mirrors) else None
        fetched = download(
            url,
            directory / name,
            sha256=pinned["sha256"] if pinned else None,
            size=pinned["size"] if pinned else None,
            mirrors=mirrors,
            retries=retries,
            backoff=backoff,
        )
        files.append(SourceFile(name, fetched.source, fetched.sha256, fetched.size))
        if on_progress:
            on_progress(done, len(OPENAI_FILES))
    write_json(directory / MANIFEST, {f.name: {"location": f.location, "sha256": f.sha256, "size": f.size} for f in files})
    return SourceCheckpoint(directory, "openai", f"openai:gpt2/{size}", tuple(files))


def fetch_huggingface(
    size: str,
    cache_dir: str | Path | None = None,
    *,
    endpoint: str | None = None,
    on_progress: Progress | None = None,
) -> SourceCheckpoint:
    """``openai-community/gpt2*`` for ``size`` through the hub's cache."""
    return download_hf_checkpoint(
        HF_REPOS[check_size(size)], cache_dir=cache_dir, endpoint=endpoint, on_progress=on_progress
    )


def detect_format(directory: Path) -> CheckpointFormat:
    """Which format a local checkpoint directory is in, by the files that only that format has."""
    if (directory / "hparams.json").is_file() or (directory / "model.ckpt.index").is_file():
        return "openai"
    config = directory / "config.json"
    if config.is_file():
        try:
            is_ours = "model" in json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            is_ours = False
        if is_ours:
            raise WeightsError(f"{directory}: already a groundup checkpoint; use it directly (groundup generate)")
        return "huggingface"
    raise WeightsError(
        f"{directory}: neither an OpenAI GPT-2 checkpoint ({', '.join(REQUIRED_FILES)}) "
        f"nor a Hugging Face one ({', '.join(HF_FILES)})"
    )


def local_checkpoint(directory: str | Path) -> SourceCheckpoint:
    """A checkpoint directory on disk (air-gapped users), used in place; its files are hashed for lineage."""
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise WeightsError(f"{directory}: no such directory")
    fmt = detect_format(directory)
    required, known = (REQUIRED_FILES, OPENAI_FILES) if fmt == "openai" else (HF_FILES, HF_FILES)
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        raise WeightsError(f"{directory}: incomplete {fmt} GPT-2 checkpoint, missing {', '.join(missing)}")
    files = tuple(
        SourceFile(name, str(directory / name), sha256_file(directory / name), (directory / name).stat().st_size)
        for name in known
        if (directory / name).is_file()
    )
    return SourceCheckpoint(directory, fmt, f"dir:{directory}", files)


def fetch_gpt2(config: WeightsConfig, download_dir: str | Path, on_progress: Progress | None = None) -> SourceCheckpoint:
    """The checkpoint ``config`` asks for, local: ``from_dir`` as is, else downloaded under ``download_dir``."""
    if config.from_dir:
        return local_checkpoint(config.from_dir)
    download_dir = Path(download_dir)
    if config.source == "openai":
        return fetch_openai(
            config.size,
            download_dir / "openai" / config.size,
            base_url=config.openai_base_url,
            mirror_url=config.openai_mirror_url,
            on_progress=on_progress,
        )
    return fetch_huggingface(
        config.size, download_dir / "huggingface", endpoint=config.hf_endpoint, on_progress=on_progress
    )


def read_config(checkpoint: SourceCheckpoint) -> GPTConfig:
    """The model config a checkpoint describes, without reading its weights."""
    reader = read_hparams if checkpoint.format == "openai" else read_hf_config
    return reader(checkpoint.directory)


def read_weights(checkpoint: SourceCheckpoint) -> SourceWeights:
    reader = read_openai_weights if checkpoint.format == "openai" else read_hf_weights
    return reader(checkpoint.directory)
