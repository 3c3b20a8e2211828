"""Tokenizers: GPT-2 byte-pair encoding through tiktoken, and the workshop's two regex tokenizers.

GPT-2 BPE works offline from a directory holding the BPE files (``vocab.bpe`` + ``encoder.json``, or
``r50k_base.tiktoken``): their sha256 sums are checked and they are copied into tiktoken's cache directory
under the names tiktoken looks for (the sha1 of the URL it would download them from), so
``tiktoken.get_encoding`` then never touches the network. The cache directory is the one tiktoken itself
uses (``TIKTOKEN_CACHE_DIR``, ``DATA_GYM_CACHE_DIR`` or ``<tmp>/data-gym-cache``); we never change those
variables, and a valid file already in the cache is left as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from groundup.errors import InputDataError
from groundup.files import atomic_path, sha256_file

if TYPE_CHECKING:  # torch costs seconds to import; only the tensor helpers below need it
    import torch

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"
VOCAB_DIR_ENV = "GROUNDUP_GPT2_VOCAB_DIR"

# Names under which the same GPT-2 vocabulary is known (both give identical ids).
GPT2_ENCODINGS = ("gpt2", "r50k_base")


class TokenizerError(InputDataError):
    """A tokenizer that cannot be built, or text it cannot encode; the message says which and why."""


@dataclass(frozen=True)
class BPEFile:
    name: str  # file name inside a vocab directory
    url: str  # where tiktoken downloads it from (its cache key is the sha1 of this URL)
    sha256: str


_OPENAI = "https://openaipublic.blob.core.windows.net"
BPE_FILES: dict[str, tuple[BPEFile, ...]] = {
    "gpt2": (
        BPEFile(
            "vocab.bpe",
            f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
        BPEFile(
            "encoder.json",
            f"{_OPENAI}/gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
    ),
    "r50k_base": (
        BPEFile(
            "r50k_base.tiktoken",
            f"{_OPENAI}/encodings/r50k_base.tiktoken",
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        ),
    ),
}


# ---------------------------------------------------------------------------------------------------------
# GPT-2 byte-pair encoding (tiktoken)
# ---------------------------------------------------------------------------------------------------------


def tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken reads its cache from (same rules as tiktoken), or None if caching is off."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            value = os.environ[variable]
            return Path(value) if value else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _complete_set(directory: Path, name: str) -> tuple[str, tuple[BPEFile, ...]] | None:
    """The encoding whose files ``directory`` holds: ``name``'s own, else the other GPT-2 name's."""
    for candidate in (name, *(n for n in GPT2_ENCODINGS if n != name)):
        files = BPE_FILES[candidate]
        if all((directory / f.name).is_file() for f in files):
            return candidate, files
    return None


def seed_tiktoken_cache(vocab_dir: str | Path, name: str = "gpt2") -> str:
    """Copy verified BPE files from ``vocab_dir`` into tiktoken's cache; returns the encoding they provide.

    The returned name is ``name`` itself, or the other GPT-2 name when the directory only holds that one's
    files (``gpt2`` and ``r50k_base`` encode identically).
    """
    directory = Path(vocab_dir)
    if not directory.is_dir():
        raise TokenizerError(f"GPT-2 vocabulary directory {str(directory)!r} does not exist")
    found = _complete_set(directory, name)
    if found is None:
        wanted = " or ".join(" + ".join(f.name for f in BPE_FILES[n]) for n in GPT2_ENCODINGS)
        raise TokenizerError(f"GPT-2 vocabulary directory {str(directory)!r} has neither {wanted}")
    encoding, files = found
    cache = tiktoken_cache_dir()
    if cache is None:
        raise TokenizerError(
            "TIKTOKEN_CACHE_DIR is set to an empty string (tiktoken caching disabled), so the files in "
            f"{str(directory)!r} cannot be used; unset it or point it at a directory"
        )
    for bpe in files:
        source = directory / bpe.name
        digest = sha256_file(source)
        if digest != bpe.sha256:
            raise TokenizerError(f"{source}: sha256 {digest} is not the GPT-2 file's {bpe.sha256}")
        target = cache / hashlib.sha1(bpe.url.encode()).hexdigest()
        if target.is_file() and sha256_file(target) == bpe.sha256:
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return encoding


def _renamed(encoding: tiktoken.Encoding, name: str) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name,
        pat_str=encoding._pat_str,
        mergeable_ranks=encoding._mergeable_ranks,
        special_tokens=encoding._special_tokens,
        explicit_n_vocab=encoding.n_vocab,
    )


def get_tokenizer(name: str = "gpt2", vocab_dir: str | Path | None = None) -> tiktoken.Encoding:
    """The GPT-2 BPE tokenizer (``gpt2`` or its identical twin ``r50k_base``) as a tiktoken Encoding.

    ``vocab_dir`` (default: ``$GROUNDUP_GPT2_VOCAB_DIR``) holds the BPE files for offline use; without it
    tiktoken downloads them once into its cache.
    """
    if name not in GPT2_ENCODINGS:
        raise TokenizerError(f"unknown tokenizer {name!r}; expected one of {', '.join(GPT2_ENCODINGS)}")
    directory = vocab_dir or os.environ.get(VOCAB_DIR_ENV) or None
    encoding = seed_tiktoken_cache(directory, name) if directory else name
    try:
        loaded = tiktoken.get_encoding(encoding)
    except Exception as exc:  # tiktoken raises whatever requests/its hash check raise
        hint = f"; for offline use pass vocab_dir or set {VOCAB_DIR_ENV}" if not directory else ""
        raise TokenizerError(f"could not load the {name!r} BPE files: {exc}{hint}") from exc
    return loaded if encoding == name else _renamed(loaded, name)


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> torch.Tensor:
    """Token ids of ``text`` as a ``(1, n)`` LongTensor (a batch of one), ``<|endoftext|>`` allowed."""
    import torch

    encoded = tokenizer.encode(text, allowed_special={END_OF_TEXT})
    return torch.tensor(encoded, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor | Iterable[int], tokenizer: tiktoken.Encoding) -> str:
    """Decode a ``(1, n)`` or ``(n,)`` tensor, a numpy array or any sequence of ids back into text."""
    if hasattr(token_ids, "dim") and token_ids.dim() > 1:  # a batch of one
        token_ids = token_ids.squeeze(0)
    ids = token_ids.tolist() if hasattr(token_ids, "tolist") else [int(i) for i in token_ids]
    return tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------------------
# The workshop's regex tokenizers
# ---------------------------------------------------------------------------------------------------------

# Splits on punctuation, double dashes and whitespace, keeping the separators (the capture group).
_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Decoding joins tokens with spaces; punctuation then hugs the word before it again.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?!"()\'])')


def split_words(text: str, keep_whitespace: bool = False) -> list[str]:
    """The workshop's pre-tokenization: words and punctuation, and (optionally) the whitespace between."""
    if keep_whitespace:
        return [piece for piece in _SPLIT.split(text) if piece]
    return [piece.strip() for piece in _SPLIT.split(text) if piece.strip()]


