"""Small file helpers every stage uses: hashing and writes that never leave half a file behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20


def sha256_file(path: str | Path, chunk_size: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(directory: str | Path, pattern: str = "*") -> str:
    """A digest of every file below ``directory`` (names and contents), independent of its location."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(destination: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place only if the block succeeds."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=suffix + ".tmp", dir=destination.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, destination)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(destination: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    with atomic_path(destination) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_json(destination: str | Path, data: Any, indent: int | None = 2) -> Path:
    with atomic_open(destination) as fh:
        json.dump(data, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")
    return Path(destination)


def publish_rename(source: Path, destination: Path) -> bool:
    """Rename ``source`` to ``destination`` unless another process published ``destination`` first (then
    ``source`` is left for the caller to delete). Returns whether this call published it."""
    try:
        os.rename(source, destination)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and destination.exists():
            return False
        raise


@contextlib.contextmanager
def atomic_directory(destination: str | Path, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``destination`` to fill; it replaces ``destination`` as a whole
    only if the block succeeds, so a failure or a kill never leaves a half-written directory there.

    ``keep(destination)`` true means what is there already is as good as ours (a content-addressed output
    another run published first): it stays, ours is dropped, and readers of it are never pulled away."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield tmp
        # Directories cannot be renamed over non-empty ones: move the old one aside first. Another process
        # may be doing the same with the same destination; each round moves aside whatever is there.
        for _ in range(100):
            try:
                os.rename(tmp, destination)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if keep is not None and keep(destination):
                break
            old = tmp.with_suffix(".old")
            with contextlib.suppress(FileNotFoundError):
                os.replace(destination, old)
            shutil.rmtree(old, ignore_errors=True)
        else:
            raise OSError(errno.EBUSY, f"{destination} kept being replaced by other processes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the block: other processes wait for it.
    The kernel releases it when the holder exits, so a killed holder never leaves it taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if os.name == "nt":
            import msvcrt

            fh.seek(0)
            while True:  # LK_LOCK gives up after about 10 s; wait as long as the holder holds it
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
