"""A tiny but real LitGPT checkpoint built from scratch, for tests that run LitGPT code offline.

The directory has everything LitGPT expects of a downloaded checkpoint: ``lit_model.pth`` (random weights of
a two-layer Pythia-style GPT), ``model_config.yaml``, a byte-level BPE ``tokenizer.json`` trained locally
on the given text with the ``tokenizers`` library, and ``tokenizer_config.json`` naming the tokenizer class
and the eos/bos token. It loads with ``litgpt.LLM.load(dir)``, generates, and ``litgpt finetune_lora`` /
``litgpt serve`` accept it. Byte-level BPE can encode any UTF-8 text, so instruction data never hits an
unknown character.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
REQUIRED_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")


def _train_tokenizer(text_path: Path, vocab_size: int, destination: Path) -> int:
    """Train a byte-level BPE on ``text_path``; returns the final vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(text_path)], trainer)
    tokenizer.save(str(destination))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def build_tiny_litgpt_checkpoint(
    dest_dir: str | Path,
    train_text_path: str | Path,
    *,
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    block_size: int = 512,
    seed: int = 0,
    name: str = "tiny-pythia",
) -> Path:
    """Write a LitGPT checkpoint directory at ``dest_dir`` (created; existing files are overwritten).

    ``name`` ends up in ``model_config.yaml``; it is not one of LitGPT's known names, so LitGPT's own
    prompt-style lookup falls back to its plain default style (callers pass a prompt style explicitly).
    """
    import torch
    import yaml
    from litgpt.config import Config, name_to_config
    from litgpt.model import GPT

    checkpoint = Path(dest_dir).resolve()
    checkpoint.mkdir(parents=True, exist_ok=True)

    vocab = _train_tokenizer(Path(train_text_path), vocab_size, checkpoint / "tokenizer.json")
    (checkpoint / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOS_TOKEN,
                "bos_token": EOS_TOKEN,
                "add_bos_token": False,
                "model_max_length": block_size,
            },
            indent=2,
        ),
        encoding="utf-8",
    )

    # Pythia's architecture (parallel residual, partial rotary, LayerNorm) at toy sizes.
    config = Config(
        **{
            **name_to_config["pythia-14m"],
            "name": name,
            "hf_config": {},
            "n_layer": n_layer,
            "n_embd": n_embd,
            "n_head": n_head,
            "block_size": block_size,
            "vocab_size": vocab,
            "padded_vocab_size": vocab,
            "padding_multiple": 1,
        }
    )
    (checkpoint / "model_config.yaml").write_text(yaml.safe_dump(asdict(config)), encoding="utf-8")

    torch.manual_seed(seed)
    model = GPT(config)
    torch.save(model.state_dict(), checkpoint / "lit_model.pth")
    return checkpoint
