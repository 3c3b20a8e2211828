"""Fetching files: streamed, retried with backoff, resumable, checksummed, written atomically.

Every stage that reads something from the network (the pretraining text, GPT-2 checkpoints, the
instruction data) goes through :func:`download` or :func:`fetch`, so there is one implementation of
retries, HTTP Range resume and integrity checks. ``file://`` URLs and plain paths are accepted too, so an
air-gapped user points a stage at local files with the same setting.

A partial download is kept as ``<dest>.part`` (with its ``.part.url`` beside it) so the next attempt
resumes with a Range request; the final file only appears, by rename, once its size and sha256 check out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm.auto import tqdm

from groundup.errors import SourceUnreachable
from groundup.files import CHUNK, atomic_path, sha256_file

log = logging.getLogger(__name__)

USER_AGENT = "groundup/0.1 (+https://github.com/groundup)"


# A body cut short surfaces from requests as ChunkedEncodingError (urllib3's IncompleteRead), which is not a
# ConnectionError; it is the very case Range resume exists for.
RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    ConnectionError,
    requests.HTTPError,
)


class DownloadError(SourceUnreachable):
    """A source that could not be fetched or failed its integrity checks; the message names the source."""

    # True when some URL failed for a reason that may pass (connection, timeout, 5xx), so trying again later
    # (e.g. a Prefect task retry) makes sense; False when all failed for good (404, no such file, checksum).
    retryable = False


class ChecksumError(DownloadError):
    pass


@dataclass(frozen=True)
class Fetched:
    """Where a source ended up and what it was."""

    path: Path
    sha256: str
    size: int
    source: str


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "file")


def local_path(source: str | os.PathLike) -> Path | None:
    """The local file a source names (a plain path or a file:// URL), or None for http(s)."""
    text = str(source)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(text).expanduser()


def check_local_file(path: Path, source: str) -> None:
    if not path.exists():
        raise DownloadError(f"{source}: no such file")
    if path.is_dir():
        raise DownloadError(f"{source}: is a directory, expected a file")


def _verify(path: Path, source: str, sha256: str | None, size: int | None) -> str:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DownloadError(f"{source}: expected {size} bytes, got {actual_size} (truncated or corrupted)")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise ChecksumError(f"{source}: sha256 mismatch: expected {sha256.lower()}, got {digest}")
    return digest


def _stream_once(url: str, part: Path, timeout: float, progress: bool, session: requests.Session) -> int | None:
    """One HTTP attempt, appending to ``part`` (resuming with Range if it has bytes). Returns the total size."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as response:
        if response.status_code == 416 and offset:
            # Our partial file is at least as long as the resource: start over rather than guess.
            part.unlink()
            raise ConnectionError("range not satisfiable; restarting from zero")
        if response.status_code in (404, 410, 401, 403):
            raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
        response.raise_for_status()
        if offset and response.status_code != 206:
            offset = 0  # server ignored Range: the body is the whole file
        total = response.headers.get("Content-Length")
        total_size = int(total) + offset if total is not None else None
        mode = "ab" if offset else "wb"
        bar = tqdm(
            total=total_size,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=Path(urllib.parse.urlparse(url).path).name or url,
            disable=not progress or not sys.stderr.isatty(),
            leave=False,
        )
        written = offset
        with open(part, mode) as fh, bar:
            for block in response.iter_content(CHUNK):
                fh.write(block)
                written += len(block)
                bar.update(len(block))
        if total_size is not None and written < total_size:
            raise ConnectionError(f"connection closed after {written} of {total_size} bytes")
        return total_size


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    mirrors: tuple[str, ...] | list[str] = (),
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
    session: requests.Session | None = None,
) -> Fetched:
    """Download ``url`` (falling back to ``mirrors``) to ``dest`` and verify it.

    Retries connection errors, timeouts, truncated bodies and 5xx answers ``retries`` times per URL with
    exponential backoff, resuming from the bytes already received. A 4xx answer or a failed checksum is
    not retried (the same bytes would come back). ``dest`` exists afterwards only if it verified.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is not None or size is not None):
        try:
            digest = _verify(dest, str(dest), sha256, size)
            return Fetched(dest, digest, dest.stat().st_size, url)
        except DownloadError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part_url = dest.with_name(dest.name + ".part.url")
    session = session or requests.Session()
    errors: list[str] = []
    checksum_failures = 0
    transient_failures = 0
    for candidate in [url, *mirrors]:
        local = local_path(candidate)
        if local is not None:
            try:
                check_local_file(local, candidate)
                with atomic_path(dest) as tmp:
                    shutil.copyfile(local, tmp)
                    digest = _verify(tmp, candidate, sha256, size)
                return Fetched(dest, digest, dest.stat().st_size, candidate)
            except DownloadError as exc:
                errors.append(str(exc))
                checksum_failures += isinstance(exc, ChecksumError)
                continue
        # A partial file from another URL may hold other bytes: only resume our own.
        if part.exists() and (not part_url.exists() or part_url.read_text() != candidate):
            part.unlink()
        part_url.write_text(candidate)
        for attempt in range(retries + 1):
            try:
                total = _stream_once(candidate, part, timeout, progress, session)
                digest = _verify(part, candidate, sha256, size if size is not None else total)
                os.replace(part, dest)
                part_url.unlink(missing_ok=True)
                return Fetched(dest, digest, dest.stat().st_size, candidate)
            except ChecksumError as exc:
                part.unlink(missing_ok=True)
                errors.append(str(exc))
                checksum_failures += 1
                break
            except DownloadError as exc:
                part.unlink(missing_ok=True)
                errors.append(str(exc))
                break
            except RETRYABLE as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status is not None and 400 <= status < 500:
                    part.unlink(missing_ok=True)
                    errors.append(f"{candidate}: HTTP {status}")
                    break
                if attempt == retries:
                    errors.append(f"{candidate}: {type(exc).__name__}: {exc} (after {retries + 1} attempts)")
                    transient_failures += 1
                    break
                delay = backoff * (2**attempt)
                log.warning("%s: %s; retrying in %.1fs (attempt %d/%d)", candidate, exc, delay, attempt + 2, retries + 1)
                time.sleep(delay)
    # Nothing verified: leave no partial state behind for a source we gave up on.
    part.unlink(missing_ok=True)
    part_url.unlink(missing_ok=True)
    # Only wrong bytes everywhere is a ChecksumError; callers treat it differently from "unreachable".
    error = (ChecksumError if checksum_failures == len(errors) else DownloadError)(
        "could not fetch " + url + ": " + "; ".join(errors)
    )
    error.retryable = transient_failures > 0
    raise error


