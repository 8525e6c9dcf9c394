"""The LLM call log: every call recorded in DuckDB, and the loop that asks only what is missing.

One row per call, keyed by a hash of everything that determines the answer: stage,
backend identity (model, GGUF sha256 or Ollama digest), prompt-template hash, item,
full prompt text and decoding parameters. So:

- a rerun serves recorded answers and asks nothing again;
- a changed template or model only misses its own entries (old rows stay, unused);
- a crash or a dead server loses nothing recorded: results are written in small
  transactions as they come, and the rerun resumes with what is missing.

Final failures (answers that stayed unparsable after every attempt) are recorded
too, with the raw text, and are served like answers: delete them to ask again
(:meth:`CallLog.forget_failures`).

DuckDB allows one writing process per file; a second run gets :class:`CallLogLockedError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import duckdb
import pyarrow as pa
from tqdm import tqdm

from cdsr_pipeline.llm.types import Completion, CompletionRequest, ContinuationRequest
from cdsr_pipeline.storage import stable_hash

log = logging.getLogger(__name__)

CALLS_TABLE = "llm_calls"
PREFIXES_TABLE = "llm_prompt_prefixes"
_COLUMNS = (
    "key", "stage", "item_key", "backend", "model", "identity", "template_hash", "params", "prompt",
    "prefix_hash", "raw_answer", "parsed", "status", "error", "attempts", "latency_s", "created_at", "server",
)
LOG_ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("stage", pa.string()),
        ("item_key", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("identity", pa.string()),
        ("template_hash", pa.string()),
        ("params", pa.string()),
        ("prompt", pa.string()),
        ("prefix_hash", pa.string()),
        ("raw_answer", pa.string()),
        ("parsed", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        ("created_at", pa.timestamp("us")),
        ("server", pa.string()),
    ]
)
"""The log's columns (:data:`_COLUMNS`, the table below) as Arrow types: :meth:`CallLog.record`
inserts through it in bulk, and the portable export (``llm.portable``) takes its types."""
assert tuple(LOG_ARROW_SCHEMA.names) == _COLUMNS
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {CALLS_TABLE} (
    key VARCHAR PRIMARY KEY,
    stage VARCHAR NOT NULL,
    item_key VARCHAR NOT NULL,
    backend VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    identity VARCHAR NOT NULL,      -- JSON: the backend's full identity
    template_hash VARCHAR NOT NULL,
    params VARCHAR NOT NULL,        -- JSON: decoding parameters of the first attempt
    prompt VARCHAR NOT NULL,        -- the per-item part of the prompt
    prefix_hash VARCHAR,            -- sha256 of the shared part (text in llm_prompt_prefixes)
    raw_answer VARCHAR,             -- the last answer's raw text
    parsed VARCHAR,                 -- JSON: the parsed result (null when failed)
    status VARCHAR NOT NULL,        -- ok | failed
    error VARCHAR,                  -- why the last answer was rejected
    attempts INTEGER NOT NULL,      -- answers obtained (first + retries)
    latency_s DOUBLE NOT NULL,      -- LLM time over all attempts
    created_at TIMESTAMP NOT NULL,
    server VARCHAR                  -- the server that gave the last answer (Ollama); null when in-process or imported
);
-- The shared few-shot part of the prompts, stored once: with it a recorded call's key
-- can be recomputed from its row (what ``cdsr llm-log import`` verifies).
CREATE TABLE IF NOT EXISTS {PREFIXES_TABLE} (
    prefix_hash VARCHAR PRIMARY KEY,
    prefix VARCHAR NOT NULL
);
-- Logs written before prefixes were kept: their rows have no prefix_hash.
ALTER TABLE {CALLS_TABLE} ADD COLUMN IF NOT EXISTS prefix_hash VARCHAR;
-- Logs written before the server was recorded.
ALTER TABLE {CALLS_TABLE} ADD COLUMN IF NOT EXISTS server VARCHAR;
"""


def _log_cell(column: str, value: Any) -> Any:
    # created_at arrives as text from a run ("2026-12-03 10:00:00") and as a datetime from an import
    if column == "created_at" and isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=None)
    return value


def prefix_hash(prefix: str) -> str:
    return hashlib.sha256(prefix.encode("utf-8")).hexdigest()


class CallLogLockedError(RuntimeError):
    """Another process has the call log open for writing."""


class AnswerError(ValueError):
    """An LLM answer that does not parse or validate."""


@dataclass(frozen=True)
class CallRecord:
    """The outcome of one call, fresh or from the log."""

    key: str
    item_key: str
    status: str  # "ok" | "failed"
    parsed: Any  # JSON-able; None when failed
    raw_answer: str | None
    error: str | None
    attempts: int
    latency_s: float
    server: str | None = None  # the server of the last answer (not read back from the log)


