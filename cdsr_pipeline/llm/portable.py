"""Portable LLM answers: the call log's records exported to parquet (``cdsr llm-log
export``) and imported into another storage's log (``cdsr llm-log import``), each row
verified by recomputing its call key; a recorded answer is never replaced."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from cdsr_pipeline.llm.calllog import CALLS_TABLE, LOG_ARROW_SCHEMA, PREFIXES_TABLE, CallLog, prefix_hash
from cdsr_pipeline.storage import stable_hash

EXPORT_FORMAT = "cdsr-llm-calls/1"
"""Written into the export's parquet metadata; import refuses any other."""

EXPORT_COLUMNS = (
    "key", "stage", "item_key", "backend", "model", "identity", "template_hash", "params", "prefix", "prompt",
    "raw_answer", "parsed", "status", "error", "attempts", "latency_s", "created_at",
)
EXPORT_SCHEMA = pa.schema(
    [LOG_ARROW_SCHEMA.field(name) if name in LOG_ARROW_SCHEMA.names else pa.field(name, pa.string()) for name in EXPORT_COLUMNS],
    metadata={"format": EXPORT_FORMAT},
)
"""The log's columns with their types, the shared prompt prefix's text in place of its hash
(so that a row's key can be recomputed from it), without the answering server."""
STAGES = {"augmentation": "augmentation", "vocabulary": "domain_vocabulary", "tag_scores": "item_tag_scores"}
"""Short names (``cdsr llm-log export --stage``) of the stages as the log records them."""


class CallExportError(ValueError):
    """A file that is not a valid call-log export, or whose rows do not verify."""


@dataclass
class ImportReport:
    """What ``cdsr llm-log import`` did with a file."""

    rows: int = 0
    inserted: int = 0
    already_present: int = 0  # same key, same answer
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # same key, another answer: kept as it was

    def summary(self) -> str:
        text = (
            f"{self.rows:,} answers read: {self.inserted:,} imported, {self.already_present:,} already present, "
            f"{len(self.conflicts):,} conflicting (kept the recorded answer)"
        )
        for conflict in self.conflicts[:10]:
            text += f"\n  conflict: stage {conflict['stage']} item {conflict['item_key']} key {conflict['key'][:16]}"
        if len(self.conflicts) > 10:
            text += f"\n  ... and {len(self.conflicts) - 10:,} more"
        return text


def recomputed_key(row: Mapping[str, Any]) -> str:
    """The call key of an exported row, from what determines the answer (see :func:`call_key`)."""
    return stable_hash(
        {
            "stage": row["stage"],
            "identity": json.loads(row["identity"]),
            "template": row["template_hash"],
            "item": row["item_key"],
            "prompt": row["prefix"] + row["prompt"],
            "params": json.loads(row["params"]),
        }
    )


DEFAULT_EXPORT_PART_BYTES = 4 * 1024 * 1024
"""Largest export file ``cdsr llm-log export`` writes by default (4 MiB): larger exports
are split into parts (``NAME.part01.parquet``, ...) that fit repositories' file limits."""


def export_part_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The files an export to ``path`` consists of now: ``path`` itself, or its parts."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.parent.glob(f"{glob.escape(path.stem)}.part[0-9][0-9].parquet"))


