"""The Parquet token store: exactly tiktoken's ids however the text is cut, compact row groups, metadata,
and a clear error (with nothing written) for unusable input."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groundup.text.corpus import CorpusError, iter_text
from groundup.text.store import (
    Document,
    TokenStoreError,
    iter_token_batches,
    read_metadata,
    read_tokens,
    safe_pieces,
    write_tokens,
)
from groundup.text.tokenizers import END_OF_TEXT, get_tokenizer


@pytest.fixture(scope="module")
def gpt2(gpt2_vocab_dir):
    return get_tokenizer("gpt2", gpt2_vocab_dir)


def reference_ids(tokenizer, text: str) -> list[int]:
    """What tiktoken gives for the whole text at once (the workshop's encode call)."""
    return tokenizer.encode(text, allowed_special={END_OF_TEXT}, disallowed_special=())


def encode_in_pieces(tokenizer, pieces) -> list[int]:
    return [i for piece in pieces for i in reference_ids(tokenizer, piece)]


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Cutting text: the pieces must encode exactly like the whole
# ---------------------------------------------------------------------------------------------------------

# Whitespace runs, contractions, digits, punctuation runs, non-ASCII letters, characters Python calls
# whitespace but GPT-2's regex does not (U+001C), Unicode whitespace, and the end-of-text marker.
ALPHABET = [
    " ", " ", " ", "\n", "\n\n", "  ", "\t", "\r\n", " \n", "\n ", "\u00a0", "\u2028", "\x1c", "\u3000",
    "a", "word", "The", "x", "'s", "'t", "'ll", "'", "don", "42", "7", ".", ",", "--", "!?", '"', "(",
    "é", "naïve", "日本語", "🙂", "<|endoftext|>", "<|", "|>",
]


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def random_chunks(rng: random.Random, text: str) -> list[str]:
    chunks, position = [], 0
    while position < len(text):
        size = rng.randint(1, 40)
        chunks.append(text[position : position + size])
        position += size
    return chunks


def test_naive_cuts_would_change_the_tokens(gpt2):
    # Why cutting needs care: "\n\n" ending a piece is one token (628), inside text two "\n" (198, 198);
    # a space belongs to the word after it (" world" is 995).
    for text, cut in [("Hello\n\nworld", 7), ("Hello world", 6)]:
        assert encode_in_pieces(gpt2, [text[:cut], text[cut:]]) != reference_ids(gpt2, text)
        assert encode_in_pieces(gpt2, safe_pieces([text[:cut], text[cut:]], target=1)) == reference_ids(gpt2, text)


def test_safe_pieces_never_change_the_tokens_of_random_text(gpt2):
    rng = random.Random(1234)
    for case in range(400):
        text = random_text(rng, rng.randint(1, 120))
        pieces = list(safe_pieces(random_chunks(rng, text), target=rng.randint(1, 12)))

        assert "".join(pieces) == text
        assert encode_in_pieces(gpt2, pieces) == reference_ids(gpt2, text), (case, text, pieces)


def test_safe_pieces_actually_cut(gpt2, verdict_path):
    text = verdict_path.read_text(encoding="utf-8")

    pieces = list(safe_pieces([text[i : i + 1000] for i in range(0, len(text), 1000)], target=200))

    assert len(pieces) > 80
    assert max(map(len, pieces)) <= 200
    assert encode_in_pieces(gpt2, pieces) == reference_ids(gpt2, text)


def test_text_without_any_safe_cut_stays_one_piece():
    text = "a\n\n" * 50  # only whitespace runs between the words: no lone whitespace to cut at

    assert list(safe_pieces([text[i : i + 7] for i in range(0, len(text), 7)], target=10)) == [text]


# ---------------------------------------------------------------------------------------------------------
# Writing and reading the store
# ---------------------------------------------------------------------------------------------------------


def test_the_verdict_round_trips_exactly(gpt2, verdict_path, tmp_path):
    path = write_tokens(verdict_path, tmp_path / "verdict.parquet", "gpt2")

    tokens = read_tokens(path)
    metadata = read_metadata(path)

    assert tokens.dtype == np.uint16
    assert tokens.tolist() == gpt2.encode(verdict_path.read_text(encoding="utf-8"))
    assert len(tokens) == 5145
    assert tokens[:4].tolist() == [40, 367, 2885, 1464]
    assert {k: metadata[k] for k in ("tokenizer", "vocab_size", "eot_id", "tokens", "characters", "documents")} == {
        "tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256, "tokens": 5145, "characters": 20479, "documents": 1,
    }  # fmt: skip
    assert metadata["source_sha256"] == hashlib.sha256(verdict_path.read_bytes()).hexdigest()
    assert pq.ParquetFile(path).schema_arrow.field("token_ids").type == pa.uint16()


def test_summary_statistics_match_a_direct_count(gpt2, verdict_path, tmp_path):
    ids = np.array(gpt2.encode(verdict_path.read_text(encoding="utf-8")))
    counts = np.bincount(ids)

    metadata = read_metadata(write_tokens(verdict_path, tmp_path / "v.parquet", "gpt2"))

    assert metadata["unique_tokens"] == len(np.unique(ids))
    top_id, top_count = metadata["top_tokens"][0]
    assert top_count == counts.max() and counts[top_id] == top_count
    assert [c for _, c in metadata["top_tokens"]] == sorted(counts, reverse=True)[:20]


def test_documents_are_joined_with_end_of_text(gpt2, tmp_path):
    texts = ["First document.\n", "Second one, with  spaces \n\n", "Third: 42!"]
    paths = []
    for index, text in enumerate(texts):
        paths.append(tmp_path / f"doc{index}.txt")
        paths[-1].write_text(text, encoding="utf-8")

    path = write_tokens(paths, tmp_path / "docs.parquet", "gpt2", piece_chars=4)

    expected = reference_ids(gpt2, texts[0]) + [50256] + reference_ids(gpt2, texts[1]) + [50256] + reference_ids(gpt2, texts[2])
    assert read_tokens(path).tolist() == expected
    metadata = read_metadata(path)
    assert metadata["documents"] == 3
    assert [s["sha256"] for s in metadata["sources"]] == [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    assert [s["tokens"] for s in metadata["sources"]] == [len(reference_ids(gpt2, t)) for t in texts]
    digests = "\n".join(s["sha256"] for s in metadata["sources"])
    assert metadata["source_sha256"] == hashlib.sha256(digests.encode()).hexdigest()


def test_in_memory_documents_in_arbitrary_chunks(gpt2, tmp_path):
    rng = random.Random(7)
    texts = [random_text(rng, 300) for _ in range(4)]
    documents = [Document(f"doc{i}", random_chunks(rng, t)) for i, t in enumerate(texts)]

    path = write_tokens(documents, tmp_path / "mem.parquet", "gpt2", piece_chars=16, num_threads=3)

    expected = []
    for index, text in enumerate(texts):
        expected += ([50256] if index else []) + reference_ids(gpt2, text)
    assert read_tokens(path).tolist() == expected
    assert read_metadata(path)["sources"][0]["sha256"] == hashlib.sha256(texts[0].encode()).hexdigest()


def test_literal_end_of_text_is_the_special_token_unless_disallowed(gpt2, tmp_path):
    source = tmp_path / "joined.txt"
    source.write_text("one<|endoftext|>two", encoding="utf-8")

    special = read_tokens(write_tokens(source, tmp_path / "a.parquet", "gpt2")).tolist()
    ordinary = read_tokens(write_tokens(source, tmp_path / "b.parquet", "gpt2", allowed_special=frozenset())).tolist()

    assert special == gpt2.encode("one<|endoftext|>two", allowed_special={END_OF_TEXT})
    assert 50256 in special
    assert ordinary == gpt2.encode_ordinary("one<|endoftext|>two")


def test_row_groups_and_batches(gpt2, verdict_path, tmp_path):
    path = write_tokens(verdict_path, tmp_path / "v.parquet", "gpt2", row_group_size=1000, piece_chars=777)

    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sizes == [1000] * 5 + [145]
    assert np.concatenate(list(iter_token_batches(path))).tolist() == read_tokens(path).tolist()


def test_output_is_byte_identical_whatever_the_threads_and_pieces(verdict_path, tmp_path):
    first = write_tokens(verdict_path, tmp_path / "a.parquet", "gpt2", num_threads=1, piece_chars=1 << 20)
    second = write_tokens(verdict_path, tmp_path / "b.parquet", "gpt2", num_threads=4, piece_chars=300)

    assert first.read_bytes() == second.read_bytes()


def test_progress_reports_bytes_read(verdict_path, tmp_path):
    calls = []

    write_tokens(verdict_path, tmp_path / "v.parquet", "gpt2", on_progress=lambda done, total: calls.append((done, total)))

    size = verdict_path.stat().st_size
    assert calls and calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the input, nothing written
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"bad.txt: the file is empty"),
        (b"caf\xe9 au lait", r"bad.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\)"),
    ],
    ids=["empty", "not-utf8"],
)
def test_unusable_text_files(tmp_path, content, message):
    source = tmp_path / "in" / "bad.txt"
    source.parent.mkdir()
    source.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(CorpusError, match=message):
        write_tokens(source, out / "bad.parquet", "gpt2")

    assert leftovers(out) == []