class CallLog:
    """A DuckDB file of LLM calls (default ``<storage>/cache/llm_calls.duckdb``)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise CallLogLockedError(
                    f"the LLM call log {self.path} is in use by another process (one run at a time "
                    f"writes it); wait for that run to finish or stop it. DuckDB said: {error}"
                ) from None
            raise
        self._con.execute(_SCHEMA)

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The log's DuckDB connection, for readers of its tables (:data:`CALLS_TABLE`,
        :data:`PREFIXES_TABLE`) such as the portable export; writes go through :meth:`record`."""
        return self._con

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> CallLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, keys: Sequence[str]) -> dict[str, CallRecord]:
        return self._lookup(keys, CALLS_TABLE)

    def _lookup(self, keys: Sequence[str], table: str) -> dict[str, CallRecord]:
        if not keys:
            return {}
        rows = self._con.execute(
            f"SELECT key, item_key, status, parsed, raw_answer, error, attempts, latency_s "
            f"FROM {table} WHERE key IN (SELECT unnest(?))",
            [list(keys)],
        ).fetchall()
        return {
            row[0]: CallRecord(
                key=row[0],
                item_key=row[1],
                status=row[2],
                parsed=json.loads(row[3]) if row[3] is not None else None,
                raw_answer=row[4],
                error=row[5],
                attempts=row[6],
                latency_s=row[7],
            )
            for row in rows
        }

    def record(self, rows: Sequence[Mapping[str, Any]], prefixes: Mapping[str, str] | None = None) -> None:
        """Insert (or replace) rows with the columns of the log, in one transaction,
        with the prompt prefixes they name (``prefix_hash -> prefix``).

        The rows go to DuckDB as one Arrow table and one ``INSERT ... SELECT``:
        ``executemany`` runs a statement per row (an import of 66,000 answers took
        6.6 minutes that way). A key given twice keeps its last row, as it would
        row by row.
        """
        if not rows:
            return
        last = {row["key"]: row for row in rows}
        calls = pa.Table.from_pylist(
            [{column: _log_cell(column, row.get(column)) for column in _COLUMNS} for row in last.values()],
            schema=LOG_ARROW_SCHEMA,
        )
        names = ", ".join(_COLUMNS)
        try:
            with self._transaction():
                if prefixes:
                    new_prefixes = pa.table({"prefix_hash": list(prefixes), "prefix": list(prefixes.values())})
                    self._con.register("_new_prefixes", new_prefixes)
                    self._con.execute(f"INSERT OR IGNORE INTO {PREFIXES_TABLE} SELECT prefix_hash, prefix FROM _new_prefixes")
                self._con.register("_new_calls", calls)
                # NOT NULL columns are checked by DuckDB
                self._con.execute(f"INSERT OR REPLACE INTO {CALLS_TABLE} ({names}) SELECT {names} FROM _new_calls")
        finally:
            for view in ("_new_prefixes", "_new_calls"):
                self._con.unregister(view)

    def absorb(self, other: str | os.PathLike[str]) -> int:
        """Copy every call and prompt prefix of the log file ``other`` into this log, in one
        transaction; a key this log already holds keeps its row. Returns the calls added.
        ``other`` must not be open in another process (its writer's lock held by the caller)."""
        before = self.count()
        self._con.execute(f"ATTACH '{_sql_path(other)}' AS absorbed (READ_ONLY)")
        names = ", ".join(_COLUMNS)
        try:
            with self._transaction():
                self._con.execute(f"INSERT OR IGNORE INTO {PREFIXES_TABLE} SELECT prefix_hash, prefix FROM absorbed.{PREFIXES_TABLE}")
                self._con.execute(f"INSERT OR IGNORE INTO {CALLS_TABLE} ({names}) SELECT {names} FROM absorbed.{CALLS_TABLE}")
        finally:
            self._con.execute("DETACH absorbed")
        return self.count() - before

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction for the block: committed at its end, rolled back if it raises."""
        self._con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

    def count(self, stage: str | None = None, status: str | None = None) -> int:
        query = f"SELECT count(*) FROM {CALLS_TABLE} WHERE (? IS NULL OR stage = ?) AND (? IS NULL OR status = ?)"
        return self._con.execute(query, [stage, stage, status, status]).fetchone()[0]

    def forget_failures(self, stage: str) -> int:
        """Delete the recorded failures of ``stage`` so that the next run asks them again."""
        removed = self.count(stage, "failed")
        self._con.execute(f"DELETE FROM {CALLS_TABLE} WHERE stage = ? AND status = 'failed'", [stage])
        return removed


def _sql_path(path: str | os.PathLike[str]) -> str:
    """A file path as a DuckDB string literal's content (ATTACH takes no parameters)."""
    return str(path).replace("'", "''")


