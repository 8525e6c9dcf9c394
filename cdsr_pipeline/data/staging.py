"""Source files parsed through DuckDB into staging tables, with exact line numbers.

Two readers of text files:

- **Line dumps** (JSON lines, Python literals: the Amazon files) stream through
  :class:`TextLines`: the file is inflated with ISA-L (``isal``, about three times
  zlib's speed, outside the GIL) in a Python thread and handed to DuckDB as Arrow
  batches of whole lines, one chunk of text per batch; DuckDB splits the chunks
  into lines and parses them on all its threads. Every line is a row (row ``idx``
  is on line ``idx + 1``); lines that cannot be read (invalid UTF-8, longer than
  :data:`MAX_LINE_BYTES`) are recorded by the reader and reach DuckDB empty, and
  :func:`apply_line_rejects` gives their rows the reason. DuckDB's own CSV reader
  decompresses a gzip file and parses its lines on a single thread: this reader
  stages a dump's reviews in less than half the time (``benchmarks/ingest.py``).
- **CSV files** are read by DuckDB's CSV reader; :func:`line_reader_sql` reads a
  file's raw lines with it, to find the blank lines it skips (see below).

DuckDB's CSV reader streams a file (gzip included) with bounded memory. A file's raw
lines are read as a one-column CSV (:func:`line_reader_sql`):
the delimiter is ``\\x01``, which cannot occur in a valid JSON or Python-literal line
(control characters are escaped there), with no quoting or escaping, so every line
arrives whole as one VARCHAR value; an empty line arrives as NULL.

Each file is read once, parsed in the same streaming pass and written to a table of the
connection's in-memory database (:func:`stage_rows`): no parquet encoding and decoding
in between, and DuckDB moves the table's blocks to its temp directory when it outgrows
``memory_limit``, so memory stays bounded.

Records that DuckDB cannot read (invalid UTF-8, a line over :data:`MAX_LINE_BYTES`, a
stray ``\\x01``, a CSV row with the wrong number of fields) are stored in a rejects
table with their true line number, and produce no row; DuckDB's CSV reader also skips
blank lines of a CSV file silently (a line dump keeps them as NULL rows). Rows keep
file order, so each such gap shifts the rows after it by one line: row ``idx``
(0-based, counting rows; the first one on line ``first_line``) is on line
``first_line + idx + s``, where ``s`` is the number of gaps before it. With gap lines
``g_1 < g_2 < ...``, line ``g_j`` has ``g_j - first_line - (j - 1)`` rows before it, so
``s = max{j : g_j - first_line + 1 - j <= idx}``: an ASOF join on a table as small as
the number of gaps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import duckdb
import numpy as np
import pyarrow as pa
from isal import igzip, isal_zlib

from . import schema
from .ingest import RAW_PREVIEW_CHARS, SourceError, scalar, sql_str, write_query_parquet

# Longer lines are quarantined as ``line_too_long``. It bounds the text a reader holds
# for one line (DuckDB's CSV read buffer is 16 times this). Real dumps stay below
# (their longest records, 2023 meta, are a few hundred KB).
MAX_LINE_BYTES = 4 * 1024 * 1024
# Inflated bytes per batch of :class:`TextLines`: large enough that the per-batch cost
# vanishes, small enough that DuckDB's threads each get batches of a 100 MB file.
CHUNK_BYTES = 16 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


def rejects_options(name: str | None) -> str:
    """``read_csv`` options: keep unreadable records in ``<name>_errors``, or skip them (None)."""
    if name is None:
        return "ignore_errors = true"
    return f"store_rejects = true, rejects_table = '{name}_errors', rejects_scan = '{name}_scans'"


def line_reader_sql(path: Path, *, rejects: str) -> str:
    """``read_csv`` of ``path`` as one VARCHAR column ``line``, one row per line; the
    records it cannot read are stored under ``rejects`` (:func:`rejects_options`)."""
    return (
        f"read_csv({sql_str(path)}, columns = {{'line': 'VARCHAR'}}, delim = chr(1), quote = '', "
        f"escape = '', header = false, auto_detect = false, compression = 'auto', "
        f"max_line_size = {MAX_LINE_BYTES}, {rejects_options(rejects)})"
    )


@dataclass(frozen=True)
class StagedRows:
    """One source file parsed into a staging table (file order), plus its gaps.

    The table ``main.<name>_rows`` has a column ``idx`` (0-based index among the rows
    DuckDB produced) and the parsed columns, in file order. DuckDB tables
    ``<name>_rejects`` (line, error_type, csv_line) and ``<name>_shifts`` (the ASOF
    table of the module docstring) belong to it.
    """

    source: Path
    name: str
    rows: int
    rejected: int
    skipped: int  # blank lines the reader passed over
    first_line: int
    extra_rejects_sql: str | None = None  # (line, reason, raw) of records a reader set aside before DuckDB read the file

    @property
    def lines(self) -> int:
        """Records read: the rows and the rejected lines (not blank lines or a header)."""
        return self.rows + self.rejected

    @property
    def table(self) -> str:
        return f"main.{self.name}_rows"

    def rows_sql(self) -> str:
        return self.table

    def numbered(self, relation: str) -> str:
        """SQL for ``relation`` (which has ``idx``) with the true 1-based ``line`` added."""
        if not (self.rejected or self.skipped):
            return f"(SELECT r.*, r.idx + {self.first_line} AS line FROM {relation} r)"
        return (
            f"(SELECT r.*, r.idx + {self.first_line} + coalesce(s.shift, 0) AS line FROM {relation} r "
            f"ASOF LEFT JOIN {self.name}_shifts s ON r.idx >= s.shift_from)"
        )

    def rejects_sql(self, malformed_reason: str) -> str:
        """SQL: the records DuckDB rejected, as (line, reason, raw).

        DuckDB names encoding and line-size problems; any other rejection is a record
        with the wrong structure (a stray delimiter, a CSV row with too many or too few
        fields): ``malformed_reason``.
        """
        return f"""
            (SELECT line,
                    CASE WHEN error_type LIKE 'INVALID %' THEN 'bad_encoding'
                         WHEN error_type = 'LINE SIZE OVER MAXIMUM' THEN 'line_too_long'
                         ELSE '{malformed_reason}' END AS reason,
                    left(csv_line, {RAW_PREVIEW_CHARS}) AS raw
             FROM {self.name}_rejects)"""


def stage_rows(
    con: duckdb.DuckDBPyConnection,
    source: Path,
    rows_sql: str,
    parse_sql: str,
    name: str,
    *,
    first_line: int,
    rejects: bool,
    skipped_lines_sql: str | None = None,
) -> StagedRows:
    """Parse ``source`` in one streaming pass into the table ``main.<name>_rows``.

    ``rows_sql`` gives ``idx`` and the reader's columns in file order (its reader stores
    rejects under ``name`` when ``rejects``); ``parse_sql`` is a query over that
    relation, named ``source_rows``, returning ``idx`` and the parsed columns.
    ``skipped_lines_sql`` gives the numbers (column ``line``) of lines the reader skips
    without a trace. The tables go to the ``main`` schema so that other cursors of the
    same database (files staged concurrently) see them. A plain ``CREATE TABLE AS``
    keeps the rows in file order (insertion order is preserved).
    """
    rows = scalar(con, f"CREATE TABLE main.{name}_rows AS WITH source_rows AS ({rows_sql}) {parse_sql}")
    if rejects:
        # DuckDB may report one line several times (once per problem): one row per line.
        con.execute(
            f"""
            CREATE TABLE main.{name}_rejects AS
            SELECT DISTINCT ON (line) line, error_type, csv_line FROM {name}_errors ORDER BY line
            """
        )
    else:
        con.execute(f"CREATE TABLE main.{name}_rejects (line BIGINT, error_type VARCHAR, csv_line VARCHAR)")
    gaps = f"SELECT line FROM main.{name}_rejects"
    if skipped_lines_sql:
        gaps += f" UNION ALL SELECT line FROM ({skipped_lines_sql})"
    con.execute(
        f"""
        CREATE TABLE main.{name}_shifts AS
        SELECT line - {first_line - 1} - n AS shift_from, max(n) AS shift
        FROM (SELECT line, row_number() OVER (ORDER BY line) AS n FROM ({gaps}))
        GROUP BY shift_from ORDER BY shift_from
        """
    )
    rejected = scalar(con, f"SELECT count(*) FROM main.{name}_rejects")
    skipped = scalar(con, f"SELECT count(*) FROM ({skipped_lines_sql})") if skipped_lines_sql else 0
    return StagedRows(source=source, name=name, rows=rows, rejected=rejected, skipped=skipped, first_line=first_line)


def blank_lines_sql(con: duckdb.DuckDBPyConnection, source: Path, name: str) -> str:
    """SQL giving the numbers (``line``) of the blank lines of a text file.

    For a CSV file: DuckDB's CSV reader skips blank lines without a trace, and they
    shift line numbers like rejected lines. One extra pass over the raw lines.
    """
    blanks = stage_rows(
        con,
        source,
        f"SELECT row_number() OVER () - 1 AS idx, line FROM {line_reader_sql(source, rejects=name)}",
        "SELECT idx FROM source_rows WHERE line IS NULL",
        name,
        first_line=1,
        rejects=True,
    )
    return f"SELECT line FROM {blanks.numbered(blanks.rows_sql())}"


# -- line dumps ----------------------------------------------------------------------


def open_inflated(path: Path) -> BinaryIO:
    """The file's bytes, inflated when it is gzip (by its magic bytes, as DuckDB's
    ``compression = 'auto'`` reads it). igzip inflates outside the GIL, so two files
    read in parallel use two cores."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == _GZIP_MAGIC
    return igzip.open(path, "rb") if gzipped else open(path, "rb")


