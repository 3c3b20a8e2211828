"""groundup.download against a real HTTP server on 127.0.0.1: retries, Range resume, mirrors, checksums,
file:// URLs and local paths, and that a failure never leaves a partial file behind."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from groundup.download import ChecksumError, DownloadError, download, fetch

FAST = {"backoff": 0.01, "timeout": 5.0, "progress": False}


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file()) if Path(directory).exists() else []


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def payload(file_server) -> bytes:
    # Big enough to span several read blocks, varied enough that a misplaced byte changes the digest.
    data = bytes((i * 7 + i // 251) % 256 for i in range(300_000))
    (file_server.root / "corpus.bin").write_bytes(data)
    return data


@pytest.fixture
def big_payload(file_server) -> bytes:
    # Larger than download's 1 MiB read block, so a dropped transfer has written part of the file.
    data = os.urandom(2_500_000)
    (file_server.root / "big.bin").write_bytes(data)
    return data


def range_start(header: str | None) -> int:
    assert header is not None and header.startswith("bytes=") and header.endswith("-"), header
    return int(header.removeprefix("bytes=").removesuffix("-"))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/corpus.bin"


# ---------------------------------------------------------------------------------------------------------
# Success paths
# ---------------------------------------------------------------------------------------------------------


def test_fetch_stores_content_addressed_and_cleans_staging(file_server, payload, tmp_path):
    fetched = fetch(f"{file_server.url}/corpus.bin", tmp_path / "cache", **FAST)

    assert fetched.path == tmp_path / "cache" / sha256(payload) / "corpus.bin"
    assert fetched.path.read_bytes() == payload
    assert (fetched.sha256, fetched.size) == (sha256(payload), len(payload))
    assert files_under(tmp_path / "cache") == [fetched.path]


def test_fetch_with_known_sha256_hits_the_cache_without_network(file_server, payload, tmp_path):
    url = f"{file_server.url}/corpus.bin"
    first = fetch(url, tmp_path / "cache", sha256=sha256(payload), **FAST)
    requests_before = len(file_server.requests)

    again = fetch(url, tmp_path / "cache", sha256=sha256(payload).upper(), **FAST)

    assert again.path == first.path
    assert len(file_server.requests) == requests_before


def test_corrupted_cached_copy_is_downloaded_again(file_server, payload, tmp_path):
    url = f"{file_server.url}/corpus.bin"
    first = fetch(url, tmp_path / "cache", sha256=sha256(payload), **FAST)
    first.path.write_bytes(b"bit rot")

    again = fetch(url, tmp_path / "cache", sha256=sha256(payload), **FAST)

    assert again.path.read_bytes() == payload
    assert file_server.requests[-1] == ("GET", "corpus.bin", None)


def test_retries_server_errors_with_backoff(file_server, payload, tmp_path):
    file_server.fail("corpus.bin", status=500, times=2)

    fetched = download(f"{file_server.url}/corpus.bin", tmp_path / "corpus.bin", retries=3, **FAST)

    assert fetched.path.read_bytes() == payload
    assert [r[1] for r in file_server.requests] == ["corpus.bin"] * 3


def test_resumes_with_range_after_a_dropped_connection(file_server, big_payload, tmp_path):
    file_server.drop("big.bin", after=2_000_000)

    fetched = download(f"{file_server.url}/big.bin", tmp_path / "big.bin", sha256=sha256(big_payload), **FAST)

    assert fetched.path.read_bytes() == big_payload
    first, second = file_server.requests
    assert first[2] is None
    assert 0 < range_start(second[2]) <= 2_000_000
    assert files_under(tmp_path) == [tmp_path / "big.bin"]


def test_restarts_from_zero_when_the_server_ignores_range(file_server, big_payload, tmp_path):
    file_server.drop("big.bin", after=2_000_000)
    file_server.ignore_range = True

    fetched = download(f"{file_server.url}/big.bin", tmp_path / "big.bin", sha256=sha256(big_payload), **FAST)

    # It asked to resume, got the whole file with a 200 and wrote it from the start.
    assert range_start(file_server.requests[1][2]) > 0
    assert fetched.path.read_bytes() == big_payload


def test_partial_file_longer_than_the_resource_restarts(file_server, payload, tmp_path):
    url = f"{file_server.url}/corpus.bin"
    dest = tmp_path / "corpus.bin"
    dest.with_name("corpus.bin.part").write_bytes(b"x" * (len(payload) + 10))
    dest.with_name("corpus.bin.part.url").write_text(url)

    fetched = download(url, dest, sha256=sha256(payload), **FAST)

    assert fetched.path.read_bytes() == payload
    assert [r[2] for r in file_server.requests] == [f"bytes={len(payload) + 10}-", None]


def test_partial_file_from_another_url_is_not_resumed(file_server, payload, tmp_path):
    dest = tmp_path / "corpus.bin"
    dest.with_name("corpus.bin.part").write_bytes(payload[:1000])
    dest.with_name("corpus.bin.part.url").write_text("http://elsewhere.invalid/corpus.bin")

    fetched = download(f"{file_server.url}/corpus.bin", dest, sha256=sha256(payload), **FAST)

    assert fetched.path.read_bytes() == payload
    assert file_server.requests == [("GET", "corpus.bin", None)]


def test_falls_back_to_a_mirror(file_server, payload, tmp_path):
    fetched = download(
        f"{file_server.url}/missing/corpus.bin",
        tmp_path / "corpus.bin",
        mirrors=[f"{file_server.url}/corpus.bin"],
        sha256=sha256(payload),
        **FAST,
    )

    assert fetched.path.read_bytes() == payload
    assert fetched.source == f"{file_server.url}/corpus.bin"
    assert [r[1] for r in file_server.requests] == ["missing/corpus.bin", "corpus.bin"]


def test_falls_back_from_an_unreachable_url_to_a_file_url_mirror(payload, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(payload)

    fetched = download(closed_port_url(), tmp_path / "out" / "corpus.bin", mirrors=[local.as_uri()], retries=1, **FAST)

    assert fetched.path.read_bytes() == payload
    assert fetched.source == local.as_uri()


def test_file_url_is_copied_into_the_cache(payload, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(payload)

    fetched = fetch(local.as_uri(), tmp_path / "cache", **FAST)

    assert fetched.path == tmp_path / "cache" / sha256(payload) / "local.bin"
    assert fetched.path.read_bytes() == payload


def test_plain_path_is_used_in_place(payload, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(payload)

    fetched = fetch(str(local), tmp_path / "cache", sha256=sha256(payload))

    assert fetched.path == local.resolve()
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------------
# Failures: one clear error naming the source, nothing partial left behind
# ---------------------------------------------------------------------------------------------------------


def test_http_404_is_not_retried(file_server, tmp_path):
    url = f"{file_server.url}/nope.txt"
    with pytest.raises(DownloadError, match=rf"{url}.*HTTP 404") as caught:
        fetch(url, tmp_path / "cache", retries=3, **FAST)

    assert not caught.value.retryable
    assert len(file_server.requests) == 1
    assert files_under(tmp_path / "cache") == []


def test_persistent_server_errors_give_up_after_the_retries(file_server, payload, tmp_path):
    url = f"{file_server.url}/corpus.bin"
    file_server.fail("corpus.bin", status=503, times=10)

    with pytest.raises(DownloadError, match=rf"{url}.*503.*after 3 attempts") as caught:
        fetch(url, tmp_path / "cache", retries=2, **FAST)

    assert caught.value.retryable
    assert len(file_server.requests) == 3
    assert files_under(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "url, cause",
    [(closed_port_url(), "connection refused"), ("http://nonexistent.invalid/corpus.bin", "host name does not resolve")],
)
def test_a_source_that_cannot_be_reached_fails_at_once_and_says_what_to_do(url, cause, tmp_path, caplog):
    # Permanent for the length of a run: no retry would help, so none delays the message.
    with pytest.raises(DownloadError) as caught:
        fetch(url, tmp_path / "cache", retries=3, backoff=5.0, timeout=5.0, progress=False)

    message = str(caught.value)
    assert message.startswith(f"could not fetch {url}: ") and message.count(url) == 1
    assert cause in message and "--sources-dir DIR" in message
    assert "attempts" not in message and "retrying" not in caplog.text
    assert not caught.value.retryable and not caught.value.transient
    assert files_under(tmp_path / "cache") == []


def test_each_retry_is_logged_once(file_server, payload, tmp_path, caplog):
    url = f"{file_server.url}/corpus.bin"
    file_server.fail("corpus.bin", status=503, times=2)

    with caplog.at_level("WARNING", logger="groundup.download"):
        fetch(url, tmp_path / "cache", retries=3, **FAST)

    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(f"{url}: HTTP 503; retrying" in line for line in retries)


def test_download_truncated_on_every_attempt(file_server, payload, tmp_path):
    url = f"{file_server.url}/corpus.bin"
    file_server.drop("corpus.bin", after=0, times=10)
    file_server.ignore_range = True  # every attempt starts over and is cut again

    with pytest.raises(DownloadError, match=rf"could not fetch {url}.*after 2 attempts"):
        fetch(url, tmp_path / "cache", retries=1, **FAST)

    assert files_under(tmp_path / "cache") == []


def test_checksum_mismatch_keeps_nothing(file_server, payload, tmp_path):
    url = f"{file_server.url}/corpus.bin"
    wrong = "0" * 64

    with pytest.raises(ChecksumError, match=rf"{url}: sha256 mismatch: expected {wrong}, got {sha256(payload)}") as caught:
        fetch(url, tmp_path / "cache", sha256=wrong, retries=3, **FAST)

    assert not caught.value.retryable
    assert len(file_server.requests) == 1  # the same bytes would come back: no retry
    assert files_under(tmp_path / "cache") == []


def test_checksum_mismatch_of_a_local_file(payload, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(payload)

    with pytest.raises(ChecksumError, match="local.bin: sha256 mismatch"):
        fetch(str(local), tmp_path / "cache", sha256="1" * 64)
    with pytest.raises(ChecksumError, match="local.bin: sha256 mismatch"):
        fetch(local.as_uri(), tmp_path / "cache", sha256="1" * 64)

    assert local.read_bytes() == payload
    assert files_under(tmp_path / "cache") == []


def test_size_mismatch_is_an_error(file_server, payload, tmp_path):
    with pytest.raises(DownloadError, match=rf"expected {len(payload) + 1} bytes, got {len(payload)}"):
        download(f"{file_server.url}/corpus.bin", tmp_path / "corpus.bin", size=len(payload) + 1, **FAST)

    assert files_under(tmp_path) == []


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-url"])
def test_directory_instead_of_a_file(tmp_path, as_uri):
    directory = tmp_path / "texts"
    directory.mkdir()
    source = directory.as_uri() if as_uri else str(directory)

    with pytest.raises(DownloadError, match="texts: is a directory, expected a file") as caught:
        fetch(source, tmp_path / "cache")

    assert not caught.value.retryable
    assert files_under(tmp_path / "cache") == []


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-url"])
def test_missing_local_file(tmp_path, as_uri):
    missing = tmp_path / "absent.txt"
    source = missing.as_uri() if as_uri else str(missing)

    with pytest.raises(DownloadError, match="absent.txt: no such file"):
        fetch(source, tmp_path / "cache")


def test_failed_fetch_leaves_no_empty_staging_directories(file_server, tmp_path):
    with pytest.raises(DownloadError):
        fetch(f"{file_server.url}/nope.txt", tmp_path / "cache", **FAST)

    leftovers = [p for p in (tmp_path / "cache").rglob("*")] if (tmp_path / "cache").exists() else []
    assert leftovers == []


def test_download_never_writes_outside_its_destination_directory(file_server, payload, tmp_path):
    file_server.drop("corpus.bin", after=50_000)
    before = set(os.listdir(tmp_path))

    download(f"{file_server.url}/corpus.bin", tmp_path / "sub" / "corpus.bin", **FAST)

    assert set(os.listdir(tmp_path)) - before == {"sub"}
    assert os.listdir(tmp_path / "sub") == ["corpus.bin"]
