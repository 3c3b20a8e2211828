"""GPT-2 from the Hugging Face Hub (``openai-community/gpt2*``): download and read, no TensorFlow needed.

Downloads go through ``huggingface_hub.hf_hub_download``, so its cache (shared with ``transformers``),
resumable transfers, ``HF_HUB_OFFLINE=1`` offline mode and ``HF_TOKEN`` authentication all apply; the
token is only ever read by ``huggingface_hub``. The hub names large (LFS) files by their sha256 (their
ETag and blob name), so the safetensors file is also checked against it after download.

The checkpoint is GPT-2's ``config.json`` plus ``model.safetensors``, with names as ``transformers`` writes
them (``h.0.attn.c_attn.weight``, with or without a ``transformer.`` prefix) and Conv1D weights ``[in, out]``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import torch
from safetensors import SafetensorError, safe_open

from groundup.download import ChecksumError, network_cause
from groundup.errors import SourceUnreachable
from groundup.files import sha256_file
from groundup.model.gpt import GPTConfig
from groundup.weights.convert import check_shapes, gpt2_config
from groundup.weights.source import (
    SourceCheckpoint,
    SourceFile,
    SourceWeights,
    WeightsError,
    read_config_json,
)

HF_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
HF_FILES = ("config.json", "model.safetensors")
# config.json key -> GPTConfig field (older configs say n_ctx for n_positions)
HF_CONFIG = {"vocab_size": "vocab_size", "n_positions": "context_length", "n_embd": "emb_dim", "n_head": "n_heads", "n_layer": "n_layers"}
# Settings that change GPT-2's maths: our model implements GPT-2's own values only.
SUPPORTED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}
# Causal-mask buffers older transformers versions saved with the weights: not weights, skipped.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


# What a user can do when the hub cannot be reached (the offline run, the hub cache, a mirror).
HUB_FIX = (
    "to work offline, run with --sources-dir DIR holding a GPT-2 checkpoint in DIR/gpt2, or set HF_HUB_OFFLINE=1 "
    "with the files in the hub cache; or use a mirror (weights.hf_endpoint or HF_ENDPOINT)"
)


class HubUnreachable(SourceUnreachable, WeightsError):
    """The hub could not be reached, or served nothing, for a file that is not in the local cache."""


def _hub_error(repo_id: str, name: str, endpoint: str | None, exc: Exception) -> WeightsError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{name} on {endpoint or 'the Hugging Face Hub'}"
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        # The hub client falls back to its cache on any failed request; the request's failure is the cause.
        cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) else exc
        if cause is None or isinstance(cause, OfflineModeIsEnabled):
            why = "not in the local cache, and offline mode is on (HF_HUB_OFFLINE=1)"
            return HubUnreachable(f"could not fetch {where}: {why}", fix=HUB_FIX.split("; or ")[0])
        why, transient = network_cause(cause)
        return HubUnreachable(
            f"could not fetch {where}: not in the local cache, and the hub did not serve it ({why})",
            fix=HUB_FIX,
            transient=transient,
        )
    if isinstance(exc, GatedRepoError):
        why = "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        why = "no such repository (or it is private: set HF_TOKEN)"
    elif isinstance(exc, RevisionNotFoundError):
        why = "no such revision"
    elif isinstance(exc, EntryNotFoundError):
        why = "the repository has no such file"
    elif isinstance(exc, requests.RequestException):  # the hub's HTTP errors are requests' too
        why, transient = network_cause(exc)
        return HubUnreachable(f"could not fetch {where}: {why}", fix=HUB_FIX, transient=transient)
    else:
        why = f"{type(exc).__name__}: {exc}"
    return WeightsError(f"could not fetch {where}: {why}")


def _unreachable_for_good(endpoint: str | None) -> tuple[str, str] | None:
    """The endpoint's URL and why it cannot be reached, when that will not pass (a host name that does not
    resolve, a refused connection); else None. The hub client itself retries such failures five times over
    ~25 s (each retry logged twice) before it says anything, so one plain request asks first."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        requests.head(url, timeout=10, allow_redirects=False).close()
    except requests.RequestException as exc:
        why, transient = network_cause(exc)
        return None if transient else (url, why)
    return None


def _verified_sha256(path: Path, url: str) -> str:
    """The file's sha256, checked against its blob name when the hub named it by its sha256 (LFS files)."""
    blob = path.resolve()
    digest = sha256_file(blob)
    if _SHA256.fullmatch(blob.name) and digest != blob.name:
        # A corrupted cache entry: remove it so the next attempt downloads it again.
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: sha256 mismatch: the hub says {blob.name}, the file has {digest}; removed")
    return digest