def test_directory_and_missing_file(tmp_path):
    (tmp_path / "texts").mkdir()
    with pytest.raises(CorpusError, match=r"texts: is a directory, expected a text file"):
        write_tokens(tmp_path / "texts", tmp_path / "texts.parquet", "gpt2")
    with pytest.raises(CorpusError, match=r"absent.txt: no such file"):
        write_tokens(tmp_path / "absent.txt", tmp_path / "absent.parquet", "gpt2")
    assert leftovers(tmp_path) == ["texts"]


def test_bad_second_document_leaves_nothing(verdict_path, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine so far \xff")

    with pytest.raises(CorpusError, match="bad.txt: not UTF-8"):
        write_tokens([verdict_path, bad], tmp_path / "out.parquet", "gpt2")

    assert leftovers(tmp_path) == ["bad.txt"]


def test_invalid_utf8_offsets_are_exact_across_blocks(tmp_path):
    data = ("é" * 600).encode()  # two bytes per character: odd block sizes split characters
    source = tmp_path / "t.txt"
    source.write_bytes(data[:1000] + b"x\xa9" + data[1000:])  # a stray continuation byte at 1001

    for block in (1, 2, 3, 7, 1001, 4096):
        with pytest.raises(CorpusError, match=r"t.txt: not UTF-8 text \(invalid byte 0xa9 at offset 1001\)"):
            list(iter_text(source, chunk_bytes=block))

    source.write_bytes(data)
    assert "".join(iter_text(source, chunk_bytes=7)) == "é" * 600
    source.write_bytes(data + b"\xe2\x82")  # a character cut off at the end
    with pytest.raises(CorpusError, match=r"invalid byte 0xe2 at offset 1200"):
        list(iter_text(source, chunk_bytes=7))


def test_reading_something_that_is_not_a_token_store(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), plain)
    text = tmp_path / "text.parquet"
    text.write_text("not parquet")

    with pytest.raises(TokenStoreError, match="plain.parquet: a Parquet file without groundup token metadata"):
        read_tokens(plain)
    with pytest.raises(TokenStoreError, match="text.parquet: not a Parquet file"):
        read_metadata(text)
    with pytest.raises(TokenStoreError, match="is a directory"):
        read_tokens(tmp_path)
    with pytest.raises(TokenStoreError, match="absent.parquet: no such token file"):
        read_tokens(tmp_path / "absent.parquet")
