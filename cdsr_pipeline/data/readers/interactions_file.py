"""A generic interactions file (CSV or Parquet), with an optional items file.

Interactions file, one row per interaction (column names exact; other columns ignored):

- ``user``, ``item``: ids, read as text (an integer id column works);
- ``domain``: one of the two domain names;
- ``timestamp``: epoch **seconds** (integer, or decimal: floored), or an ISO 8601 date
  or date-time (``2015-03-01``, ``2015-03-01T12:30:00``, ``2015-03-01 12:30:00+02:00``,
  ``...Z``; without an offset, UTC). In Parquet a timestamp or date column works too.

Items file (optional), one row per item: ``item``, ``domain`` (required); ``title``,
``description``, ``image`` (optional columns). ``image`` is a URL or a local path; a
relative path is taken relative to the items file's folder and written absolute. Texts
are kept as given (trimmed; empty = none).

CSV files: UTF-8, a header line, comma-separated, ``"`` quoting (RFC 4180), optionally
gzip-compressed (``.csv.gz``). Parquet: ``.parquet``/``.pq``.

Domains: the ``domain`` values are mapped to A and B by ``domain_names``; rows of any
other value are quarantined (``unknown_domain``). Without ``domain_names`` the file
must hold exactly two distinct values, which are taken in sorted order.

An item is the pair (``domain``, ``item``). Interactions are written in file order.

Quarantine ``line``: for CSV the file's line (header = line 1), exact for rows DuckDB
rejects; for the other rows it counts one line per record, so it is off after blank
lines or line breaks inside quoted fields. For Parquet, the 1-based row number. ``raw``
is the line for rows DuckDB rejected, else the row's fields as JSON. Reasons:
``malformed_row`` (wrong number of fields), ``unbalanced_quote`` (a line whose ``"``
would make the reader take the lines after it as one quoted field: it is set aside, the
file is read again without it, so the lines after it are kept), ``bad_encoding``, ``missing_field:<column>``,
``bad_timestamp``, ``unknown_domain``, ``duplicate_interaction`` (same domain, user, item
and timestamp; the first is kept), ``duplicate_item`` (a second row for an item; the
first is kept).
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
from contextlib import closing
from pathlib import Path

import duckdb

from .. import schema
from ..ingest import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    QUARANTINE_FILE,
    RAW_PREVIEW_CHARS,
    IngestReport,
    SourceError,
    connect,
    require_file,
    sql_str,
    write_query_parquet,
)
from ..staging import (
    StagedRows,
    blank_lines_sql,
    create_item_tables,
    item_notes,
    open_inflated,
    rejects_options,
    stage_rows,
    write_quarantine,
)

FORMAT = "interactions"
INTERACTION_COLUMNS = ("user", "item", "domain", "timestamp")
ITEM_COLUMNS = ("item", "domain")
OPTIONAL_ITEM_COLUMNS = ("title", "description", "image")


def _is_parquet(path: Path) -> bool:
    """Parquet or CSV, by the file name; a one-line error for anything else."""
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return True
    if name.endswith((".csv", ".csv.gz")):
        return False
    raise SourceError(f"unknown format (expected .csv, .csv.gz or .parquet): {path}")


def _parquet_sql(path: Path) -> str:
    return f"read_parquet({sql_str(path)}, file_row_number = true)"


def _csv_sql(path: Path, rejects: str, columns: list[str]) -> str:
    """DuckDB's reader of the CSV file ``path`` with the header's ``columns``, every one
    text, rejects stored under ``rejects``. No sniffing: a sniffer fails the whole file on
    one line of broken quoting."""
    types = "{" + ", ".join(f"{sql_str(c)}: 'VARCHAR'" for c in columns) + "}"
    return (
        f"read_csv({sql_str(path)}, header = true, delim = ',', quote = '\"', escape = '\"', "
        f"auto_detect = false, columns = {types}, compression = 'auto', {rejects_options(rejects)})"
    )


def _header(path: Path) -> list[str]:
    """The column names of a CSV file's header line (RFC 4180 quoting), read without a sniffer."""
    try:
        with open_inflated(path) as stream:
            line = stream.readline()
    except (OSError, EOFError) as error:
        raise SourceError(f"cannot read {path}: {error}") from None
    text = line.decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n")
    names = next(csv.reader([text]), [])
    if not any(name.strip() for name in names):
        raise SourceError(f"{path}: no header line (the first line must name the columns)")
    return [name.strip() for name in names]