@dataclass(frozen=True)
class LineReject:
    """A line that :class:`TextLines` could not hand over as text."""

    line: int  # 1-based
    reason: str  # ``bad_encoding`` or ``line_too_long``
    raw: str  # the start of the line, undecodable bytes replaced


@dataclass
class TextLines:
    """The lines of a text file (gzip, by its magic bytes, or plain), streamed to DuckDB.

    :meth:`reader` gives Arrow batches ``(first_idx, text)``: ``text`` is a chunk of
    whole lines (valid UTF-8, newlines inside, none at the end) whose first line has
    0-based index ``first_idx``; :meth:`rows_sql` splits them into ``(idx, line)``
    rows, every line of the file one row in file order (DuckDB keeps the batches'
    order). An empty line is NULL (like DuckDB's CSV reader); a line ending in
    ``\\r\\n`` loses the ``\\r``; a UTF-8 byte order mark at the start is skipped.

    A line with invalid UTF-8 reaches DuckDB empty (NULL) and is listed in
    :attr:`rejected`; so is a line longer than :data:`MAX_LINE_BYTES` that has not
    ended when the reader holds that many bytes of it (the rest of it is skipped
    unread). A long line that fits in a chunk reaches DuckDB whole: the parsing SQL
    checks the length (:func:`too_long_sql`). :attr:`rejected` is complete once the
    reader is exhausted.
    """

    path: Path
    chunk_bytes: int = CHUNK_BYTES
    rejected: list[LineReject] = field(default_factory=list)
    read_error: SourceError | None = None

    SCHEMA = pa.schema([("first_idx", pa.int64()), ("text", pa.string())])

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.SCHEMA, self._batches())

    @contextmanager
    def registered(self, con: duckdb.DuckDBPyConnection, name: str) -> Iterator[str]:
        """The batches of :meth:`reader` as the relation ``name`` of ``con``.

        A file that cannot be read (a truncated or corrupt gzip stream) raises a
        :class:`SourceError` naming it; DuckDB would wrap it in its own error.
        """
        con.register(name, self.reader())
        try:
            yield name
        except duckdb.Error as error:
            if self.read_error is not None:
                raise self.read_error from error
            raise
        finally:
            con.unregister(name)

    @staticmethod
    def rows_sql(relation: str) -> str:
        """SQL: ``(idx, line)`` for the batches of :meth:`reader`, registered as ``relation``."""
        split = f"SELECT first_idx, string_split(text, chr(10)) AS lines FROM {relation}"
        line = "CASE WHEN suffix(line, chr(13)) THEN nullif(rtrim(line, chr(13)), '') ELSE nullif(line, '') END"
        return (
            f"SELECT idx, {line} AS line FROM "
            f"(SELECT first_idx + generate_subscripts(lines, 1) - 1 AS idx, unnest(lines) AS line FROM ({split}))"
        )

    def _open(self) -> BinaryIO:
        return open_inflated(self.path)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        """Per chunk read, up to two batches: the line that began in an earlier chunk
        (short: the only bytes copied) and the chunk's own whole lines (no copy)."""
        max_line = MAX_LINE_BYTES  # read when reading starts (tests lower it)
        first_idx = 0  # index of the first line not yet handed over
        rest = b""  # the start of that line, read but not ended
        skipping = False  # inside an over-long line, already handed over empty
        with self._open() as handle:
            data = self._read(handle, max(self.chunk_bytes, len(_UTF8_BOM)))
            if data.startswith(_UTF8_BOM):
                data = data[len(_UTF8_BOM) :] or self._read(handle)
            while data:
                first = data.find(b"\n")
                if first < 0:  # no line ends in this chunk
                    if not skipping:
                        rest += data
                        if len(rest) > max_line:
                            self.rejected.append(LineReject(first_idx + 1, "line_too_long", _preview(rest)))
                            yield self._batch(first_idx, b"")
                            first_idx, rest, skipping = first_idx + 1, b"", True
                    data = self._read(handle)
                    continue
                if skipping:
                    skipping = False
                else:
                    yield self._batch(first_idx, rest + data[:first])
                    first_idx += 1
                last = data.rfind(b"\n")
                if last > first:
                    body = memoryview(data)[first + 1 : last]
                    yield self._batch(first_idx, body)
                    first_idx += int(np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == 10)) + 1
                rest = data[last + 1 :]
                data = self._read(handle)
            if rest and not skipping:  # the last line, without a newline
                yield self._batch(first_idx, rest)

    def _read(self, handle: BinaryIO, size: int | None = None) -> bytes:
        try:
            return handle.read(size or self.chunk_bytes)
        except (OSError, EOFError, isal_zlib.error) as error:  # corrupt or truncated gzip, I/O
            self.read_error = SourceError(f"{self.path}: unreadable ({error})")
            raise self.read_error from error

    def _batch(self, first_idx: int, text: bytes | memoryview) -> pa.RecordBatch:
        values = _one_string(text)
        try:
            values.validate(full=True)  # UTF-8 (DuckDB trusts Arrow strings)
        except pa.ArrowInvalid:
            values = _one_string(self._blank_undecodable(first_idx, bytes(text)))
        return pa.record_batch([pa.array([first_idx], pa.int64()), values], schema=self.SCHEMA)

    def _blank_undecodable(self, first_idx: int, text: bytes) -> bytes:
        """``text`` with its lines of invalid UTF-8 emptied (and recorded)."""
        lines = text.split(b"\n")
        for number, line in enumerate(lines):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                self.rejected.append(LineReject(first_idx + number + 1, "bad_encoding", _preview(line)))
                lines[number] = b""
        return b"\n".join(lines)


