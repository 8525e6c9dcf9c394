"""Source files parsed through DuckDB into staging tables, with exact line numbers.

DuckDB's CSV reader streams a file (gzip included) with bounded memory. A line dump
(JSON lines, Python literals) is read as a one-column CSV (:func:`line_reader_sql`):
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

from dataclasses import dataclass
from pathlib import Path

import duckdb

from . import schema
from .ingest import RAW_PREVIEW_CHARS, scalar, sql_str, write_query_parquet

# Longer lines are quarantined as ``line_too_long``. DuckDB's read buffer is 16 times
# this (64 MiB per file being read), so it also sets the scans' memory. Real dumps stay
# below (their longest records, 2023 meta, are a few hundred KB).
MAX_LINE_BYTES = 4 * 1024 * 1024


def rejects_options(name: str | None) -> str:
    """``read_csv`` options: keep unreadable records in ``<name>_errors``, or skip them (None)."""
    if name is None:
        return "ignore_errors = true"
    return f"store_rejects = true, rejects_table = '{name}_errors', rejects_scan = '{name}_scans'"


def line_reader_sql(path: Path, *, rejects: str | None) -> str:
    """``read_csv`` of ``path`` as one VARCHAR column ``line``, one row per line.

    Skipping (``rejects=None``) drops exactly the lines that storing would keep, so
    both give the same rows.
    """
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