def _columns(con: duckdb.DuckDBPyConnection, path: Path, required: tuple[str, ...]) -> list[str]:
    """The file's column names; a one-line error if a required one is missing."""
    if _is_parquet(path):
        try:
            columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {_parquet_sql(path)}").fetchall()]
        except duckdb.Error as error:
            first_line = str(error).splitlines()[0]
            raise SourceError(f"cannot read {path}: {first_line}") from None
    else:
        columns = _header(path)
    missing = [c for c in required if c not in columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns)})")
    return columns


# A record DuckDB rejects as a quoting error that runs over several lines: an unbalanced
# quote on its first line made the reader take the following lines as part of one quoted
# field (to the next quote, or to the end of the file).
_QUOTE_ERRORS = ("UNQUOTED VALUE", "UNTERMINATED QUOTES")
MAX_QUOTE_REPAIRS = 50
"""Re-reads of a CSV file with unbalanced quotes (each sets aside at least one line)
before the file is refused as not RFC 4180."""


def _stage(con: duckdb.DuckDBPyConnection, path: Path, parse_sql: str, name: str, columns: list[str], work: Path) -> StagedRows:
    if _is_parquet(path):
        rows_sql = f"SELECT file_row_number AS idx, * FROM {_parquet_sql(path)}"
        return stage_rows(con, path, rows_sql, parse_sql, name, first_line=1, rejects=False)
    broken: dict[int, str] = {}  # physical line -> its text, for lines with an unbalanced quote
    source = path
    for attempt in range(MAX_QUOTE_REPAIRS + 1):
        table = name if attempt == 0 else f"{name}_r{attempt}"
        staged = _stage_csv(con, source, parse_sql, table, columns)
        runaway = con.execute(
            f"""SELECT DISTINCT line_byte_position FROM {table}_errors
                WHERE error_type IN {_QUOTE_ERRORS} AND position(chr(10) IN rtrim(csv_line, chr(13) || chr(10))) > 0
                ORDER BY 1"""
        ).fetchall()
        if not runaway:
            break
        con.execute(f"DROP TABLE main.{table}_rows")  # an attempt's rows are superseded by the next read's
        if attempt == MAX_QUOTE_REPAIRS:
            first = min(broken)
            raise SourceError(
                f"{path}: more than {MAX_QUOTE_REPAIRS} lines with unbalanced quotes (the first on line {first}); "
                "is it RFC 4180 CSV with '\"' quoting?"
            )
        broken |= _lines_at(source, [offset - 1 for (offset,) in runaway])  # DuckDB's byte positions are 1-based
        source = work / f"{name}.repaired-{attempt + 1}.csv"
        _write_without_lines(path, set(broken), source)
    if not broken:
        return staged
    # The set-aside lines are blank in the copy that was read (so every line keeps its
    # number): they count as rejected records, not as blank lines.
    con.execute(f"CREATE TABLE main.{staged.name}_quote_breaks (line BIGINT, raw VARCHAR)")
    con.executemany(
        f"INSERT INTO main.{staged.name}_quote_breaks VALUES (?, left(?, {RAW_PREVIEW_CHARS}))", sorted(broken.items())
    )
    return dataclasses.replace(
        staged,
        source=path,
        rejected=staged.rejected + len(broken),
        skipped=staged.skipped - len(broken),
        extra_rejects_sql=f"SELECT line, 'unbalanced_quote' AS reason, raw FROM main.{staged.name}_quote_breaks",
    )


