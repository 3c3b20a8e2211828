"""Every model the pipeline produces, behind one small interface for generation and scoring.

Two backends:

- :class:`LitGPTModel`: a LitGPT checkpoint directory (or a hub id LitGPT downloads), loaded with
  ``litgpt.LLM``; generation goes through LitGPT's own token loop (``batched_generate_fn``) with its stop
  tokens, so we control prompt formatting, batching and the context window ourselves;
- :class:`GroundupModel`: our GPT checkpoints and LoRA adapter directories (``model.io.load_model``), with
  ``model.generate`` and the GPT-2 BPE.

Our GPT batches prompts of any lengths (right-padded; its KV cache keeps each row to its own tokens), in
batches of similar lengths. LitGPT's token loop cannot pad a batch, so there a batch is a group of prompts
with the same token length: exact, and a real speed-up where lengths repeat; other lengths run alone.
The response stage, the judge and the multiple-choice evaluation all use this module.

Over 350 lines on purpose: both backends side by side behind one interface, so a reader compares how each
loads, batches and stops in one place.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from groundup import devices
from groundup.errors import ModelError
from groundup.files import sha256_tree

LITGPT_FILES = ("lit_model.pth", "model_config.yaml")


class ModelLoadError(ModelError):
    """A model reference that names no usable model, or settings the machine cannot honour."""


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature == 0`` is greedy, so the default is deterministic."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions grouped by equal length, each group cut into batches of at most ``batch_size``; batches
    come in order of their first position, so a run proceeds roughly front to back."""
    groups: dict[int, list[int]] = defaultdict(list)
    for position, length in enumerate(lengths):
        groups[length].append(position)
    batches = [
        group[start : start + batch_size]
        for group in groups.values()
        for start in range(0, len(group), batch_size)
    ]
    return sorted(batches, key=lambda batch: batch[0])


def similar_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions sorted by length and cut into batches of ``batch_size``: little padding per batch."""
    by_length = sorted(range(len(lengths)), key=lambda position: lengths[position])
    return [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]


class CausalLM(ABC):
    """A loaded model: text in, continuations or next-token logits out."""

    model_id: str
    pads_batches = False  # whether _generate takes right-padded prompts of different lengths

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens)`` ids -> ``(batch, tokens, vocab)`` logits, no cache involved."""

    @abstractmethod
    def _generate(
        self, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling, seed: int,
        lengths: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """New token ids (end-of-text excluded) for each row of a ``(batch, tokens)`` batch: equal-length
        prompts, or right-padded ones of ``lengths`` where the backend ``pads_batches``."""

    def complete(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        *,
        batch_size: int = 1,
        ids: Sequence[int] | None = None,
        on_batch: Callable[[list[int], list[str]], None] | None = None,
    ) -> list[str]:
        """The continuation of every prompt (prompt not included), batching prompts of similar lengths
        (padded) where the backend can, else of equal lengths.

        ``ids`` are stable ids of the prompts (default: their positions). ``on_batch(ids, texts)`` is called
        after each batch, so callers can persist results as they come. A sampled batch is seeded with
        ``sampling.seed`` plus its first id, so a rerun that forms the same batches draws the same tokens.
        """
        ids = list(range(len(prompts))) if ids is None else list(ids)
        encoded = [self.encode(prompt) for prompt in prompts]
        results: list[str] = [""] * len(prompts)
        group = similar_length_batches if self.pads_batches else length_buckets
        for batch in group([len(tokens) for tokens in encoded], batch_size):
            idx, lengths = _right_padded([encoded[i] for i in batch], self.eos_id, self.device)
            idx, budget = self._fit(idx, sampling.max_new_tokens)
            padded = lengths if self.pads_batches and bool((lengths < idx.shape[1]).any()) else None
            new_tokens = self._generate(idx, budget, sampling, sampling.seed + ids[batch[0]], padded)
            texts = [self.decode(tokens) for tokens in new_tokens]
            for position, text in zip(batch, texts, strict=True):
                results[position] = text
            if on_batch is not None:
                on_batch([ids[i] for i in batch], texts)
        return results

    def _fit(self, idx: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, int]:
        """Prompt and output budget for the context window; as given for models whose generation slides
        over the window (ours), LitGPT overrides it."""
        return idx, max_new_tokens


def _right_padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, longest)`` ids, each row's prompt followed by ``pad_id``, and each row's length."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    idx = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return idx.to(device), lengths.to(device)