def _one_string(text: bytes | memoryview) -> pa.StringArray:
    """A one-value Arrow string array over ``text`` (no copy, not validated)."""
    offsets = pa.py_buffer(np.array([0, len(text)], dtype=np.int32))
    return pa.StringArray.from_buffers(1, offsets, pa.py_buffer(text))


def _preview(line: bytes) -> str:
    return line[: RAW_PREVIEW_CHARS * 4].decode("utf-8", "replace").rstrip("\r")[:RAW_PREVIEW_CHARS]


def too_long_sql(line: str = "line") -> str:
    """SQL: whether ``line`` is longer than :data:`MAX_LINE_BYTES` (read at call time)."""
    return f"strlen({line}) > {MAX_LINE_BYTES}"


def apply_line_rejects(con: duckdb.DuckDBPyConnection, table: str, rejected: list[LineReject]) -> None:
    """Give the rows of ``table`` (``idx``, ``reason``, ``raw``) of the lines that
    :class:`TextLines` rejected their reason and raw text (their parse saw an empty line)."""
    if not rejected:
        return
    rejects = pa.table(
        {
            "idx": pa.array([r.line - 1 for r in rejected], pa.int64()),
            "reason": pa.array([r.reason for r in rejected], pa.string()),
            "raw": pa.array([r.raw for r in rejected], pa.string()),
        }
    )
    name = f"{table.replace('.', '_')}_line_rejects"  # one per table: files are staged concurrently
    con.register(name, rejects)
    try:
        con.execute(f"UPDATE {table} SET reason = r.reason, raw = r.raw FROM {name} r WHERE {table}.idx = r.idx")
    finally:
        con.unregister(name)