def _stage_csv(con: duckdb.DuckDBPyConnection, path: Path, parse_sql: str, name: str, columns: list[str]) -> StagedRows:
    blank_lines = blank_lines_sql(con, path, f"{name}_lines")
    rows_sql = f"SELECT row_number() OVER () - 1 AS idx, * FROM {_csv_sql(path, name, columns)}"
    return stage_rows(
        con,
        path,
        rows_sql,
        parse_sql,
        name,
        first_line=2,  # after the header
        rejects=True,
        skipped_lines_sql=blank_lines,
    )


def _lines_at(path: Path, offsets: list[int]) -> dict[int, str]:
    """The (1-based) numbers and texts of the lines of ``path`` that start at these byte offsets."""
    wanted, found, line, position = sorted(offsets), {}, 1, 0
    with open_inflated(path) as stream:
        for raw in stream:
            while wanted and wanted[0] < position + len(raw):
                if wanted.pop(0) >= position:
                    found[line] = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not wanted:
                break
            position += len(raw)
            line += 1
    return found


def _write_without_lines(path: Path, lines: set[int], out: Path) -> None:
    """A plain-text copy of ``path`` with ``lines`` emptied (their line breaks kept)."""
    with open_inflated(path) as stream, open(out, "wb") as copy:
        for number, raw in enumerate(stream, 1):
            if number in lines:
                copy.write(b"\r\n" if raw.endswith(b"\r\n") else b"\n" if raw.endswith(b"\n") else b"")
            else:
                copy.write(raw)


def _text(column: str) -> str:
    return f"nullif(trim(CAST({column} AS VARCHAR)), '')"


# Integer or decimal epoch seconds, else an ISO date/date-time (UTC unless it has an offset).
_TIMESTAMP_SQL = """
    CASE WHEN regexp_full_match(ts_text, '[+-]?[0-9]+') THEN try_cast(ts_text AS BIGINT)
         WHEN regexp_full_match(ts_text, '[+-]?[0-9]*[.][0-9]*') THEN CAST(floor(try_cast(ts_text AS DOUBLE)) AS BIGINT)
         ELSE CAST(floor(epoch(try_cast(ts_text AS TIMESTAMPTZ))) AS BIGINT) END"""

_INTERACTIONS_PARSE_SQL = f"""
    SELECT idx, "user", item, domain_value, ts_text, {_TIMESTAMP_SQL} AS "timestamp",
        CASE WHEN "user" IS NULL THEN 'missing_field:user'
             WHEN item IS NULL THEN 'missing_field:item'
             WHEN domain_value IS NULL THEN 'missing_field:domain'
             WHEN ts_text IS NULL THEN 'missing_field:timestamp'
             WHEN "timestamp" IS NULL THEN 'bad_timestamp'
        END AS reason
    FROM (
        SELECT idx, {_text('"user"')} AS "user", {_text("item")} AS item,
               {_text("domain")} AS domain_value, {_text('"timestamp"')} AS ts_text
        FROM source_rows
    )"""

_INTERACTION_RAW = (
    f"""left(to_json({{'user': "user", 'item': item, 'domain': domain_value, 'timestamp': ts_text}})::VARCHAR, """
    f"{RAW_PREVIEW_CHARS})"
)
_ITEM_RAW = (
    "left(to_json({'item': item, 'domain': domain_value, 'title': title, 'description': description, "
    f"'image': image}})::VARCHAR, {RAW_PREVIEW_CHARS})"
)


def _items_parse_sql(columns: list[str], folder: Path) -> str:
    optional = {c: (_text(c) if c in columns else "NULL::VARCHAR") for c in OPTIONAL_ITEM_COLUMNS}
    base = sql_str(folder.resolve().as_posix() + "/")
    return f"""
    SELECT idx, item, domain_value, title, description, image,
        CASE WHEN image IS NULL OR image LIKE '%://%' OR starts_with(image, '/') THEN image
             ELSE {base} || image END AS image_ref,
        CASE WHEN item IS NULL THEN 'missing_field:item'
             WHEN domain_value IS NULL THEN 'missing_field:domain'
        END AS reason
    FROM (
        SELECT idx, {_text("item")} AS item, {_text("domain")} AS domain_value,
               {optional["title"]} AS title, {optional["description"]} AS description, {optional["image"]} AS image
        FROM source_rows
    )"""