def build_vocab(
    text: str, *, special_tokens: Iterable[str] = (), keep_whitespace: bool = False
) -> dict[str, int]:
    """Token -> id for every distinct word of ``text`` in sorted order, then ``special_tokens``.

    ``keep_whitespace=True`` also gives ``" "`` and ``"\\n"`` ids, as the workshop's notebook does (1132
    entries for the-verdict, against 1130 without them).
    """
    words = sorted(set(split_words(text, keep_whitespace)))
    words.extend(token for token in special_tokens if token not in words)
    return {token: index for index, token in enumerate(words)}


class SimpleTokenizerV1:
    """Maps each word and punctuation mark to its id in a fixed vocabulary; unknown words are an error."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.str_to_int = dict(vocab)
        self.int_to_str = {index: token for token, index in self.str_to_int.items()}

    @classmethod
    def from_text(cls, text: str, **kwargs) -> SimpleTokenizerV1:
        return cls(build_vocab(text, **kwargs))

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    def _lookup(self, token: str) -> int:
        try:
            return self.str_to_int[token]
        except KeyError:
            raise TokenizerError(
                f"{token!r} is not in the vocabulary ({self.vocab_size} tokens); "
                "SimpleTokenizerV2 maps unknown words to <|unk|>"
            ) from None

    def encode(self, text: str) -> list[int]:
        return [self._lookup(token) for token in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[int(i)] for i in ids)
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """V1 plus the special tokens: unknown words become ``<|unk|>``, ``<|endoftext|>`` separates texts."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        missing = [token for token in (END_OF_TEXT, UNKNOWN) if token not in vocab]
        if missing:
            raise TokenizerError(f"SimpleTokenizerV2 needs {' and '.join(missing)} in its vocabulary")
        super().__init__(vocab)

    @classmethod
    def from_text(cls, text: str, **kwargs) -> SimpleTokenizerV2:
        return cls(build_vocab(text, special_tokens=(END_OF_TEXT, UNKNOWN), **kwargs))

    def _lookup(self, token: str) -> int:
        return self.str_to_int.get(token, self.str_to_int[UNKNOWN])

    def encode(self, text: str) -> list[int]:
        # Split on the separator first, so it is recognised even when glued to a word ("tea<|endoftext|>").
        ids: list[int] = []
        for position, document in enumerate(text.split(END_OF_TEXT)):
            if position:
                ids.append(self.str_to_int[END_OF_TEXT])
            ids.extend(self._lookup(token) for token in split_words(document))
        return ids
