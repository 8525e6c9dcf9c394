"""Artifact store: atomic writes, per-asset manifests and input fingerprints.

Every pipeline stage writes its outputs into ``<root>/artifacts/<asset>/`` together
with a ``manifest.json`` that records the fingerprint of what it was computed from
(code version, config, the data versions of its inputs) and the data version of what
it produced (a hash of the output files). A stage whose fingerprint is unchanged
reuses its outputs and reports the same data version; this is what makes reruns cheap
even when Dagster itself keeps no history (``dagster asset materialize`` without a
``DAGSTER_HOME``) or fires on unchanged upstream runs.

Nothing here imports Dagster: the store is usable from scripts, tests and the CLI.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 20


def default_storage_root() -> Path:
    """``$CDSR_STORAGE``, else the project's ``storage/`` (editable install), else ``./storage``."""
    env = os.environ.get("CDSR_STORAGE")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "cdsr_pipeline").is_dir():
        return repo / "storage"
    return (Path.cwd() / "storage").resolve()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileHashCache:
    """Content hashes of input files, recomputed only when size or mtime change.

    Raw Amazon dumps are gigabytes; hashing them on every run would cost more than
    the skip saves. The cache is a small JSON file written atomically, or, with no
    ``path``, this process's memory (:data:`PROCESS_FILE_HASHES`: files outside any
    storage root, such as the installed LLM weights).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._memory: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return self._memory
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.path is None:
            self._memory = entries
            return
        atomic_write_text(self.path, json.dumps(entries, indent=1, sort_keys=True))

    @staticmethod
    def _entry(stat: os.stat_result, digest: str) -> dict[str, Any]:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}

    def file_hash(self, file: str | os.PathLike[str]) -> str:
        return self.hashes_of([file])[0]

    def hashes_of(self, files: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The hashes of several files with one read of the cache and at most one write."""
        with self._lock:
            entries = self._load()
            digests, changed = [], False
            for file in files:
                resolved = Path(file).resolve()
                stat = resolved.stat()
                hit = entries.get(str(resolved))
                if hit and hit["size"] == stat.st_size and hit["mtime_ns"] == stat.st_mtime_ns:
                    digests.append(hit["sha256"])
                    continue
                digests.append(sha256_file(resolved))
                entries[str(resolved)] = self._entry(stat, digests[-1])
                changed = True
            if changed:
                self._save(entries)
            return digests

    def record(self, digests: Mapping[Path, str]) -> None:
        """Enter hashes computed elsewhere (a commit hashes its files while staging them)."""
        with self._lock:
            entries = self._load()
            for file, digest in digests.items():
                resolved = Path(file).resolve()
                entries[str(resolved)] = self._entry(resolved.stat(), digest)
            self._save(entries)


PROCESS_FILE_HASHES = FileHashCache(None)
"""Hashes of files outside a storage root, kept for this process's lifetime."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""The mode a plain ``open()`` would give a new file: mkstemp makes its files 0600, so
an artifact (or an export meant to be shared) would otherwise be readable by its owner only."""


def temp_file_beside(target: Path) -> tuple[int, str]:
    """A new hidden temporary file in ``target``'s folder (made if missing), open, with the
    mode a plain ``open()`` would give ``target``. Returns (file descriptor, path)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[str]:
    """The one way this package writes a file: a temporary path beside ``path`` to write
    to, which replaces ``path`` when the block ends without an exception and is removed
    otherwise, so that readers see the old file or the new one, never half of one."""
    target = Path(path)
    fd, tmp = temp_file_beside(target)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_target`), synced to disk."""
    with atomic_target(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """``pyarrow.parquet.write_table`` through :func:`atomic_target` (zstd unless told)."""
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression=kwargs.pop("compression", "zstd"), **kwargs)