# ---------------------------------------------------------------------------------------------------------
# LitGPT
# ---------------------------------------------------------------------------------------------------------


def inference_precision(accelerator: str) -> str:
    """CPUs have no fast bf16, so full precision there; LitGPT's own choice (bf16/16-true) on GPUs."""
    if accelerator == "cpu":
        return "32-true"
    from litgpt.utils import get_default_supported_precision

    return get_default_supported_precision(training=False)


def _stop_tokens(prompt_style: Any, tokenizer: Any) -> tuple[list[int], ...]:
    """The style's stop sequences; a chat template applied to a model whose vocabulary lacks the template's
    end-of-turn token (a test model under the Llama 3 template) still stops at end-of-text."""
    try:
        sequences = prompt_style.stop_tokens(tokenizer)
    except ValueError:
        sequences = ([tokenizer.eos_id],)
    return tuple(list(seq) for seq in sequences if seq and None not in seq)


class LitGPTModel(CausalLM):
    def __init__(
        self,
        model: str | Path,
        *,
        accelerator: str = "auto",
        quantize: str | None = None,
        prompt_style: Any = None,
    ) -> None:
        """``prompt_style``: a LitGPT ``PromptStyle`` (its stop tokens end generation); ``None`` means the
        checkpoint's own (``prompt_style.yaml``, else LitGPT's choice by model name)."""
        from litgpt import LLM

        accelerator = devices.resolve_accelerator(accelerator)
        devices.check_quantization(quantize, accelerator)
        precision = inference_precision(accelerator)  # "-true" precisions, which bitsandbytes needs
        path = Path(model)
        self.model_id = str(path.resolve()) if path.is_dir() else str(model)
        try:
            llm = LLM.load(self.model_id, distribute=None, access_token=os.environ.get("HF_TOKEN"))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise ModelLoadError(f"cannot load LitGPT model {str(model)!r}: {exc}") from exc
        llm.distribute(accelerator=accelerator, devices=1, precision=precision, quantize=quantize)
        self.llm = llm
        self.tokenizer = llm.preprocessor.tokenizer
        self.prompt_style = prompt_style or llm.prompt_style
        self.stop_tokens = _stop_tokens(self.prompt_style, self.tokenizer)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def context_length(self) -> int:
        return self.llm.config.block_size

    @property
    def device(self) -> torch.device:
        return self.llm.fabric.device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(torch.tensor(list(ids), dtype=torch.long)) if ids else ""

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.llm.model(idx)

    def _fit(self, idx: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, int]:
        # LitGPT's cache cannot slide past its window: keep the prompt's end and shorten the output.
        window = self.context_length
        if idx.shape[1] >= window:
            idx = idx[:, -(window - 1) :]
        return idx, max(1, min(max_new_tokens, window - idx.shape[1]))

    def _generate(
        self, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling, seed: int,
        lengths: torch.Tensor | None = None,
    ) -> list[list[int]]:
        from litgpt.generate.base import batched_generate_fn

        model = self.llm.model
        model.set_kv_cache(
            batch_size=idx.shape[0], max_seq_length=idx.shape[1] + max_new_tokens, device=self.device
        )
        sample_args = {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p or 1.0,
        }
        rows: list[list[int]] = [[] for _ in range(idx.shape[0])]
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                steps = batched_generate_fn(
                    model,
                    idx,
                    idx.shape[1] + max_new_tokens,
                    sample_args=sample_args,
                    stop_tokens=self.stop_tokens,
                    include_prompt=False,
                    include_eos=False,
                )
                for step in steps:
                    for row, token in zip(rows, step, strict=True):
                        if token is not None:
                            row.append(int(token))
        finally:
            model.clear_kv_cache()
        return rows