# -- assembling the outputs ------------------------------------------------------------


def union_all(parts: list[str]) -> str:
    return " UNION ALL ".join(parts)


def write_quarantine(con: duckdb.DuckDBPyConnection, parts: list[str], path: Path) -> dict[str, int]:
    """Write the quarantine table from ``parts`` and return the counts by reason.

    Each part is a query giving ``file_no, source_file, line, reason, raw``; rows are
    written by file (``file_no``), then line.
    """
    write_query_parquet(
        con,
        f"SELECT source_file, line, reason, raw FROM ({union_all(parts)}) ORDER BY file_no, line, reason",
        schema.QUARANTINE,
        path,
    )
    return dict(
        con.execute(
            f"SELECT reason, count(*) FROM read_parquet({sql_str(path)}) GROUP BY reason ORDER BY reason"
        ).fetchall()
    )


def create_item_tables(
    con: duckdb.DuckDBPyConnection, interactions_sql: str, records_sql: str | None, columns: str
) -> None:
    """Tables every reader assembles its items from.

    ``used_items(domain, item)``: the items of the kept interactions (``interactions_sql``,
    a relation with ``domain`` and ``item``), the only ones the items table describes.
    ``item_records``: the valid records of the source's item descriptions
    (``records_sql``), or an empty table with ``columns`` where the source has none.
    """
    con.execute(f"CREATE TABLE used_items AS SELECT DISTINCT domain, item FROM {interactions_sql}")
    if records_sql is None:
        con.execute(f"CREATE TABLE item_records ({columns})")
    else:
        con.execute(f"CREATE VIEW item_records AS {records_sql}")


