"""GPT-2 BPE (tiktoken, offline from the shared vocab files) and the workshop's regex tokenizers."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groundup.text.tokenizers import (
    BPE_FILES,
    END_OF_TEXT,
    UNKNOWN,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    TokenizerError,
    build_vocab,
    get_tokenizer,
    seed_tiktoken_cache,
    split_words,
    text_to_token_ids,
    tiktoken_cache_dir,
    token_ids_to_text,
)

WORKSHOP_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terracesof someunknownPlace."
WORKSHOP_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 1659, 617,
                34680, 27271, 13]  # fmt: skip


@pytest.fixture
def verdict(verdict_path) -> str:
    return verdict_path.read_text(encoding="utf-8")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
    return directory


def cache_name(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# GPT-2 BPE
# ---------------------------------------------------------------------------------------------------------


def test_gpt2_reproduces_the_workshop_vector(gpt2_vocab_dir):
    tokenizer = get_tokenizer("gpt2", gpt2_vocab_dir)

    assert text_to_token_ids(WORKSHOP_TEXT, tokenizer).tolist() == [WORKSHOP_IDS]
    assert token_ids_to_text(torch.tensor([WORKSHOP_IDS]), tokenizer) == WORKSHOP_TEXT


def test_the_verdict_has_5145_tokens(gpt2_vocab_dir, verdict):
    assert len(verdict) == 20479
    assert len(get_tokenizer("gpt2", gpt2_vocab_dir).encode(verdict)) == 5145


def test_text_to_token_ids_shape_and_dtype(gpt2_vocab_dir):
    ids = text_to_token_ids("Every effort moves you", get_tokenizer(vocab_dir=gpt2_vocab_dir))

    assert ids.dtype == torch.long
    assert ids.tolist() == [[6109, 3626, 6100, 345]]
    assert token_ids_to_text(ids[0], get_tokenizer(vocab_dir=gpt2_vocab_dir)) == "Every effort moves you"
    assert token_ids_to_text([6109, 3626], get_tokenizer(vocab_dir=gpt2_vocab_dir)) == "Every effort"


def test_gpt2_and_r50k_base_agree(gpt2_vocab_dir, verdict):
    gpt2 = get_tokenizer("gpt2", gpt2_vocab_dir)
    r50k = get_tokenizer("r50k_base", gpt2_vocab_dir)

    assert (gpt2.name, r50k.name) == ("gpt2", "r50k_base")
    assert gpt2.encode(verdict) == r50k.encode(verdict)


def test_unknown_tokenizer_name():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'cl100k_base'"):
        get_tokenizer("cl100k_base")


def test_seeding_names_files_as_tiktoken_expects(gpt2_vocab_dir, cache_dir):
    assert seed_tiktoken_cache(gpt2_vocab_dir, "gpt2") == "gpt2"

    for bpe in BPE_FILES["gpt2"]:
        cached = cache_dir / cache_name(bpe.url)
        assert cached.read_bytes() == (gpt2_vocab_dir / bpe.name).read_bytes()
    assert tiktoken_cache_dir() == cache_dir


def test_seeding_keeps_a_valid_cached_file_and_replaces_a_corrupt_one(gpt2_vocab_dir, cache_dir):
    vocab, encoder = BPE_FILES["gpt2"]
    seed_tiktoken_cache(gpt2_vocab_dir, "gpt2")
    valid = cache_dir / cache_name(vocab.url)
    corrupt = cache_dir / cache_name(encoder.url)
    inode = valid.stat().st_ino
    corrupt.write_bytes(b"{}")

    seed_tiktoken_cache(gpt2_vocab_dir, "gpt2")

    assert valid.stat().st_ino == inode
    assert hashlib.sha256(corrupt.read_bytes()).hexdigest() == encoder.sha256


def test_seeding_falls_back_to_the_other_gpt2_file_set(gpt2_vocab_dir, cache_dir, tmp_path):
    only_r50k = tmp_path / "vocab"
    only_r50k.mkdir()
    shutil.copy(gpt2_vocab_dir / "r50k_base.tiktoken", only_r50k)

    assert seed_tiktoken_cache(only_r50k, "gpt2") == "r50k_base"
    tokenizer = get_tokenizer("gpt2", only_r50k)

    assert tokenizer.name == "gpt2"
    assert text_to_token_ids(WORKSHOP_TEXT, tokenizer).tolist() == [WORKSHOP_IDS]


def test_a_tampered_vocab_file_is_refused(gpt2_vocab_dir, cache_dir, tmp_path):
    vocab = tmp_path / "vocab"
    shutil.copytree(gpt2_vocab_dir, vocab)
    (vocab / "encoder.json").chmod(0o644)
    with open(vocab / "encoder.json", "ab") as fh:
        fh.write(b" ")

    with pytest.raises(TokenizerError, match=r"encoder.json: sha256 \w+ is not the GPT-2 file's 1961396"):
        seed_tiktoken_cache(vocab, "gpt2")
    assert not (cache_dir / cache_name(BPE_FILES["gpt2"][1].url)).exists()


def test_vocab_dir_problems_are_named(tmp_path, cache_dir):
    with pytest.raises(TokenizerError, match="nowhere.*does not exist"):
        get_tokenizer("gpt2", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty.*has neither vocab.bpe \+ encoder.json or r50k_base.tiktoken"):
        get_tokenizer("gpt2", tmp_path / "empty")


def test_disabled_tiktoken_cache_is_reported(gpt2_vocab_dir, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(TokenizerError, match="TIKTOKEN_CACHE_DIR is set to an empty string"):
        seed_tiktoken_cache(gpt2_vocab_dir)


def test_works_offline_in_a_fresh_process_without_touching_the_users_cache_setting(gpt2_vocab_dir, tmp_path):
    """A new process (no tiktoken state), every proxy pointing at a closed port: only the seeded cache can
    provide the files. The user's TIKTOKEN_CACHE_DIR stays what it was and receives the files."""
    cache = tmp_path / "user-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("GROUNDUP_GPT2_VOCAB_DIR", "DATA_GYM_CACHE_DIR")}
    env |= {"TIKTOKEN_CACHE_DIR": str(cache), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    script = (
        "import os, sys\n"
        "from groundup.text.tokenizers import get_tokenizer\n"
        "print(get_tokenizer('gpt2', sys.argv[1]).encode('Hello, world'), os.environ['TIKTOKEN_CACHE_DIR'])\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script, str(gpt2_vocab_dir)], env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[15496,", "11,", "995]", str(cache)]
    assert sorted(os.listdir(cache)) == sorted(cache_name(b.url) for b in BPE_FILES["gpt2"])


def test_without_vocab_files_or_network_the_error_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GROUNDUP_GPT2_VOCAB_DIR"}
    env |= {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    script = "from groundup.text.tokenizers import get_tokenizer\nget_tokenizer('gpt2')\n"

    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    assert "could not load the 'gpt2' BPE files" in result.stderr
    assert "set GROUNDUP_GPT2_VOCAB_DIR" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# The workshop's regex tokenizers
# ---------------------------------------------------------------------------------------------------------


def test_workshop_preprocessing_figures(verdict):
    with_whitespace = split_words(verdict, keep_whitespace=True)

    assert len(with_whitespace) == 8405
    assert len(set(with_whitespace)) == 1132
    assert with_whitespace[:6] == ["I", " ", "HAD", " ", "always", " "]
    assert len(split_words(verdict)) == 4690


def test_simple_tokenizer_v1_reproduces_the_workshop(verdict):
    tokenizer = SimpleTokenizerV1(build_vocab(verdict, keep_whitespace=True))
    text = "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow"

    ids = tokenizer.encode(text)

    assert tokenizer.vocab_size == 1132
    assert ids == [55, 46, 151, 1005, 59, 40, 820, 117, 258, 488, 8, 1004, 117, 502, 437]
    assert tokenizer.decode(ids) == "I HAD always thought Jack Gisburn rather a cheap genius -- though a good fellow"


def test_simple_tokenizer_v1_round_trips_punctuation(verdict):
    tokenizer = SimpleTokenizerV1.from_text(verdict)
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'

    assert tokenizer.vocab_size == 1130
    assert tokenizer.decode(tokenizer.encode(text)) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'


def test_simple_tokenizer_v1_names_the_unknown_word(verdict):
    tokenizer = SimpleTokenizerV1.from_text(verdict)

    with pytest.raises(TokenizerError, match=r"'Hello' is not in the vocabulary \(1130 tokens\).*V2"):
        tokenizer.encode("Hello, do you like tea?")


def test_simple_tokenizer_v2_reproduces_the_book(verdict):
    tokenizer = SimpleTokenizerV2.from_text(verdict)
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))

    ids = tokenizer.encode(text)

    assert tokenizer.vocab_size == 1132
    assert (tokenizer.str_to_int[END_OF_TEXT], tokenizer.str_to_int[UNKNOWN]) == (1130, 1131)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tokenizer.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."


def test_simple_tokenizer_v2_separator_glued_to_words(verdict):
    tokenizer = SimpleTokenizerV2.from_text(verdict)

    assert tokenizer.encode("pride<|endoftext|>pride") == [tokenizer.str_to_int[w] for w in ("pride", END_OF_TEXT, "pride")]


def test_simple_tokenizer_v2_needs_its_special_tokens(verdict):
    with pytest.raises(TokenizerError, match=r"needs <\|endoftext\|> and <\|unk\|>"):
        SimpleTokenizerV2(build_vocab(verdict))


def test_build_vocab_is_sorted_with_specials_last():
    vocab = build_vocab("b a, c. a", special_tokens=(END_OF_TEXT, UNKNOWN))

    assert list(vocab) == [",", ".", "a", "b", "c", END_OF_TEXT, UNKNOWN]
    assert list(vocab.values()) == list(range(7))