@dataclass
class Manifest:
    """What an asset's outputs were computed from, and what they are."""

    asset: str
    code_version: str
    fingerprint: str
    data_version: str
    files: dict[str, dict[str, Any]]
    inputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def input_fingerprint(code_version: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The identity of a stage run: same code, same config, same input data => same output."""
    return stable_hash({"code_version": code_version, "config": dict(config), "inputs": dict(inputs)})


LOCK_POLL_SECONDS = 0.5
LOCK_NOTICE_SECONDS = 60.0


class StorageLockTimeout(RuntimeError):
    """Another process held a storage lock for longer than the caller would wait."""


@contextlib.contextmanager
def exclusive_lock(
    path: Path,
    holder: str,
    *,
    on_wait: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the block.

    A second process waits, told who holds it (``holder`` of the first, written into the
    file: pid, host, what it builds), once at first and then every minute, or fails
    after ``timeout`` seconds. The kernel drops the lock when its process dies, even
    by SIGKILL, so no lock outlives a killed run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        started = time.monotonic()
        noticed = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                held_by = handle.read().strip() or "another process"
                waited = time.monotonic() - started
                if timeout is not None and waited >= timeout:
                    raise StorageLockTimeout(f"{path} is held by {held_by}; gave up after {waited:.0f} s") from None
                if on_wait is not None and (noticed is None or time.monotonic() - noticed >= LOCK_NOTICE_SECONDS):
                    on_wait(f"waiting for {path.name}: held by {held_by} (waited {waited:.0f} s)")
                    noticed = time.monotonic()
                time.sleep(LOCK_POLL_SECONDS)
        try:
            handle.seek(0)
            handle.truncate()
            stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {stamp}: {holder}\n")
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


class MissingArtifactError(RuntimeError):
    """An upstream stage has not been materialized into this storage root yet."""


class ArtifactStore:
    """Folders of artifacts under ``root/artifacts``; caches under ``root/cache``."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).resolve() if root else default_storage_root()

    # -- layout ---------------------------------------------------------------
    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def asset_dir(self, asset: str) -> Path:
        return self.artifacts / asset

    def path(self, asset: str, name: str) -> Path:
        """Path of one output file of an asset (it may not exist yet)."""
        return self.asset_dir(asset) / name

    def cache_dir(self, name: str) -> Path:
        path = self.root / "cache" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(
        self, name: str, holder: str, *, on_wait: Callable[[str], None] | None = None, timeout: float | None = None
    ):
        """An exclusive lock of this storage root (``<root>/locks/<name>.lock``): one writer
        per asset, one per call log, across processes (see :func:`exclusive_lock`)."""
        return exclusive_lock(self.root / "locks" / f"{name}.lock", holder, on_wait=on_wait, timeout=timeout)

    @property
    def file_hashes(self) -> FileHashCache:
        return FileHashCache(self.root / "cache" / "file_hashes.json")

    # -- manifests ------------------------------------------------------------
    def read_manifest(self, asset: str) -> Manifest | None:
        try:
            return Manifest.from_json((self.asset_dir(asset) / MANIFEST_NAME).read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):  # an edited or truncated manifest: the asset is rebuilt
            return None

    def require(self, asset: str, produce: str | None = None) -> Manifest:
        """The manifest of an upstream asset, or a clear error saying how to produce it
        (``produce``: the command, when it is not ``cdsr run --select <asset>``)."""
        manifest = self.read_manifest(asset)
        problem = "no manifest" if manifest is None else self.damage(asset, manifest)
        if problem is not None:
            raise MissingArtifactError(
                f"asset '{asset}' has no complete output under {self.asset_dir(asset)} ({problem}); "
                f"materialize it (again) first ({produce or f'cdsr run --select {asset}'})"
            )
        return manifest

    def damage(self, asset: str, manifest: Manifest) -> str | None:
        """What is wrong with an asset's files against its manifest (a missing file, another
        size, other content), or None when they are what was committed. Contents are
        compared by SHA-256 through the file-hash cache: a file is hashed again only when
        its size or mtime changed since it was last hashed, so an edited or truncated file
        is caught and an untouched one costs a ``stat``."""
        folder = self.asset_dir(asset)
        for name, info in manifest.files.items():
            file = folder / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != info["bytes"]:
                return f"{name} has {size:,} bytes, the manifest says {info['bytes']:,}"
        digests = self.file_hashes.hashes_of([folder / name for name in manifest.files])
        for (name, info), digest in zip(manifest.files.items(), digests, strict=True):
            if digest != info["sha256"]:
                return f"{name} does not have the content its manifest records (edited or corrupted)"
        return None

    def cached(self, asset: str, fingerprint: str) -> Manifest | None:
        """The existing manifest if it was computed from exactly this fingerprint and its
        files are intact (a damaged version is rebuilt)."""
        manifest = self.read_manifest(asset)
        if manifest and manifest.fingerprint == fingerprint and self.damage(asset, manifest) is None:
            return manifest
        return None

    # -- publishing -----------------------------------------------------------
    def remove_leftovers(self, asset: str) -> list[Path]:
        """Remove the staged and trashed versions of ``asset`` that a killed process left
        (its staging context never ran its cleanup). Call with the asset's lock held: no
        live writer of the asset then has a folder there."""
        pattern = re.compile(re.escape(asset) + r"-[0-9a-f]{12}")
        removed = []
        for parent in (self.artifacts / ".staging", self.artifacts / ".trash"):
            if parent.is_dir():
                for folder in parent.iterdir():
                    if pattern.fullmatch(folder.name):
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(folder)
        return removed

    @contextlib.contextmanager
    def staging(self, asset: str) -> Iterator[Path]:
        """A fresh folder to write a new version of ``asset`` into; removed on failure."""
        staging_root = self.artifacts / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        folder = staging_root / f"{asset}-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit(
        self,
        asset: str,
        staged: Path,
        *,
        code_version: str,
        fingerprint: str,
        inputs: Mapping[str, str],
        config: Mapping[str, Any],
        metadata: Mapping[str, Any],
    ) -> Manifest:
        """Hash the staged files, write the manifest and swap the folder into place."""
        files = {}
        for file in sorted(p for p in staged.rglob("*") if p.is_file()):
            rel = file.relative_to(staged).as_posix()
            files[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        manifest = Manifest(
            asset=asset,
            code_version=code_version,
            fingerprint=fingerprint,
            data_version=stable_hash({k: v["sha256"] for k, v in files.items()})[:24],
            files=files,
            inputs=dict(inputs),
            config=dict(config),
            metadata=_jsonable(metadata),
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        atomic_write_text(staged / MANIFEST_NAME, manifest.to_json())
        final = self.asset_dir(asset)
        trash = self.artifacts / ".trash" / f"{asset}-{uuid.uuid4().hex[:12]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):  # only a cache (a full disk must not fail a committed asset)
            self.file_hashes.record({final / name: info["sha256"] for name, info in files.items()})
        staged.mkdir()  # the staging context removes it again
        return manifest


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))