def item_notes(
    con: duckdb.DuckDBPyConnection, items_path: Path, domain_names: tuple[str, str], described: list[str], record: str
) -> list[str]:
    """Notes on item coverage: per domain the items with a title and an image; the items
    without a ``record`` (in the ``described`` domains, those that have a source of
    records); the records of items without interactions.

    Reads the tables of :func:`create_item_tables`.
    """
    counts = con.execute(
        f"""
        SELECT domain, count(*), count(title), count(image_ref)
        FROM read_parquet({sql_str(items_path)}) GROUP BY domain ORDER BY domain
        """
    ).fetchall()
    notes = [
        f"domain {domain} ({domain_names[schema.DOMAINS.index(domain)]}): {items:,} items, "
        f"{titled:,} with a title, {with_image:,} with an image"
        for domain, items, titled, with_image in counts
    ]
    count_by_domain = (
        "SELECT domain, count(*) FROM {} ANTI JOIN {} USING (domain, item) GROUP BY domain ORDER BY domain"
    )
    for domain, count in con.execute(count_by_domain.format("used_items", "item_records")).fetchall():
        if domain in described:
            notes.append(f"{count:,} items of domain {domain} have no {record} (kept without text)")
    for domain, count in con.execute(count_by_domain.format("item_records", "used_items")).fetchall():
        notes.append(f"{count:,} {record}s of domain {domain} describe items without interactions (ignored)")
    return notes
