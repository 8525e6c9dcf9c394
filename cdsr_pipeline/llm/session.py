"""The call log of a storage root, opened by one writer at a time, and an LLM session
(backend + call log) for the stages.

DuckDB lets one process write a database file. Every writer (the LLM stages, ``cdsr
llm-log import``) takes the storage's ``llm_calls`` lock first, so a second one waits
for the first and says whom it waits for, instead of failing on DuckDB's file lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cdsr_pipeline.llm.backends import LLMBackend, LLMConfig, open_backend
from cdsr_pipeline.llm.calllog import CallLog
from cdsr_pipeline.storage import ArtifactStore

CALL_LOG_FILE = "llm_calls.duckdb"
CALL_LOG_LOCK = "llm_calls"


def call_log_path(store: ArtifactStore) -> Path:
    """``<storage>/cache/llm_calls.duckdb``."""
    return store.root / "cache" / CALL_LOG_FILE


@contextlib.contextmanager
def locked_call_log(
    store: ArtifactStore, holder: str, *, on_wait: Callable[[str], None] | None = None
) -> Iterator[CallLog]:
    """The storage's call log, open while this process holds its lock (``holder`` names
    this writer in the message another writer sees while it waits)."""
    with store.lock(CALL_LOG_LOCK, holder, on_wait=on_wait), CallLog(call_log_path(store)) as call_log:
        yield call_log


@contextlib.contextmanager
def llm_session(
    store: ArtifactStore, config: LLMConfig, holder: str, *, on_wait: Callable[[str], None] | None = None
) -> Iterator[tuple[LLMBackend, CallLog]]:
    """The configured backend (closed at the end) and the locked call log of ``store``."""
    with store.lock(CALL_LOG_LOCK, holder, on_wait=on_wait):
        backend = open_backend(config)
        try:
            with CallLog(call_log_path(store)) as call_log:
                yield backend, call_log
        finally:
            backend.close()