class ShardCallLog(CallLog):
    """The call log of one item shard of an LLM stage: its own file (one writer per shard,
    so shards run side by side), whose lookups also read the storage's shared log
    (``shared``, opened read-only while ``shared_lock()`` holds that log's lock: answers
    recorded or imported there are served, never asked again)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        shared: str | os.PathLike[str],
        shared_lock: Callable[[], contextlib.AbstractContextManager],
    ):
        super().__init__(path)
        self.shared = Path(shared)
        self._shared_lock = shared_lock

    def lookup(self, keys: Sequence[str]) -> dict[str, CallRecord]:
        found = super().lookup(keys)
        missing = [key for key in keys if key not in found]
        if missing and self.shared.exists():
            with self._shared_lock():
                self._con.execute(f"ATTACH '{_sql_path(self.shared)}' AS shared (READ_ONLY)")
                try:
                    found |= self._lookup(missing, f"shared.{CALLS_TABLE}")
                finally:
                    self._con.execute("DETACH shared")
        return found


# -- asking what is missing ------------------------------------------------------------
Request = TypeVar("Request", CompletionRequest, ContinuationRequest)


@dataclass(frozen=True)
class LLMCall(Generic[Request]):
    item_key: str
    request: Request


@dataclass(frozen=True)
class Answer:
    text: str
    latency_s: float
    server: str | None = None  # which server answered (Ollama), for the call log


@dataclass
class CallStats:
    """What a stage's LLM calls cost and gave; goes into asset metadata."""

    stage: str
    calls: int = 0
    cached: int = 0  # served from the call log
    asked: int = 0  # sent to the LLM in this run
    answers: int = 0  # answers obtained in this run, retries included
    ok: int = 0
    failed: int = 0
    llm_seconds: float = 0.0  # LLM time in this run (sum over calls)
    wall_seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)  # item_key, error, raw_answer, attempts

    @property
    def failure_share(self) -> float:
        return self.failed / self.calls if self.calls else 0.0

    def as_metadata(self) -> dict[str, Any]:
        data = asdict(self)
        data["failure_share"] = round(self.failure_share, 6)
        data["failures"] = self.failures[:20]  # a sample; the full list is in the call log
        return data


@dataclass
class StageResult:
    """A stage's output table (schema from ``cdsr_pipeline.data.schema``) and its call statistics."""

    table: pa.Table
    stats: CallStats
    notes: dict[str, Any] = field(default_factory=dict)  # stage-specific counts for metadata

    def metadata(self) -> dict[str, Any]:
        return {**self.stats.as_metadata(), **self.notes, "rows": self.table.num_rows}


def completion_answers(
    complete: Callable[[Sequence[CompletionRequest]], Iterator[tuple[int, Completion]]],
) -> Callable[[Sequence[CompletionRequest]], Iterator[tuple[int, Answer]]]:
    """An ``execute`` for :func:`run_logged_calls` from a backend's ``complete``."""

    def execute(requests: Sequence[CompletionRequest]) -> Iterator[tuple[int, Answer]]:
        for index, completion in complete(requests):
            yield index, Answer(completion.text, completion.latency_s, completion.server)

    return execute


def continuation_answers(
    score: Callable[[Sequence[ContinuationRequest]], Iterator[tuple[int, list[float]]]],
) -> Callable[[Sequence[ContinuationRequest]], Iterator[tuple[int, Answer]]]:
    """An ``execute`` from a backend's ``continuation_logprobs``: the raw answer is
    the JSON object ``{continuation: log-probability}``."""

    def execute(requests: Sequence[ContinuationRequest]) -> Iterator[tuple[int, Answer]]:
        last = time.perf_counter()
        for index, logprobs in score(requests):
            now = time.perf_counter()
            text = json.dumps(dict(zip(requests[index].continuations, logprobs, strict=True)))
            yield index, Answer(text, now - last)
            last = now

    return execute


def reseed(request: CompletionRequest, attempt: int) -> CompletionRequest:
    """Retry with another seed (the first attempt keeps the configured one)."""
    return request.with_seed(request.seed + attempt)


def call_key(stage: str, identity: Mapping[str, Any], template_hash: str, call: LLMCall) -> str:
    return stable_hash(
        {
            "stage": stage,
            "identity": dict(identity),
            "template": template_hash,
            "item": call.item_key,
            "prompt": call.request.prompt.text,
            "params": call.request.params(),
        }
    )