# ---------------------------------------------------------------------------------------------------------
# Our GPT
# ---------------------------------------------------------------------------------------------------------


class GroundupModel(CausalLM):
    pads_batches = True

    def __init__(
        self, directory: str | Path, *, accelerator: str = "auto", compile: bool = False, lookahead: int = 0
    ) -> None:
        """``compile``: the one-token decoding step through ``torch.compile`` (pays off over many prompts);
        ``lookahead``: tokens drafted a pass by prompt lookup when decoding greedily (the same answers)."""
        from groundup.model.io import tokenizer_name
        from groundup.model.loading import load_model
        from groundup.text.tokenizers import get_tokenizer

        directory = Path(directory).resolve()
        self.model_id = str(directory)
        self._device = devices.torch_device(accelerator)
        self.model = load_model(directory, self._device)
        self.compile, self.lookahead = compile, lookahead
        self.tokenizer = get_tokenizer(tokenizer_name(directory))

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def device(self) -> torch.device:
        return self._device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(idx)

    def _generate(
        self, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling, seed: int,
        lengths: torch.Tensor | None = None,
    ) -> list[list[int]]:
        from groundup.model.generate import generate

        out = generate(
            self.model,
            idx,
            max_new_tokens,
            lengths=lengths,
            compile=self.compile,
            lookahead=self.lookahead if sampling.temperature == 0 else 0,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_id=self.eos_id,
            seed=seed,
        )
        rows = []
        for row in out[:, idx.shape[1] :].tolist():
            # Rows that ended early are padded with end-of-text: cut at the first one.
            rows.append(row[: row.index(self.eos_id)] if self.eos_id in row else row)
        return rows


# ---------------------------------------------------------------------------------------------------------
# Which backend
# ---------------------------------------------------------------------------------------------------------


def model_kind(model: str | Path) -> str:
    """``litgpt`` or ``groundup`` for a directory by its files; a non-path (``org/name``) is a LitGPT hub id."""
    path = Path(model)
    if path.is_dir():
        if all((path / name).is_file() for name in LITGPT_FILES):
            return "litgpt"
        if (path / "adapter.json").is_file() or (path / "model.safetensors").is_file():
            return "groundup"
        raise ModelLoadError(
            f"{path}: neither a LitGPT checkpoint ({', '.join(LITGPT_FILES)}) nor a groundup checkpoint "
            "(model.safetensors + config.json) or LoRA adapter (adapter.json)"
        )
    if path.exists():
        raise ModelLoadError(f"{path}: a model must be a directory, not a file")
    if "/" in str(model) and not str(model).startswith((".", "/")) and str(model).count("/") == 1:
        return "litgpt"
    raise ModelLoadError(f"model {str(model)!r}: no such directory, and not a hub id of the form org/name")


def load_causal_lm(
    model: str | Path,
    *,
    accelerator: str = "auto",
    quantize: str | None = None,
    prompt_style: Any = None,
    compile: bool = False,
    lookahead: int = 0,
) -> CausalLM:
    """``prompt_style``: a LitGPT model's stop tokens come from it (our GPT stops at end-of-text).
    ``compile``, ``lookahead``: how our GPT decodes (see :class:`GroundupModel`); LitGPT models decode as
    LitGPT does."""
    if model_kind(model) == "litgpt":
        return LitGPTModel(model, accelerator=accelerator, quantize=quantize, prompt_style=prompt_style)
    if quantize is not None:
        raise ModelLoadError(f"quantize={quantize!r} is only available for LitGPT models, not {model}")
    return GroundupModel(model, accelerator=accelerator, compile=compile, lookahead=lookahead)


def model_identity(model: str | Path) -> dict[str, str | None]:
    """What a result was computed with: the model reference plus, for local directories, a content digest
    (a retrained checkpoint at the same path is another model). Raises for anything that is no model."""
    model_kind(model)
    path = Path(model)
    if path.is_dir():
        return {"id": str(path.resolve()), "sha256": sha256_tree(path)}
    return {"id": str(model), "sha256": None}
