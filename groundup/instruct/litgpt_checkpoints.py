"""LitGPT base models: a local checkpoint directory checked, or a Hugging Face hub id downloaded and
converted with ``litgpt download`` (the token passed to it, never logged)."""

from __future__ import annotations

from pathlib import Path

from groundup.errors import ModelError
from groundup.instruct.engines import HUB_ID
from groundup.instruct.litgpt_process import LineCallback, LitGPTError, run_litgpt

TOKEN_HELP = (
    "set the HF_TOKEN environment variable, or store the token in a Prefect Secret block and name it in "
    "finetune.litgpt.hf_token_secret (e.g. --set finetune.litgpt.hf_token_secret=hf-token)"
)


class BaseModelError(ModelError):
    """A base model that cannot be used (not a checkpoint, not downloadable, gated without a token)."""


def missing_checkpoint_files(directory: Path) -> list[str]:
    """The files LitGPT needs that ``directory`` lacks (empty for a usable checkpoint)."""
    missing = [name for name in ("lit_model.pth", "model_config.yaml") if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer.model)")
    if not (directory / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    return missing


def check_checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise BaseModelError(f"base model directory {str(directory)!r} does not exist")
    missing = missing_checkpoint_files(directory)
    if missing:
        raise BaseModelError(
            f"base model directory {str(directory)!r} is not a LitGPT checkpoint: missing {', '.join(missing)}"
        )
    return directory


def is_hub_id(base: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(HUB_ID.match(base)) and not Path(base).exists()


def resolve_base_model(
    base: str,
    checkpoints_dir: str | Path,
    *,
    hf_token: str | None = None,
    on_line: LineCallback | None = None,
) -> Path:
    """A local LitGPT checkpoint for ``base``: the directory itself, or ``checkpoints_dir/<org>/<name>``
    downloaded and converted with ``litgpt download`` (skipped when already there)."""
    if not is_hub_id(base):
        if not Path(base).exists():
            raise BaseModelError(
                f"base model {base!r} is neither a Hugging Face hub id (org/name, e.g. microsoft/phi-2) "
                "nor an existing LitGPT checkpoint directory"
            )
        return check_checkpoint_dir(base)
    target = (Path(checkpoints_dir) / base).resolve()
    if target.is_dir() and not missing_checkpoint_files(target):
        return target
    env = {"HF_TOKEN": hf_token} if hf_token else {}
    try:
        run_litgpt(
            ["download", base, "--checkpoint_dir", str(Path(checkpoints_dir).resolve())],
            env=env,
            drop_env=() if hf_token else ("HF_TOKEN",),
            on_line=on_line,
            secrets=[hf_token] if hf_token else [],
        )
    except LitGPTError as exc:
        raise _download_error(base, str(exc), hf_token) from None
    if not target.is_dir() or missing_checkpoint_files(target):
        # ``litgpt download`` exits 0 after printing a notice for repos it has no config for.
        raise BaseModelError(
            f"litgpt download {base!r} produced no LitGPT checkpoint in {str(target)!r}; LitGPT may not support "
            "this model (see `litgpt download list`)"
        )
    return target


def _download_error(base: str, output: str, hf_token: str | None) -> BaseModelError:
    if "requires authentication" in output or "gated repo" in output.lower():
        if not hf_token:
            return BaseModelError(
                f"base model {base!r} is gated on the Hugging Face Hub and no token was given: accept its license "
                f"on https://huggingface.co/{base}, then {TOKEN_HELP}"
            )
        return BaseModelError(
            f"the Hugging Face token was refused for the gated model {base!r}; check that it has access "
            f"(https://huggingface.co/{base})"
        )
    return BaseModelError(f"could not download base model {base!r}:\n{output}")