def export_calls(
    call_log: CallLog,
    path: str | os.PathLike[str],
    stage: str | None = None,
    max_file_bytes: int | None = DEFAULT_EXPORT_PART_BYTES,
) -> tuple[int, int, list[Path]]:
    """Write the recorded calls (of one stage, by its short name in :data:`STAGES`, or all) to zstd parquet.

    One file at ``path`` when it stays within ``max_file_bytes`` (None: no limit), else
    the fewest parts ``<stem>.partNN.parquet`` beside it (consecutive row ranges) that
    each do; files of an earlier export to the same path are replaced. Returns (rows
    written, rows left out, files written): calls recorded before the log kept prompt
    prefixes cannot be verified on import and are not exported. Rows are ordered by
    stage, item and key, so the same log gives the same files.
    """
    from cdsr_pipeline.storage import write_parquet_atomic

    if stage is not None:
        if stage not in STAGES:
            raise CallExportError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        stage = STAGES[stage]
    columns = ", ".join("p.prefix" if name == "prefix" else f"c.{name}" for name in EXPORT_SCHEMA.names)
    where = "WHERE (? IS NULL OR c.stage = ?)"
    table = call_log.connection.sql(
        f"SELECT {columns} FROM {CALLS_TABLE} c JOIN {PREFIXES_TABLE} p USING (prefix_hash) {where} ORDER BY c.stage, c.item_key, c.key",
        params=[stage, stage],
    ).to_arrow_table()
    unexported = call_log.connection.execute(
        f"SELECT count(*) FROM {CALLS_TABLE} c WHERE c.prefix_hash IS NULL AND (? IS NULL OR c.stage = ?)", [stage, stage]
    ).fetchall()[0][0]  # fetchall: a half-read result would block the connection's next query
    table = table.cast(EXPORT_SCHEMA)
    path = Path(path)
    earlier = set(export_part_paths(path))
    parts = 1
    while True:  # the fewest equal row ranges whose files all fit (a compressed size is known once written)
        rows = -(-table.num_rows // parts) if table.num_rows else 0
        names = [path] if parts == 1 else [path.with_name(f"{path.stem}.part{i:02d}.parquet") for i in range(1, parts + 1)]
        sizes = []
        for index, name in enumerate(names):
            write_parquet_atomic(table.slice(index * rows, rows), name, compression_level=19)  # files meant to be committed
            sizes.append(name.stat().st_size)
            earlier.add(name)
        if max_file_bytes is None or max(sizes) <= max_file_bytes:
            break
        parts = max(parts + 1, -(-sum(sizes) // max_file_bytes))
        if parts > 99:
            raise CallExportError(f"{path}: the export needs more than 99 parts of at most {max_file_bytes:,} bytes")
    for name in earlier - set(names):
        name.unlink(missing_ok=True)
    return table.num_rows, unexported, names


def read_call_export(path: str | os.PathLike[str]) -> pa.Table:
    """An export file, checked: its format tag, its schema and every row's key."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as error:
        raise CallExportError(f"{path}: not a readable parquet file ({error})") from None
    found = (schema.metadata or {}).get(b"format", b"").decode()
    if found != EXPORT_FORMAT:
        raise CallExportError(f"{path}: not an LLM call-log export (format {found or 'missing'!r}, expected {EXPORT_FORMAT!r})")
    if schema.remove_metadata() != EXPORT_SCHEMA.remove_metadata():
        expected = {f.name: str(f.type) for f in EXPORT_SCHEMA}
        got = {f.name: str(f.type) for f in schema}
        differences = sorted(set(expected.items()) ^ set(got.items()))
        raise CallExportError(f"{path}: schema does not match {EXPORT_FORMAT} (differs in {differences})")
    table = pq.read_table(path)
    problems = []
    for index, row in enumerate(table.to_pylist()):
        where = f"row {index} (stage {row['stage']}, item {row['item_key']})"
        try:
            identity = json.loads(row["identity"])
            if identity.get("backend") != row["backend"] or identity.get("model") != row["model"]:
                problems.append(f"{where}: backend/model columns disagree with its identity")
            elif row["stage"] not in STAGES.values() or row["status"] not in ("ok", "failed"):
                problems.append(f"{where}: unknown stage or status")
            elif recomputed_key(row) != row["key"]:
                problems.append(f"{where}: key does not match its stage, identity, template, prompt and parameters")
        except (TypeError, ValueError, AttributeError) as error:
            problems.append(f"{where}: unreadable ({error})")
        if len(problems) >= 5:
            break
    if problems:
        raise CallExportError(f"{path}: rows that do not verify, nothing imported: " + "; ".join(problems))
    return table


def import_calls(call_log: CallLog, table: pa.Table) -> ImportReport:
    """Add verified exported rows (:func:`read_call_export`) to the log.

    A key already recorded is never replaced: the same answer counts as present, a
    different one as a conflict. Importing the same file twice changes nothing.
    """
    report = ImportReport(rows=table.num_rows)
    rows = table.to_pylist()
    known = call_log.connection.execute(
        f"SELECT key, status, raw_answer, parsed FROM {CALLS_TABLE} WHERE key IN (SELECT unnest(?))",
        [[row["key"] for row in rows]],
    ).fetchall()
    recorded = {key: (status, raw, parsed) for key, status, raw, parsed in known}
    new, prefixes = [], {}
    for row in rows:
        existing = recorded.get(row["key"])
        if existing is None:
            hashed = prefix_hash(row["prefix"])
            prefixes[hashed] = row["prefix"]
            new.append({**{k: v for k, v in row.items() if k != "prefix"}, "prefix_hash": hashed})
            recorded[row["key"]] = (row["status"], row["raw_answer"], row["parsed"])
        elif existing == (row["status"], row["raw_answer"], row["parsed"]):
            report.already_present += 1
        else:
            report.conflicts.append({"key": row["key"], "stage": row["stage"], "item_key": row["item_key"]})
    for start in range(0, len(new), 4096):
        call_log.record(new[start : start + 4096], prefixes)
    report.inserted = len(new)
    return report