def download_hf_checkpoint(
    repo_id: str,
    *,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> SourceCheckpoint:
    """``config.json`` and ``model.safetensors`` of ``repo_id`` in the hub cache (``cache_dir``, default the
    hub's own), verified; a file already cached is not downloaded again. Connection failures and 5xx
    answers are retried ``retries`` times with exponential backoff."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from requests import RequestException

    paths: dict[str, Path] = {}
    # Files already in the hub cache are used without the network, as the hub client would on failure.
    unreachable = _unreachable_for_good(endpoint)
    for done, name in enumerate(HF_FILES, 1):
        for attempt in range(retries + 1):
            try:
                paths[name] = Path(
                    hf_hub_download(
                        repo_id, name, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                        local_files_only=unreachable is not None,
                    )
                )  # fmt: skip
                break
            except (HfHubHTTPError, OfflineModeIsEnabled, RequestException, FileNotFoundError, ValueError) as exc:
                error = _hub_error(repo_id, name, endpoint, exc)
                if unreachable is not None:
                    url, why = unreachable
                    where = f"{repo_id}/{name} on {url}"
                    error = HubUnreachable(f"could not fetch {where}: not in the local cache, and {why}", fix=HUB_FIX)
                if attempt == retries or not getattr(error, "transient", False):
                    raise error from exc
                # The hub client keeps the partial file (.incomplete) and resumes it with a Range request.
                delay = backoff * 2**attempt
                log.warning("%s; retrying in %.1fs (attempt %d/%d)", error.message, delay, attempt + 2, retries + 1)
                time.sleep(delay)
        if on_progress:
            on_progress(done, len(HF_FILES))
    # Both files sit in the snapshot directory named by the commit they were resolved to.
    snapshot = paths["model.safetensors"].parent
    commit = snapshot.name
    files = []
    for name, path in paths.items():
        url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
        files.append(SourceFile(name, url, _verified_sha256(path, url), path.stat().st_size))
    return SourceCheckpoint(snapshot, "huggingface", f"hf:{repo_id}", tuple(files), revision=commit)


def _check_supported(hf_config: dict[str, Any], path: Path) -> None:
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"{path}: model_type is {hf_config['model_type']!r}, not 'gpt2'")
    for key, allowed in SUPPORTED.items():
        if key in hf_config and hf_config[key] not in allowed:
            raise WeightsError(f"{path}: {key}={hf_config[key]!r} is not GPT-2's (supported: {list(allowed)})")
    n_inner = hf_config.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf_config["n_embd"]:
        raise WeightsError(f"{path}: n_inner={n_inner}, but our GPT-2 has a 4 x n_embd feed-forward layer")


def read_hf_config(directory: str | Path) -> GPTConfig:
    """Our config from a GPT-2 ``config.json`` (refusing settings our model does not implement)."""
    path = Path(directory) / "config.json"
    hf_config = read_config_json(directory, "config.json")
    if "n_positions" not in hf_config and "n_ctx" in hf_config:
        hf_config["n_positions"] = hf_config["n_ctx"]
    missing = [key for key in HF_CONFIG if key not in hf_config]
    if missing:
        raise WeightsError(f"{path}: missing {', '.join(missing)}; not a GPT-2 config")
    _check_supported(hf_config, path)
    try:
        return gpt2_config(**{field: int(hf_config[key]) for key, field in HF_CONFIG.items()})
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: {exc}") from None


def read_hf_weights(directory: str | Path) -> SourceWeights:
    """Config and tensors of a Hugging Face GPT-2 directory; shapes are checked before reading."""
    directory = Path(directory)
    config = read_hf_config(directory)
    path = directory / "model.safetensors"
    if not path.is_file():
        raise WeightsError(f"{directory}: missing model.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            source_names = {
                key.removeprefix("transformer."): key
                for key in keys
                if not key.endswith(MASK_BUFFERS) and key != "lm_head.weight"
            }
            shapes = {name: tuple(f.get_slice(key).get_shape()) for name, key in source_names.items()}
            check_shapes(shapes, config, str(path), source_names)
            tensors = {name: f.get_tensor(key) for name, key in source_names.items()}
            # GPT-2 ties its head to the token embedding; a file with a different head is another model.
            if "lm_head.weight" in keys and not torch.equal(f.get_tensor("lm_head.weight"), tensors["wte.weight"]):
                raise WeightsError(f"{path}: lm_head.weight differs from the token embedding (GPT-2 ties them)")
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: corrupted or unreadable safetensors file ({exc})") from None
    return SourceWeights(config, tensors, str(path), source_names)