def _domain_names(con: duckdb.DuckDBPyConnection, staged: StagedRows) -> tuple[str, str]:
    """The two domain values of the file, sorted; a clear error if there are not two."""
    count, values = con.execute(
        f"""
        SELECT count(DISTINCT domain_value), (list(DISTINCT domain_value ORDER BY domain_value))[:10]
        FROM {staged.rows_sql()} WHERE reason IS NULL
        """
    ).fetchall()[0]
    if count != 2:
        shown = ", ".join(repr(v) for v in values) + (", ..." if count > len(values) else "")
        raise SourceError(
            f"{staged.source}: expected exactly two domain values, found {count} ({shown}); pass the domain names"
        )
    return values[0], values[1]


def ingest_interactions_file(
    path: Path,
    items_path: Path | None,
    out_dir: Path,
    domain_names: tuple[str, str] | None,
    temp_dir: Path | None = None,
    *,
    memory_limit: str = "4GB",
) -> IngestReport:
    """Write ``interactions.parquet``, ``items.parquet`` and ``quarantine.parquet`` into ``out_dir``.

    See the module docstring for the file format. ``temp_dir`` holds DuckDB's spill
    files (default: the system temp folder).
    """
    path = require_file(path, "interactions file")
    items_path = require_file(items_path, "items file") if items_path is not None else None
    if domain_names is not None and (len(domain_names) != 2 or domain_names[0] == domain_names[1]):
        raise SourceError(f"domain_names must be two different names, got {domain_names!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdsr-interactions-", dir=temp_dir) as work:
        with closing(connect(Path(work) / "duckdb", memory_limit=memory_limit)) as con:
            con.execute("SET TimeZone = 'UTC'")  # ISO times without an offset are UTC
            columns = _columns(con, path, INTERACTION_COLUMNS)
            staged = {"interactions": _stage(con, path, _INTERACTIONS_PARSE_SQL, "interactions", columns, Path(work))}
            notes = []
            if items_path is not None:
                columns = _columns(con, items_path, ITEM_COLUMNS)
                absent = [c for c in OPTIONAL_ITEM_COLUMNS if c not in columns]
                if absent:
                    notes.append(f"items file has no {', '.join(absent)} column: none for any item")
                parse = _items_parse_sql(columns, items_path.parent)
                staged["items"] = _stage(con, items_path, parse, "items", columns, Path(work))
            else:
                notes.append("no items file: items have no title, description or image")
            if domain_names is None:
                domain_names = _domain_names(con, staged["interactions"])
                notes.append(f"domain names taken from the file (sorted): A = {domain_names[0]}, B = {domain_names[1]}")
            report = IngestReport(
                format=FORMAT,
                files=[str(f.source) for f in staged.values()],
                domain_names=(domain_names[0], domain_names[1]),
                notes=notes,
            )
            _assemble(con, staged, out_dir, report)
    return report


