"""Shared pieces of every source reader: the report, the DuckDB connection, errors.

A reader turns one source (an Amazon dump, an interactions file, a released split)
into three parquet files in an output folder, all with the schemas of
:mod:`cdsr_pipeline.data.schema`:

- ``interactions.parquet`` (``INTERACTIONS``): one row per kept interaction;
- ``items.parquet`` (``SOURCE_ITEMS``): one row per item with its text and image reference;
- ``quarantine.parquet`` (``QUARANTINE``): every rejected record with the file, line,
  reason and raw text (possibly empty, never absent).

and returns an :class:`IngestReport`. Nothing is dropped silently: a record is either
in ``interactions``/``items`` or in ``quarantine``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import atomic_target

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
QUARANTINE_FILE = "quarantine.parquet"

# Quarantined records keep this much of their raw text: enough to see what is wrong.
RAW_PREVIEW_CHARS = 500


class SourceError(ValueError):
    """A source cannot be read at all (missing file, unknown format): one clear line."""


@dataclass
class IngestReport:
    """What a reader read, kept and rejected."""

    format: str
    files: list[str]
    domain_names: tuple[str, str]
    lines_read: int = 0
    interactions: int = 0
    items: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Wall-clock seconds of the reader's steps, by name (steps may overlap in time).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def quarantine_share(self) -> float:
        return self.quarantined_total / self.lines_read if self.lines_read else 0.0


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, or a one-line :class:`SourceError` naming it."""
    resolved = Path(path)
    if not resolved.is_file():
        raise SourceError(f"{what} not found: {resolved}")
    return resolved


def connect(temp_dir: str | os.PathLike[str] | None = None, memory_limit: str = "4GB") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with bounded memory that spills to ``temp_dir``.

    Bounded memory is what lets a tens-of-millions-row dump stream through on a
    small machine: DuckDB spills sorts, joins and aggregations to disk instead.
    """
    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute("SET preserve_insertion_order = true")
    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = '{Path(temp_dir).as_posix()}'")
    return con


def scalar(con: duckdb.DuckDBPyConnection, query: str):
    """The single value of ``query``, with the result fully consumed.

    DuckDB 2 keeps a result open after ``fetchone()`` and then refuses ``con.sql`` on
    that connection; ``fetchall`` closes it.
    """
    return con.execute(query).fetchall()[0][0]


def sql_str(value: str | os.PathLike[str]) -> str:
    """A SQL string literal (for file paths in DuckDB table functions)."""
    return "'" + str(value).replace("'", "''") + "'"


def write_query_parquet(
    con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema, path: str | os.PathLike[str]
) -> int:
    """Stream the result of ``query`` into a zstd parquet file with exactly ``schema``; return its rows.

    Batches go straight from DuckDB to the file (memory does not grow with the result)
    through :func:`~cdsr_pipeline.storage.atomic_target`. Columns of ``schema`` that the query
    does not return must be nullable and are written as nulls (``given_id`` and the
    release columns of a raw dump).
    """
    with QueryParquetFile(schema, path) as out:
        out.write(con, query)
    return out.rows


class QueryParquetFile:
    """A parquet file with exactly ``schema``, written from one query or several in turn.

    Use it as a context manager: the rows go to a temporary file beside ``path``, which
    replaces ``path`` when the block ends without an exception (and is removed
    otherwise). Each :meth:`write` streams one query's result in batches, as
    :func:`write_query_parquet` does; several writes append in order, so parts of one
    output can be written as soon as each is ready. One writer at a time.
    """

    def __init__(self, schema: pa.Schema, path: str | os.PathLike[str]):
        self.schema = schema
        self.target = Path(path)
        self.rows = 0
        self._files: contextlib.ExitStack | None = None  # the temporary file, then its writer
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> QueryParquetFile:
        with contextlib.ExitStack() as files:
            tmp = files.enter_context(atomic_target(self.target))
            self._writer = files.enter_context(pq.ParquetWriter(tmp, self.schema, compression="zstd"))
            self._files = files.pop_all()
        return self

    def write(self, con: duckdb.DuckDBPyConnection, query: str) -> int:
        """Append the result of ``query``; return its rows."""
        if self._writer is None:
            raise RuntimeError("QueryParquetFile.write outside its with-block")
        reader = con.sql(query).to_arrow_reader(64 * 1024)
        missing = [f.name for f in self.schema if f.name not in reader.schema.names]
        required = [name for name in missing if not self.schema.field(name).nullable]
        if required:
            raise ValueError(f"query for {self.target.name} lacks required column(s): {', '.join(required)}")
        rows = 0
        for batch in reader:
            columns = [
                pa.nulls(batch.num_rows, f.type) if f.name in missing else batch.column(f.name).cast(f.type)
                for f in self.schema
            ]
            self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
            rows += batch.num_rows
        self.rows += rows
        return rows

    def __exit__(self, exc_type, exc, tb) -> None:
        files = self._files
        assert files is not None
        self._files = self._writer = None
        # the writer closes first (its file complete), then atomic_target renames or removes it
        files.__exit__(exc_type, exc, tb)