def fetch(
    source: str | os.PathLike,
    cache_dir: str | Path,
    *,
    sha256: str | None = None,
    filename: str | None = None,
    **kwargs,
) -> Fetched:
    """Make ``source`` available locally, content-addressed under ``cache_dir/<sha256>/<filename>``.

    Local paths are verified and used in place (no copy). For URLs with a known ``sha256`` a cached copy is
    a hit without any network access; otherwise the file is downloaded, hashed and moved into place.
    """
    source = str(source)
    local = local_path(source)
    if local is not None and urllib.parse.urlparse(source).scheme != "file":
        check_local_file(local, source)
        digest = _verify(local, source, sha256, None)
        return Fetched(local.resolve(), digest, local.stat().st_size, source)
    name = filename or Path(urllib.parse.urlparse(source).path).name or "download"
    cache_dir = Path(cache_dir)
    if sha256:
        cached = cache_dir / sha256.lower() / name
        if cached.is_file():
            return download(source, cached, sha256=sha256, **kwargs)
    staging = cache_dir / "incoming" / hashlib.sha256(source.encode()).hexdigest()[:16] / name
    try:
        fetched = download(source, staging, sha256=sha256, **kwargs)
    except DownloadError:
        # download() removed its partial files; drop the then empty staging folders too.
        shutil.rmtree(staging.parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.parent.parent.rmdir()
        raise
    final = cache_dir / fetched.sha256 / name
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched.path, final)
    shutil.rmtree(staging.parent, ignore_errors=True)
    return Fetched(final, fetched.sha256, fetched.size, source)
