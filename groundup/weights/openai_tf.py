"""OpenAI's original GPT-2 TensorFlow checkpoint, read into :class:`SourceWeights`.

A size's directory (``<base>/<size>/`` at OpenAI) holds ``hparams.json``, the TF checkpoint
(``model.ckpt.index`` + ``model.ckpt.data-00000-of-00001``, plus ``model.ckpt.meta`` and ``checkpoint``)
and the BPE files ``encoder.json`` / ``vocab.bpe``. The variables are ``model/wte``, ``model/wpe``,
``model/ln_f/{g,b}`` and ``model/h<i>/{ln_1,ln_2}/{g,b}``, ``model/h<i>/attn/{c_attn,c_proj}/{w,b}``,
``model/h<i>/mlp/{c_fc,c_proj}/{w,b}``; Conv1D weights carry a leading axis of 1 (``[1, in, out]``).

TensorFlow is the optional ``tf`` extra and takes ~15 s to import, so it is imported here, only when such a
checkpoint is actually read. The checkpoint index stores a CRC32C per tensor that TensorFlow checks as it
reads, so a corrupted data file is an error here, never a silently wrong model.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import torch

from groundup.model.gpt import GPTConfig
from groundup.weights.convert import check_shapes, gpt2_config
from groundup.weights.source import SourceWeights, WeightsError, read_config_json

OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
REQUIRED_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
CHECKPOINT_PREFIX = "model.ckpt"
TF_MISSING = (
    "reading OpenAI's TensorFlow checkpoint needs TensorFlow: pip install 'groundup[tf]', "
    "or use --source huggingface (no TensorFlow needed)"
)
# hparams.json key -> GPTConfig field
HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "context_length", "n_embd": "emb_dim", "n_head": "n_heads", "n_layer": "n_layers"}
_LEAF = {"w": "weight", "g": "weight", "b": "bias"}
_BLOCK = re.compile(r"h(\d+)")


def tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported, without paying for the import."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # ValueError: a stubbed-out sys.modules entry without a spec
        return False


def require_tensorflow() -> None:
    """Fail before downloading hundreds of megabytes that could not be read."""
    if not tensorflow_installed():
        raise WeightsError(TF_MISSING)


def import_tensorflow() -> ModuleType:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise WeightsError(TF_MISSING) from exc
    return tf


def canonical_name(tf_name: str) -> str:
    """``model/h3/attn/c_attn/w`` -> ``h.3.attn.c_attn.weight``, ``model/wte`` -> ``wte.weight``.

    A name outside GPT-2's layout comes back unchanged, so the shape check reports it as unexpected.
    """
    parts = tf_name.split("/")
    if parts[0] != "model" or len(parts) < 2:
        return tf_name
    parts = parts[1:]
    if parts in (["wte"], ["wpe"]):
        return f"{parts[0]}.weight"
    if (block := _BLOCK.fullmatch(parts[0])) is not None:
        parts[0] = f"h.{block.group(1)}"
    *path, leaf = parts
    if leaf not in _LEAF or not path:
        return tf_name
    return ".".join([*path, _LEAF[leaf]])


def _squeezed(shape: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Conv1D weights are stored as [1, in, out]; everything else as is."""
    return tuple(shape[1:]) if len(shape) == 3 and shape[0] == 1 else tuple(shape)


def read_hparams(directory: str | Path) -> GPTConfig:
    """Our config from ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    path = Path(directory) / "hparams.json"
    hparams = read_config_json(directory, "hparams.json")
    missing = [key for key in HPARAMS if key not in hparams]
    if missing:
        raise WeightsError(f"{path}: missing {', '.join(missing)} (GPT-2 hparams need {', '.join(HPARAMS)})")
    try:
        return gpt2_config(**{field: int(hparams[key]) for key, field in HPARAMS.items()})
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: {exc}") from None


def read_openai_weights(directory: str | Path) -> SourceWeights:
    """Config and tensors of an OpenAI GPT-2 checkpoint directory; shapes are checked before reading."""
    directory = Path(directory)
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise WeightsError(f"{directory}: not a complete OpenAI GPT-2 checkpoint, missing {', '.join(missing)}")
    config = read_hparams(directory)
    tf = import_tensorflow()
    try:
        reader = tf.train.load_checkpoint(str(directory / CHECKPOINT_PREFIX))
        tf_shapes = reader.get_variable_to_shape_map()
        source_names = {canonical_name(name): name for name in tf_shapes}
        shapes = {canonical_name(name): _squeezed(shape) for name, shape in tf_shapes.items()}
        check_shapes(shapes, config, str(directory), source_names)
        tensors = {
            name: torch.from_numpy(reader.get_tensor(tf_name)).reshape(shapes[name])
            for name, tf_name in source_names.items()
        }
    except tf.errors.OpError as exc:
        raise WeightsError(f"{directory}: unreadable TensorFlow checkpoint ({exc.message})") from None
    return SourceWeights(config, tensors, str(directory), source_names)