def run_logged_calls(
    *,
    stage: str,
    template_hash: str,
    identity: Mapping[str, Any],
    calls: Sequence[LLMCall[Request]],
    execute: Callable[[Sequence[Request]], Iterator[tuple[int, Answer]]],
    parse: Callable[[LLMCall[Request], str], Any],
    call_log: CallLog,
    max_attempts: int,
    retry_request: Callable[[Request, int], Request] = lambda request, attempt: request,
    chunk_size: int = 64,
) -> tuple[list[CallRecord], CallStats]:
    """Answer ``calls`` from the log, asking the LLM only for the missing ones.

    ``execute`` sends requests and yields ``(index, answer)`` as they finish;
    ``parse`` turns an answer into a JSON-able result or raises :class:`AnswerError`,
    in which case the call is asked again, ``retry_request(request, attempt)``
    (e.g. another seed), up to ``max_attempts`` answers in all, and then recorded as
    a failure. Missing calls are processed in chunks of ``chunk_size``; each chunk's
    final records are committed before the next starts (and when ``execute`` fails).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    started = time.perf_counter()
    stats = CallStats(stage=stage, calls=len(calls))
    keys = [call_key(stage, identity, template_hash, call) for call in calls]
    records: list[CallRecord | None] = [None] * len(calls)
    known = call_log.lookup(keys)
    for index, key in enumerate(keys):
        records[index] = known.get(key)
    missing = [index for index, record in enumerate(records) if record is None]
    stats.cached = len(calls) - len(missing)
    stats.asked = len(missing)
    identity_json = json.dumps(dict(identity), sort_keys=True)

    def log_row(index: int, record: CallRecord) -> dict[str, Any]:
        request = calls[index].request
        return {
            "key": record.key,
            "stage": stage,
            "item_key": record.item_key,
            "backend": str(identity.get("backend", "")),
            "model": str(identity.get("model", "")),
            "identity": identity_json,
            "template_hash": template_hash,
            "params": json.dumps(request.params(), sort_keys=True),
            "prompt": request.prompt.body,
            "prefix_hash": prefix_hash(request.prompt.prefix),
            "raw_answer": record.raw_answer,
            "parsed": json.dumps(record.parsed) if record.parsed is not None else None,
            "status": record.status,
            "error": record.error,
            "attempts": record.attempts,
            "latency_s": record.latency_s,
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "server": record.server,
        }

    with tqdm(total=len(missing), desc=f"LLM {stage}", unit="call", disable=not missing, leave=False) as bar:
        for start in range(0, len(missing), chunk_size):
            chunk = missing[start : start + chunk_size]
            answers: dict[int, list[Answer]] = {index: [] for index in chunk}
            errors: dict[int, str] = {}
            finished: list[int] = []
            todo = chunk
            try:
                for attempt in range(max_attempts):
                    if not todo:
                        break
                    requests = [retry_request(calls[i].request, attempt) for i in todo]
                    again = []
                    for position, answer in execute(requests):
                        index = todo[position]
                        answers[index].append(answer)
                        stats.answers += 1
                        stats.llm_seconds += answer.latency_s
                        try:
                            parsed = parse(calls[index], answer.text)
                        except AnswerError as error:
                            errors[index] = str(error)
                            if attempt + 1 < max_attempts:
                                again.append(index)
                                continue
                            records[index] = _record(keys[index], calls[index], answers[index], None, errors[index])
                        else:
                            records[index] = _record(keys[index], calls[index], answers[index], parsed, None)
                        finished.append(index)
                    todo = sorted(again)
            finally:
                call_log.record(
                    [log_row(index, records[index]) for index in finished],
                    {prefix_hash(calls[i].request.prompt.prefix): calls[i].request.prompt.prefix for i in finished},
                )
                bar.update(len(finished))
    for index, record in enumerate(records):
        assert record is not None
        if record.status == "ok":
            stats.ok += 1
        else:
            stats.failed += 1
            stats.failures.append(
                {
                    "item_key": record.item_key,
                    "error": record.error,
                    "raw_answer": (record.raw_answer or "")[:500],
                    "attempts": record.attempts,
                }
            )
    stats.wall_seconds = time.perf_counter() - started
    if stats.failed:
        log.warning("%s: %d of %d calls failed (see the call log)", stage, stats.failed, stats.calls)
    return [record for record in records if record is not None], stats


def _record(key: str, call: LLMCall, answers: list[Answer], parsed: Any, error: str | None) -> CallRecord:
    return CallRecord(
        key=key,
        item_key=call.item_key,
        status="ok" if error is None else "failed",
        parsed=parsed,
        raw_answer=answers[-1].text,
        error=error,
        attempts=len(answers),
        latency_s=sum(a.latency_s for a in answers),
        server=answers[-1].server,
    )