def _assemble(
    con: duckdb.DuckDBPyConnection, staged: dict[str, StagedRows], out_dir: Path, report: IngestReport
) -> None:
    report.lines_read = sum(f.lines for f in staged.values())
    report.notes.extend(f"{f.skipped:,} blank lines of {f.source} skipped" for f in staged.values() if f.skipped)
    name_a, name_b = (sql_str(n) for n in report.domain_names)
    domain = f"CASE domain_value WHEN {name_a} THEN 'A' WHEN {name_b} THEN 'B' END"
    interactions = staged["interactions"]
    con.execute(
        f"""
        CREATE VIEW valid_interactions AS
        SELECT idx, "user", item, {domain} AS domain, "timestamp", domain_value, ts_text
        FROM {interactions.rows_sql()} WHERE reason IS NULL
        """
    )
    con.execute(
        """
        CREATE TABLE duplicate_interactions AS
        SELECT idx FROM (
            SELECT idx, row_number() OVER (PARTITION BY domain, "user", item, "timestamp" ORDER BY idx) AS occurrence
            FROM valid_interactions WHERE domain IS NOT NULL
        ) WHERE occurrence > 1
        """
    )
    report.interactions = write_query_parquet(
        con,
        """
        SELECT "user", item, domain, "timestamp"
        FROM valid_interactions ANTI JOIN duplicate_interactions USING (idx)
        WHERE domain IS NOT NULL ORDER BY idx
        """,
        schema.INTERACTIONS,
        out_dir / INTERACTIONS_FILE,
    )

    items = staged.get("items")
    if items:
        con.execute(
            f"""
            CREATE VIEW valid_items AS
            SELECT idx, item, {domain} AS domain, title, description, image_ref, domain_value, image
            FROM {items.rows_sql()} WHERE reason IS NULL
            """
        )
    create_item_tables(
        con,
        f"read_parquet({sql_str(out_dir / INTERACTIONS_FILE)})",
        "SELECT * FROM valid_items WHERE domain IS NOT NULL" if items else None,
        "idx BIGINT, item VARCHAR, domain VARCHAR, title VARCHAR, description VARCHAR, image_ref VARCHAR",
    )
    con.execute(
        """
        CREATE TABLE described AS
        SELECT r.*, row_number() OVER (PARTITION BY r.domain, r.item ORDER BY r.idx) AS occurrence
        FROM item_records r SEMI JOIN used_items USING (domain, item)
        """
    )
    report.items = write_query_parquet(
        con,
        """
        SELECT u.item, u.domain, d.title, d.description, d.image_ref
        FROM used_items u LEFT JOIN described d ON d.domain = u.domain AND d.item = u.item AND d.occurrence = 1
        ORDER BY u.domain, u.item
        """,
        schema.SOURCE_ITEMS,
        out_dir / ITEMS_FILE,
    )

    parts = []
    for file_no, (kind, rows) in enumerate(staged.items()):
        head = f"SELECT {file_no} AS file_no, {sql_str(rows.source)} AS source_file"
        raw = _INTERACTION_RAW if kind == "interactions" else _ITEM_RAW
        if rows.rejected:
            parts.append(f"{head}, line, reason, raw FROM {rows.rejects_sql('malformed_row')}")
        if rows.extra_rejects_sql:
            parts.append(f"{head}, line, reason, raw FROM ({rows.extra_rejects_sql})")
        bad = f"(SELECT idx, reason, {raw} AS raw FROM {rows.rows_sql()} WHERE reason IS NOT NULL)"
        parts.append(f"{head}, line, reason, raw FROM {rows.numbered(bad)}")
        duplicates, duplicate_reason = (
            ("duplicate_interactions", "duplicate_interaction")
            if kind == "interactions"
            else ("(SELECT idx FROM described WHERE occurrence > 1)", "duplicate_item")
        )
        unknown = f"(SELECT idx, {raw} AS raw FROM valid_{kind} WHERE domain IS NULL)"
        parts.append(f"{head}, line, 'unknown_domain' AS reason, raw FROM {rows.numbered(unknown)}")
        repeated = f"(SELECT idx, {raw} AS raw FROM valid_{kind} SEMI JOIN {duplicates} d USING (idx))"
        parts.append(f"{head}, line, '{duplicate_reason}' AS reason, raw FROM {rows.numbered(repeated)}")
    report.quarantined = write_quarantine(con, parts, out_dir / QUARANTINE_FILE)
    described = list(schema.DOMAINS) if items else []
    report.notes.extend(item_notes(con, out_dir / ITEMS_FILE, report.domain_names, described, "items-file row"))
