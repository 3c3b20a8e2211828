"""The artifact store: files and directories stages hand each other, addressed by URL, shared by machines.

A store is a folder (``/data/groundup-store``) or any fsspec URL (``s3://bucket/prefix``, ``gs://...``).
What is put there is addressed by the SHA-256 of its content::

    <root>/sha256/<digest>/<name>            the file, or the directory's files below it
    <root>/sha256/<digest>.json              the manifest: written last, so its presence means "complete"
    <root>/records/<name>.json               a named record (JSON) that moves: the newest checkpoint of a
                                             training run, the published result of a placed stage

The URL of an artifact is ``<root>/sha256/<digest>/<name>``: the digest in the URL makes a Prefect cache key
computed over URLs content-addressed, so an unchanged input is a cache hit on any worker.

Publishing is safe when several runs produce the same artifact at once: equal digests mean equal bytes, so
writers that overlap write the same objects, and a reader trusts a digest only once its manifest is there
(a manifest names every file with its own digest, and is one atomic object PUT or an ``os.replace``). A
writer that finds the manifest skips the upload. ``get`` waits (bounded) for an artifact another run is
still writing. Each machine keeps its own cache of what it downloaded (``cache_dir``), filled atomically
and verified against the manifest.

S3-compatible servers other than AWS (MinIO, moto) are reached through ``AWS_ENDPOINT_URL`` (read by
boto3/s3fs) or ``MLFLOW_S3_ENDPOINT_URL`` (MLflow's own name for it); credentials the usual AWS way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from groundup.errors import InputDataError, SettingsError, SourceUnreachable
from groundup.files import atomic_path, publish_rename, sha256_file, sha256_tree

STORE_URL_ENV = "GROUNDUP_STORE_URL"
CACHE_DIR_ENV = "GROUNDUP_STORE_CACHE"
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
OBJECTS = "sha256"
MANIFEST_SUFFIX = ".json"
RECORDS = "records"


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: an S3-compatible endpoint from the environment, when one is set."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = next((os.environ[name] for name in ENDPOINT_ENVS if os.environ.get(name)), None)
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def is_url(value: Any) -> bool:
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


class ArtifactStore:
    """Content-addressed put/get of files and directories in one store root, with a local cache."""

    def __init__(self, url: str | Path, cache_dir: str | Path) -> None:
        url = str(url)
        if not is_url(url):
            url = str(Path(url.removeprefix("file://")).resolve())
        self.url = url.rstrip("/")
        self.cache_dir = Path(cache_dir).resolve()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options(self.url))
        except (ImportError, ValueError) as exc:
            raise SettingsError(
                f"artifact store {self.url!r}: {exc}",
                fix="pip install 'groundup[cluster]' for s3://, or use a folder",
            ) from None
        self.root = self.root.rstrip("/")

    # -- addresses ---------------------------------------------------------------------------------------

    def _url_of(self, digest: str, name: str) -> str:
        return f"{self.url}/{OBJECTS}/{digest}/{name}"

    def _parse(self, url: str) -> tuple[str, str]:
        """``(digest, name)`` of an artifact URL of this store."""
        prefix = f"{self.url}/{OBJECTS}/"
        rest = url[len(prefix) :] if url.startswith(prefix) else ""
        digest, _, name = rest.partition("/")
        if len(digest) != 64 or not name or "/" in name:
            raise InputDataError(f"{url!r} is not an artifact of the store {self.url!r}")
        return digest, name

    def _remote(self, digest: str, *parts: str) -> str:
        return "/".join([self.root, OBJECTS, digest, *parts])

    def _manifest_path(self, digest: str) -> str:
        return f"{self.root}/{OBJECTS}/{digest}{MANIFEST_SUFFIX}"

    def owns(self, value: Any) -> bool:
        return isinstance(value, str) and value.startswith(f"{self.url}/{OBJECTS}/")

    # -- put ---------------------------------------------------------------------------------------------

    def put(self, path: str | Path) -> str:
        """Publish a file or directory (a no-op when the store has it already); returns its URL."""
        path = Path(path)
        if path.is_dir():
            files = {
                p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()
            }
            digest, kind = sha256_tree(path), "directory"
        elif path.is_file():
            digest, kind = sha256_file(path), "file"
            files = {"": digest}
        else:
            raise InputDataError(
                f"{path}: nothing to publish to the artifact store (no such file or directory)"
            )
        if self.manifest(digest) is None:
            for relative in files:
                source = path / relative if relative else path
                self._upload(source, self._remote(digest, path.name, *filter(None, [relative])))
            manifest = {"name": path.name, "kind": kind, "sha256": digest, "files": files}
            self._write_manifest(digest, manifest)
        return self._url_of(digest, path.name)

    def _upload(self, source: Path, target: str) -> None:
        if isinstance(self.fs, LocalFileSystem):
            # A folder: copy beside and rename, so an overlapping writer never exposes half a file.
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        else:  # one object PUT is atomic on S3 and its kin
            self.fs.put_file(str(source), target)

    def _write_manifest(self, digest: str, manifest: dict[str, Any]) -> None:
        self._write_json(self._manifest_path(digest), manifest)

    def _write_json(self, target: str, content: dict[str, Any]) -> None:
        """One atomic write: a reader sees the old content or the new, never a mix."""
        data = json.dumps(content, indent=1, sort_keys=True).encode()
        if isinstance(self.fs, LocalFileSystem):
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        else:
            self.fs.pipe_file(target, data)

    def manifest(self, digest: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self._manifest_path(digest)))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise InputDataError(
                f"{self._manifest_path(digest)}: damaged artifact manifest ({exc}); delete it"
            ) from None

    def exists(self, url: str) -> bool:
        digest, _ = self._parse(url)
        return self.manifest(digest) is not None

    def delete(self, url: str) -> None:
        """Remove an artifact: its manifest first, so no reader takes the rest for complete."""
        digest, name = self._parse(url)
        self.fs.rm(self._manifest_path(digest))
        self.fs.rm(self._remote(digest), recursive=True)

    # -- named records -----------------------------------------------------------------------------------

    def _record_path(self, name: str) -> str:
        return f"{self.root}/{RECORDS}/{name}.json"

    def write_record(self, name: str, record: dict[str, Any]) -> None:
        """Point ``name`` (``checkpoints/<run>``, ``stages/<key>``) at ``record``, replacing what it held in
        one atomic write."""
        self._write_json(self._record_path(name), record)

    def read_record(self, name: str) -> dict[str, Any] | None:
        """The record ``name`` holds, or None when there is none (or it is unreadable: written by nothing
        this store trusts, so treated as absent)."""
        try:
            return json.loads(self.fs.cat_file(self._record_path(name)))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def publish_snapshot(self, name: str, directory: str | Path, **info: Any) -> str:
        """Put ``directory`` as it is now and point the record ``name`` at it (with ``info``); returns the
        snapshot's URL. The snapshot it replaces is deleted: the training task calls this after every
        checkpoint (so a run killed on one machine resumes on another), and only the newest is needed."""
        previous = self.read_record(name)
        url = self.put(directory)
        self.write_record(name, {"url": url, **info})
        if previous and previous.get("url") != url and self.owns(previous.get("url")):
            self.delete(previous["url"])
        return url

    def restore_snapshot(self, name: str, directory: str | Path) -> dict[str, Any] | None:
        """Fill ``directory``, when it does not exist, from the snapshot the record ``name`` points at;
        returns that record, or None when there was nothing to restore (or ``directory`` exists: what this
        machine wrote itself is never overwritten)."""
        directory = Path(directory)
        for _ in range(3):  # a snapshot replaced (and deleted) while we read it: the record has a newer one
            record = self.read_record(name)
            if directory.exists() or record is None or not self.exists(record["url"]):
                return None
            try:
                copy = self.get(record["url"])
                break
            except SourceUnreachable:
                continue
        else:
            return None
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            shutil.copytree(copy, staging / directory.name)
            publish_rename(staging / directory.name, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return record

    # -- get ---------------------------------------------------------------------------------------------

    def get(self, url: str, wait: float = 0.0) -> Path:
        """A local copy of an artifact (from this machine's cache when it has one). ``wait``: seconds to
        wait for an artifact another run is still publishing."""
        digest, name = self._parse(url)
        local = self.cache_dir / digest / name
        if local.exists():
            return local
        manifest = self._await_manifest(digest, wait)
        if manifest is None:
            raise SourceUnreachable(
                f"{url}: not in the artifact store (no manifest {self._manifest_path(digest)})"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=self.cache_dir))
        try:
            for relative, sha in manifest["files"].items():
                target = staging / name / relative if relative else staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self._remote(digest, name, *filter(None, [relative])), str(target))
                if sha256_file(target) != sha:
                    raise InputDataError(
                        f"{url}: {relative or name} does not match its digest in the manifest"
                    )
            if manifest["kind"] == "directory":
                (staging / name).mkdir(exist_ok=True)  # an empty directory has no files to create it
            publish_rename(staging, self.cache_dir / digest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return local

    def _await_manifest(self, digest: str, wait: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + wait
        while (manifest := self.manifest(digest)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return manifest


def from_environment(output_dir: str | Path) -> ArtifactStore | None:
    """The store configured for this process (``GROUNDUP_STORE_URL``), caching under ``output_dir``
    unless ``GROUNDUP_STORE_CACHE`` says where; None when no store is configured."""
    url = os.environ.get(STORE_URL_ENV)
    if not url:
        return None
    cache = os.environ.get(CACHE_DIR_ENV) or Path(output_dir) / "store-cache"
    return ArtifactStore(url, cache)
