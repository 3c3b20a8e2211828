"""What the GPT-2 weights modules hand each other: where a checkpoint came from, and its tensors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from groundup.errors import ModelError
from groundup.model.gpt import GPTConfig

CheckpointFormat = Literal["openai", "huggingface"]


class WeightsError(ModelError):
    """GPT-2 weights that cannot be fetched, read or converted; the message names the input and the problem."""


def read_config_json(directory: str | Path, name: str) -> dict[str, Any]:
    """A checkpoint's own JSON config (``hparams.json``, ``config.json``), with errors naming the file."""
    path = Path(directory) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{Path(directory)}: missing {name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class SourceFile:
    """One file of a source checkpoint: where it came from (URL or local path) and what it was."""

    name: str
    location: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SourceCheckpoint:
    """A complete GPT-2 checkpoint in one local directory, in OpenAI's or Hugging Face's format."""

    directory: Path
    format: CheckpointFormat
    parent: str  # its external id in our lineage: "openai:gpt2/124M", "hf:openai-community/gpt2", "dir:/path"
    files: tuple[SourceFile, ...]
    revision: str | None = None  # the Hugging Face commit, when it came from the hub

    @property
    def digest(self) -> str:
        """One sha256 for the whole checkpoint, from its files' names and contents (not their locations)."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.name):
            h.update(f"{f.name}\0{f.sha256}\n".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "parent": self.parent,
            "revision": self.revision,
            "digest": self.digest,
            "files": [{"name": f.name, "location": f.location, "sha256": f.sha256, "size": f.size} for f in self.files],
        }


@dataclass
class SourceWeights:
    """A GPT-2 checkpoint in memory: its configuration and its tensors under the canonical names
    (Hugging Face's without the ``transformer.`` prefix; Conv1D weights ``[in, out]``)."""

    config: GPTConfig
    tensors: dict[str, torch.Tensor]
    origin: str  # the file or directory they came from, for error messages
    # canonical name -> the name in the source file, so errors name the tensor as its owner knows it
    source_names: dict[str, str] = field(default_factory=dict)
