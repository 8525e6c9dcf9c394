"""The call log of a storage root, opened by one writer at a time, and an LLM session
(backend + call log) for the stages.

DuckDB lets one process write a database file. Every writer (the LLM stages, ``cdsr
llm-log import``) takes the storage's ``llm_calls`` lock first, so a second one waits
for the first and says whom it waits for, instead of failing on DuckDB's file lock.

A shard of a sharded stage (``llm.shards``) writes its own file,
``llm_calls.shard-K.duckdb`` under its own lock, so shards run side by side; its
lookups also read the shared log, and when the shard's stage ends its answers are
moved into the shared log (so ``cdsr llm-log export`` sees them). A shard log left by
a killed run is moved by the next run of that shard, or by the next export or import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cdsr_pipeline.llm.backends import LLMBackend, LLMConfig, open_backend
from cdsr_pipeline.llm.calllog import CallLog, ShardCallLog
from cdsr_pipeline.storage import ArtifactStore, StorageLockTimeout

CALL_LOG_FILE = "llm_calls.duckdb"
CALL_LOG_LOCK = "llm_calls"


def call_log_path(store: ArtifactStore) -> Path:
    """``<storage>/cache/llm_calls.duckdb``."""
    return store.root / "cache" / CALL_LOG_FILE


def shard_call_log_path(store: ArtifactStore, shard: int | str) -> Path:
    """``<storage>/cache/llm_calls.shard-K.duckdb``: the log that shard K writes while it runs."""
    return store.root / "cache" / f"llm_calls.shard-{shard}.duckdb"


def _shard_lock_name(shard: int | str) -> str:
    return f"{CALL_LOG_LOCK}.shard-{shard}"


def _move_into_shared(shard_log: Path, shared: CallLog) -> int:
    """Move the answers of ``shard_log`` (its writer's lock held) into ``shared``."""
    added = shared.absorb(shard_log)
    shard_log.unlink()
    shard_log.with_name(shard_log.name + ".wal").unlink(missing_ok=True)
    return added


def _move_idle_shard_logs(store: ArtifactStore, shared: CallLog, on_wait: Callable[[str], None] | None) -> None:
    """Move every shard log that no running shard holds into ``shared`` (its lock held)."""
    pattern = shard_call_log_path(store, "*")
    before, after = pattern.name.split("*")
    for shard_log in sorted(pattern.parent.glob(pattern.name)):
        shard = shard_log.name.removeprefix(before).removesuffix(after)
        try:
            with store.lock(_shard_lock_name(shard), "moving its answers into the shared call log", timeout=0):
                if shard_log.exists():
                    _move_into_shared(shard_log, shared)
        except StorageLockTimeout as busy:
            if on_wait is not None:
                on_wait(f"left {shard_log.name} as it is (a shard is running: {busy}); its answers join the shared log when it ends")


@contextlib.contextmanager
def locked_call_log(
    store: ArtifactStore, holder: str, *, on_wait: Callable[[str], None] | None = None
) -> Iterator[CallLog]:
    """The storage's call log, open while this process holds its lock (``holder`` names
    this writer in the message another writer sees while it waits), with the answers of
    shard logs that no running shard holds moved into it."""
    with store.lock(CALL_LOG_LOCK, holder, on_wait=on_wait), CallLog(call_log_path(store)) as call_log:
        _move_idle_shard_logs(store, call_log, on_wait)
        yield call_log


@contextlib.contextmanager
def shard_call_log(
    store: ArtifactStore, shard: int, holder: str, *, on_wait: Callable[[str], None] | None = None
) -> Iterator[CallLog]:
    """Shard ``shard``'s own log (its lock held), reading the shared log too; at the end
    its answers move into the shared log, also when the stage failed."""
    path = shard_call_log_path(store, shard)
    shared_lock = lambda: store.lock(CALL_LOG_LOCK, f"{holder} (reading)", on_wait=on_wait)  # noqa: E731
    with store.lock(_shard_lock_name(shard), holder, on_wait=on_wait):
        try:
            with ShardCallLog(path, call_log_path(store), shared_lock) as call_log:
                yield call_log
        finally:
            with store.lock(CALL_LOG_LOCK, f"{holder} (moving its answers in)", on_wait=on_wait):
                with CallLog(call_log_path(store)) as shared:
                    if path.exists():
                        _move_into_shared(path, shared)


@contextlib.contextmanager
def llm_session(
    store: ArtifactStore,
    config: LLMConfig,
    holder: str,
    *,
    on_wait: Callable[[str], None] | None = None,
    shard: int | None = None,
) -> Iterator[tuple[LLMBackend, CallLog]]:
    """The configured backend (closed at the end) and the locked call log of ``store``:
    the shared log, or shard ``shard``'s own (see the module's docstring)."""
    call_logs = (
        locked_call_log(store, holder, on_wait=on_wait)
        if shard is None
        else shard_call_log(store, shard, holder, on_wait=on_wait)
    )
    with call_logs as call_log:
        backend = open_backend(config)
        try:
            yield backend, call_log
        finally:
            backend.close()
