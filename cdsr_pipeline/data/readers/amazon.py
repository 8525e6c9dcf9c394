"""Raw Amazon review dumps (2014, 2018, 2023) -> interactions, items and quarantine.

Two categories, as users download them from McAuley's lab pages, become the two
domains (A = the first category). Every file streams through DuckDB
(:mod:`cdsr_pipeline.data.staging`): one pass per file, its lines read by
:class:`~cdsr_pipeline.data.staging.TextLines`, parses each line in SQL into a
staging table of an in-memory database; the outputs are then assembled from those
with bounded memory (DuckDB spills to ``temp_dir``). Two files are read at a time
(one DuckDB cursor each, largest first): a gzip stream inflates on one core, and
inflating and parsing JSON are most of the cost (see ``benchmarks/ingest.py``). A
review file's duplicates are found as soon as it is staged, while the other file is
still read.

Formats (field names of the public dumps):

================  ==============================  ====================================================
version           reviews                         meta
================  ==============================  ====================================================
``amazon2014``    ``reviews_<Cat>[_5].json.gz``:  ``meta_<Cat>.json.gz``: **Python literals**
                  reviewerID, asin,               (``{'asin': ..., 'title': ..., 'imUrl': ...}``),
                  unixReviewTime (s)              description a string
``amazon2018``    ``<Cat>[_5].json.gz``: same     ``meta_<Cat>.json.gz``: JSON, description a list,
                  fields as 2014                  imageURLHighRes / imageURL lists
``amazon2023``    ``<Cat>.jsonl.gz``: user_id,    ``meta_<Cat>.jsonl.gz``: parent_asin, title,
                  parent_asin, timestamp (ms)     description list, images [{large, hi_res, thumb}]
================  ==============================  ====================================================

Decisions:

- **Item identity**: ``item`` is the ASIN as published (2023: ``parent_asin``, as the
  2023 benchmark files use, so colour/size variants are one item). An item is the pair
  (``domain``, ``item``): an ASIN reviewed in both categories is two items, one per
  domain, each with its domain's meta record.
- **Timestamps**: integer epoch seconds; 2023's milliseconds are floored to seconds.
  2014/2018 times are whole days, so many ties: rows are written in source order
  (domain A's file, then B's, by line) so that a stable sort breaks ties by file order.
- **Text**: titles and descriptions (lists joined with spaces) are kept as published
  except for HTML tags, replaced by spaces (2014/2018 meta carries markup such as
  ``<b>``, ``<br>``). Entities and whitespace are normalized later, for every source,
  when the items table is built (:mod:`cdsr_pipeline.data.sequences`). A title or
  description that is page script (some 2018 records hold the page's JavaScript) is
  dropped and quarantined as ``bad_title``/``bad_description`` (raw = that field); the
  item is kept.
- **Images**: ``image_ref`` is the first image: 2014 ``imUrl``; 2018 the first
  ``imageURLHighRes`` (else ``imageURL``); 2023 the first image's ``large`` (else
  ``hi_res``, ``thumb``).
- **Items** are the items of kept interactions; meta records of other items are
  ignored (counted in the notes). An item without a meta record is kept without text.

Quarantine reasons: ``empty_line``, ``malformed_json`` (2014 meta: ``malformed_literal``),
``bad_encoding``, ``line_too_long``, ``missing_field:<field>``, ``bad_timestamp``,
``duplicate_interaction`` (same domain, user, item and timestamp; the first is kept),
``duplicate_item`` (a second meta record of an item of the interactions; the first is
kept), ``bad_title``, ``bad_description``. ``raw`` is the line (truncated), except for
duplicates, whose raw is the repeated key as JSON (``{"reviewerID": ..., "asin": ...,
"unixReviewTime": ...}``, ``{"asin": ..., "title": ...}``): a duplicate is only known
once the whole file is read, and its line would cost a second pass over the file (a
third more time) for text that repeats a kept record.
"""

from __future__ import annotations

import ast
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from .. import schema
from ..ingest import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    QUARANTINE_FILE,
    RAW_PREVIEW_CHARS,
    IngestReport,
    QueryParquetFile,
    SourceError,
    connect,
    require_file,
    sql_str,
    write_query_parquet,
)
from ..staging import (
    StagedRows,
    TextLines,
    apply_line_rejects,
    create_item_tables,
    item_notes,
    stage_rows,
    too_long_sql,
    union_all,
    write_quarantine,
)

logger = logging.getLogger(__name__)

AmazonVersion = Literal["amazon2014", "amazon2018", "amazon2023"]

# Page script inside a title or description (RE2 syntax, for DuckDB).
PAGE_SCRIPT_PATTERN = r"(?i)<script|\bvar\s+\w+\s*=|function\s*\([^)]*\)\s*\{|\.getTime\(\)"
HTML_TAG_PATTERN = r"<[A-Za-z/!][^<>]*>"
# A JSON line that is an object (valid JSON that is not an object is a malformed record).
_OBJECT_START = r"^\s*[{]"


@dataclass(frozen=True)
class AmazonFormat:
    """Field names and file names of one version of the dumps."""

    user_field: str
    item_field: str
    time_field: str
    time_divisor: int  # 1000 where timestamps are milliseconds
    meta_item_field: str
    image_paths: tuple[str, ...]  # JSON paths, first non-empty wins
    meta_is_python_literal: bool
    review_names: tuple[str, ...]  # file names, ``{}`` = category; preferred first
    meta_names: tuple[str, ...]


FORMATS: dict[str, AmazonFormat] = {
    "amazon2014": AmazonFormat(
        user_field="reviewerID",
        item_field="asin",
        time_field="unixReviewTime",
        time_divisor=1,
        meta_item_field="asin",
        image_paths=("$.imUrl",),
        meta_is_python_literal=True,
        review_names=("reviews_{}.json.gz", "reviews_{}.json", "reviews_{}_5.json.gz", "reviews_{}_5.json"),
        meta_names=("meta_{}.json.gz", "meta_{}.json"),
    ),
    "amazon2018": AmazonFormat(
        user_field="reviewerID",
        item_field="asin",
        time_field="unixReviewTime",
        time_divisor=1,
        meta_item_field="asin",
        image_paths=("$.imageURLHighRes[0]", "$.imageURL[0]"),
        meta_is_python_literal=False,
        review_names=("{}.json.gz", "{}.json", "{}_5.json.gz", "{}_5.json"),
        meta_names=("meta_{}.json.gz", "meta_{}.json"),
    ),
    "amazon2023": AmazonFormat(
        user_field="user_id",
        item_field="parent_asin",
        time_field="timestamp",
        time_divisor=1000,
        meta_item_field="parent_asin",
        image_paths=("$.images[0].large", "$.images[0].hi_res", "$.images[0].thumb"),
        meta_is_python_literal=False,
        review_names=("{}.jsonl.gz", "{}.jsonl"),
        meta_names=("meta_{}.jsonl.gz", "meta_{}.jsonl"),
    ),
}


def amazon_format(version: str) -> AmazonFormat:
    try:
        return FORMATS[version]
    except KeyError:
        raise SourceError(f"unknown Amazon format {version!r}; expected one of {', '.join(FORMATS)}") from None


# -- discovery ------------------------------------------------------------------------


def _category_of(name: str, pattern: str) -> str | None:
    """The category in file ``name`` if it has the form ``pattern`` (``{}`` = category)."""
    prefix, suffix = pattern.split("{}")
    if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
        return None
    category = name[len(prefix) : len(name) - len(suffix)]
    # 2018/2023 review names have no prefix: keep meta files and 5-core names out.
    if category.startswith("meta_") or (not pattern.endswith(("_5.json.gz", "_5.json")) and category.endswith("_5")):
        return None
    return category


def discover_amazon_files(
    version: AmazonVersion, folder: Path, categories: tuple[str, str] | None
) -> tuple[dict[str, Path], dict[str, Path | None], tuple[str, str]]:
    """The review and meta files of two categories in ``folder``, by their standard names.

    Returns ``(reviews, meta, domain_names)``, the mappings keyed by domain letter,
    domain A being the first category; a category without a meta file maps to None.
    Where a category has both the full dump and the 5-core file, the full dump is used.
    With ``categories=None`` the folder must hold the reviews of exactly two categories
    (taken in sorted order).
    """
    fmt = amazon_format(version)
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{version} folder not found: {folder}")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if categories is None:
        found = sorted({c for n in names for p in fmt.review_names if (c := _category_of(n, p))})
        if len(found) != 2:
            expected = " or ".join(fmt.review_names).replace("{}", "<Category>")
            listing = ", ".join(found) if found else "none"
            raise SourceError(
                f"{folder}: expected {version} reviews ({expected}) of exactly two categories, "
                f"found {len(found)} ({listing}); pass the two categories"
            )
        categories = (found[0], found[1])
        logger.info("%s: categories inferred from file names (sorted): A=%s, B=%s", folder, *categories)

    reviews: dict[str, Path] = {}
    meta: dict[str, Path | None] = {}
    for letter, category in zip(schema.DOMAINS, categories):
        candidates = [folder / p.format(category) for p in fmt.review_names if p.format(category) in names]
        if not candidates:
            looked = ", ".join(p.format(category) for p in fmt.review_names)
            raise SourceError(f"{folder}: no {version} reviews for category {category!r} (looked for {looked})")
        reviews[letter] = candidates[0]
        meta[letter] = next((folder / p.format(category) for p in fmt.meta_names if p.format(category) in names), None)
    return reviews, meta, (categories[0], categories[1])


# -- parsing ------------------------------------------------------------------------


def _python_literals_to_json(lines: pa.Array) -> pa.Array:
    """2014 meta lines (Python dict literals: single quotes, None, tuples) as JSON text.

    Null where a line is not a dict literal. ``ast.literal_eval`` evaluates literals
    only, never code. A bounded batch of lines per call (DuckDB's vectors).
    """
    out = []
    for text in lines.to_pylist():
        try:
            value = ast.literal_eval(text.strip()) if text is not None else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        out.append(json.dumps(value, default=str) if isinstance(value, dict) else None)
    return pa.array(out, pa.string())


def _register_python_literal_parser(con: duckdb.DuckDBPyConnection) -> None:
    con.create_function(
        "python_literal_to_json",
        _python_literals_to_json,
        ["VARCHAR"],
        "VARCHAR",
        type="arrow",
        null_handling="special",
    )


def _without_tags(text: str) -> str:
    """SQL: ``text`` with its HTML tags replaced by spaces, trimmed; null if nothing is left.

    The same as ``nullif(trim(regexp_replace(text, tag, ' ', 'g')), '')``, at a tenth
    of the cost: the regex runs only on texts with a ``<``, and ``trim`` (which decodes
    the whole string) only on texts whose first or last character it would remove.
    """
    tags_replaced = f"regexp_replace({text}, '{HTML_TAG_PATTERN}', ' ', 'g')"
    untagged = f"CASE WHEN contains({text}, '<') THEN {tags_replaced} ELSE {text} END"
    # DuckDB computes the repeated subexpression once (common subexpression elimination)
    edge_blank = f"trim({untagged}[1]) = '' OR trim({untagged}[-1]) = ''"
    return f"nullif(CASE WHEN {edge_blank} THEN trim({untagged}) ELSE {untagged} END, '')"


def _is_page_script(text: str) -> str:
    """SQL: whether ``text`` matches :data:`PAGE_SCRIPT_PATTERN` (false for null).

    Every branch of the pattern needs a ``<``, ``=`` or ``(``, so the regex runs only
    on texts with one of them (the regex scan is most of the cost of building items).
    """
    has_sign = f"contains({text}, '<') OR contains({text}, '=') OR contains({text}, '(')"
    return f"coalesce(CASE WHEN {has_sign} THEN regexp_matches({text}, '{PAGE_SCRIPT_PATTERN}') END, false)"


def _empty_line_or(malformed: str) -> str:
    """SQL: the reason for a ``line`` that gave no fields: empty (or blank), else ``malformed``.

    Inside a CASE branch it runs on those lines only: trimming every line instead
    costs a third more time.
    """
    return f"CASE WHEN line IS NULL OR regexp_full_match(line, '\\s*') THEN 'empty_line' ELSE '{malformed}' END"


def _not_an_object_or(reason: str, json_line: str = "line", malformed: str = "malformed_json") -> str:
    """SQL: ``reason`` for a parsed ``json_line`` that lacks its first field, unless it
    is valid JSON that is not an object (``[1, 2]``): then ``malformed``.

    Only such lines need the check, as a field can only be found in an object;
    checking every line instead cost a fifth of the parse.
    """
    return f"CASE WHEN regexp_matches({json_line}, '{_OBJECT_START}') THEN '{reason}' ELSE '{malformed}' END"


def _review_parse_sql(fmt: AmazonFormat) -> str:
    """SQL over ``source_rows(idx, line)``: the three fields of a review line, or why not.

    One JSON parse per line (``json_extract_string`` with the three paths).
    """
    paths = ", ".join(f"'$.{f}'" for f in (fmt.user_field, fmt.item_field, fmt.time_field))
    return f"""
        SELECT idx, "user", item, "timestamp",
            CASE WHEN {too_long_sql()} THEN 'line_too_long'
                 WHEN fields IS NULL THEN {_empty_line_or("malformed_json")}
                 WHEN coalesce("user", '') = '' THEN {_not_an_object_or(f"missing_field:{fmt.user_field}")}
                 WHEN coalesce(item, '') = '' THEN 'missing_field:{fmt.item_field}'
                 WHEN fields[3] IS NULL THEN 'missing_field:{fmt.time_field}'
                 WHEN "timestamp" IS NULL THEN 'bad_timestamp'
            END AS reason,
            CASE WHEN reason IS NOT NULL THEN left(line, {RAW_PREVIEW_CHARS}) END AS raw
        FROM (
            SELECT idx, line, fields, fields[1] AS "user", fields[2] AS item,
                   try_cast(fields[3] AS BIGINT) // {fmt.time_divisor} AS "timestamp"
            FROM (SELECT idx, line, try(json_extract_string(line, [{paths}])) AS fields FROM source_rows)
        )"""


def _json_text(value: str) -> str:
    """SQL: a JSON value as text; a list of strings joined with spaces."""
    joined = f"array_to_string(try_cast({value} AS VARCHAR[]), ' ')"
    return f"CASE json_type({value}) WHEN 'ARRAY' THEN {joined} ELSE {value} ->> '$' END"


def _meta_parse_sql(fmt: AmazonFormat) -> str:
    json_line = "python_literal_to_json(line)" if fmt.meta_is_python_literal else "line"
    malformed = "malformed_literal" if fmt.meta_is_python_literal else "malformed_json"
    paths = ", ".join(f"'{p}'" for p in (f"$.{fmt.meta_item_field}", "$.title", "$.description", *fmt.image_paths))
    images = ", ".join(f"nullif(fields[{4 + i}] ->> '$', '')" for i in range(len(fmt.image_paths)))
    missing_item = f"missing_field:{fmt.meta_item_field}"
    return f"""
        SELECT idx, item, title, description, image_ref,
            CASE WHEN {too_long_sql()} THEN 'line_too_long'
                 WHEN fields IS NULL THEN {_empty_line_or(malformed)}
                 WHEN coalesce(item, '') = '' THEN {_not_an_object_or(missing_item, "json_line", malformed)}
            END AS reason,
            CASE WHEN reason IS NOT NULL THEN left(line, {RAW_PREVIEW_CHARS}) END AS raw
        FROM (
            SELECT idx, line, json_line, fields, fields[1] ->> '$' AS item,
                   {_json_text("fields[2]")} AS title,
                   {_json_text("fields[3]")} AS description,
                   coalesce({images}) AS image_ref
            FROM (
                SELECT idx, line, json_line, try(json_extract(json_line, [{paths}])) AS fields
                FROM (SELECT idx, line, {json_line} AS json_line FROM source_rows)
            )
        )"""


# -- ingest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One input file and what it is."""

    path: Path
    domain: str
    kind: Literal["reviews", "meta"]

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.domain}"


def ingest_amazon(
    version: AmazonVersion,
    reviews: Mapping[str, Path],
    meta: Mapping[str, Path | None],
    out_dir: Path,
    domain_names: tuple[str, str],
    temp_dir: Path | None = None,
    *,
    memory_limit: str = "4GB",
) -> IngestReport:
    """Write ``interactions.parquet``, ``items.parquet`` and ``quarantine.parquet`` into ``out_dir``.

    ``reviews`` and ``meta`` are keyed by domain letter (``"A"``, ``"B"``); a meta file
    may be None (that domain's items then have no text or image). ``temp_dir`` holds
    DuckDB's spill files (default: the system temp folder). ``memory_limit`` bounds
    DuckDB's memory; the staging tables move to ``temp_dir`` beyond it.
    """
    fmt = amazon_format(version)
    if set(reviews) != set(schema.DOMAINS) or not set(meta) <= set(schema.DOMAINS):
        raise SourceError(
            f"reviews/meta must be keyed by domain letters A and B, got {sorted(reviews)} / {sorted(meta)}"
        )
    sources = [
        _Source(require_file(reviews[d], f"{version} reviews (domain {d})"), d, "reviews") for d in schema.DOMAINS
    ]
    sources += [
        _Source(require_file(meta[d], f"{version} meta (domain {d})"), d, "meta") for d in schema.DOMAINS if meta.get(d)
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = IngestReport(format=version, files=[str(s.path) for s in sources], domain_names=tuple(domain_names))
    for letter, name in zip(schema.DOMAINS, domain_names):
        if not meta.get(letter):
            report.notes.append(
                f"no meta file for domain {letter} ({name}): its items have no title, description or image"
            )

    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdsr-amazon-", dir=temp_dir) as work:
        with closing(connect(Path(work) / "duckdb", memory_limit=memory_limit)) as con:
            _register_python_literal_parser(con)  # database-wide: the cursors of the concurrent scans see it
            _ingest(con, fmt, sources, out_dir, report)
    return report


def _ingest(
    con: duckdb.DuckDBPyConnection, fmt: AmazonFormat, sources: list[_Source], out_dir: Path, report: IngestReport
) -> None:
    """Stage every file and write the three outputs, with the work spread over threads.

    Two workers (one DuckDB cursor each) stage the files, largest first: a gzip stream
    inflates on one core, so the largest file sets the pace. A review file's
    duplicates are marked by its worker as soon as it is staged. This thread writes the
    kept reviews of each domain as soon as that domain is staged, A's first (usually
    while B's file is still being read); a last task, queued behind the files, writes
    the items and the quarantine while B's reviews are being written.
    """
    ordered = sorted(sources, key=lambda s: s.path.stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            staging = {s: pool.submit(_timed, report, f"stage {s.name}", _stage_file, con, fmt, s) for s in ordered}
            # FIFO: this task starts only once every file's task has started, so waiting
            # for them inside it cannot block a worker that a file still needs.
            items = pool.submit(_finish_items, con, fmt, staging, sources, out_dir, report)
            with (
                closing(con.cursor()) as cursor,
                QueryParquetFile(schema.INTERACTIONS, out_dir / INTERACTIONS_FILE) as interactions,
            ):
                for source in sources:  # domain order: A's reviews first
                    if source.kind == "reviews":
                        kept = _kept_reviews_sql(source, staging[source].result())
                        _timed(report, f"write interactions {source.domain}", interactions.write, cursor, kept)
            report.interactions = interactions.rows
            items.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # files not started yet are not read
            raise


def _timed(report: IngestReport, step: str, function, *args):
    started = time.perf_counter()
    try:
        return function(*args)
    finally:
        report.timings[step] = time.perf_counter() - started


def _stage_file(con: duckdb.DuckDBPyConnection, fmt: AmazonFormat, source: _Source) -> StagedRows:
    """Parse one file into its staging table (own cursor); mark a review file's duplicates."""
    lines = TextLines(source.path)
    with closing(con.cursor()) as cursor:
        with lines.registered(cursor, f"{source.name}_chunks") as chunks:
            staged = stage_rows(
                cursor,
                source.path,
                lines.rows_sql(chunks),
                _review_parse_sql(fmt) if source.kind == "reviews" else _meta_parse_sql(fmt),
                source.name,
                first_line=1,
                rejects=False,
            )
        apply_line_rejects(cursor, staged.table, lines.rejected)
        if source.kind == "reviews":
            _mark_duplicate_reviews(cursor, fmt, staged)
    return staged


def _kept_reviews_sql(source: _Source, staged: StagedRows) -> str:
    """The interactions of one review file, in file order (a filtered scan of a table
    keeps insertion order: DuckDB's order preservation)."""
    return f"""SELECT "user", item, '{source.domain}' AS domain, "timestamp" FROM {staged.table} WHERE reason IS NULL"""


def _finish_items(
    con: duckdb.DuckDBPyConnection,
    fmt: AmazonFormat,
    staging: dict[_Source, Future[StagedRows]],
    sources: list[_Source],
    out_dir: Path,
    report: IngestReport,
) -> None:
    """Once every file is staged: items, quarantine and notes (own cursor)."""
    staged = {source: staging[source].result() for source in sources}
    with closing(con.cursor()) as cursor:
        _assemble(cursor, fmt, staged, out_dir, report)


def _mark_duplicate_reviews(con: duckdb.DuckDBPyConnection, fmt: AmazonFormat, staged: StagedRows) -> None:
    """Give every repeat of a (user, item, timestamp) of the file, after its first row,
    the reason ``duplicate_interaction`` and the repeated key as ``raw``.

    The key of the domain is the file's key (one file per domain). The keys that repeat
    are found by grouping on their hash (one integer: cheaper than grouping on the three
    columns), then the exact repeats among those rows by the columns themselves.
    """
    key = f"""{{'{fmt.user_field}': "user", '{fmt.item_field}': item, '{fmt.time_field}': "timestamp"}}"""
    con.execute(
        f"""
        UPDATE {staged.table} SET reason = 'duplicate_interaction', raw = to_json({key})::VARCHAR
        WHERE idx IN (
            SELECT idx FROM (
                SELECT idx, row_number() OVER (PARTITION BY "user", item, "timestamp" ORDER BY idx) AS occurrence
                FROM {staged.table}
                WHERE reason IS NULL AND hash("user", item, "timestamp") IN (
                    SELECT hash("user", item, "timestamp") AS h FROM {staged.table}
                    WHERE reason IS NULL GROUP BY h HAVING count(*) > 1
                )
            ) WHERE occurrence > 1
        )
        """
    )


def _assemble(
    con: duckdb.DuckDBPyConnection,
    fmt: AmazonFormat,
    staged: dict[_Source, StagedRows],
    out_dir: Path,
    report: IngestReport,
) -> None:
    report.lines_read = sum(f.lines for f in staged.values())
    started = time.perf_counter()
    con.execute(
        "CREATE VIEW kept_reviews AS "
        + union_all([_kept_reviews_sql(s, f) for s, f in staged.items() if s.kind == "reviews"])
    )

    meta_parts = [
        f"SELECT '{s.domain}' AS domain, idx, item, title, description, image_ref "
        f"FROM {f.table} WHERE reason IS NULL"
        for s, f in staged.items()
        if s.kind == "meta"
    ]
    create_item_tables(
        con,
        "kept_reviews",
        union_all(meta_parts) if meta_parts else None,
        "domain VARCHAR, idx BIGINT, item VARCHAR, title VARCHAR, description VARCHAR, image_ref VARCHAR",
    )
    con.execute(
        f"""
        CREATE TABLE described AS
        SELECT r.*, row_number() OVER (PARTITION BY r.domain, r.item ORDER BY r.idx) AS occurrence,
               {_is_page_script("r.title")} AS script_title,
               {_is_page_script("r.description")} AS script_description
        FROM item_records r SEMI JOIN used_items u USING (domain, item)
        """
    )
    report.items = write_query_parquet(
        con,
        f"""
        SELECT u.item, u.domain,
               CASE WHEN NOT d.script_title THEN {_without_tags("d.title")} END AS title,
               CASE WHEN NOT d.script_description THEN {_without_tags("d.description")} END AS description,
               d.image_ref
        FROM used_items u LEFT JOIN described d ON d.domain = u.domain AND d.item = u.item AND d.occurrence = 1
        ORDER BY u.domain, u.item
        """,
        schema.SOURCE_ITEMS,
        out_dir / ITEMS_FILE,
    )
    report.timings["items"] = time.perf_counter() - started
    started = time.perf_counter()
    report.quarantined = write_quarantine(con, _quarantine_parts(fmt, staged), out_dir / QUARANTINE_FILE)
    described = [s.domain for s in staged if s.kind == "meta"]
    report.notes.extend(item_notes(con, out_dir / ITEMS_FILE, report.domain_names, described, "meta record"))
    report.timings["quarantine and notes"] = time.perf_counter() - started


def _quarantine_parts(fmt: AmazonFormat, staged: dict[_Source, StagedRows]) -> list[str]:
    """Queries for every rejected line or field of every file (see :func:`write_quarantine`).

    Every line of a file is a row of its staging table (lines the reader could not
    read included, with their reason); a review file's rejected rows include its
    duplicates (marked when it was staged).
    """
    parts = []
    for file_no, (source, lines) in enumerate(staged.items()):
        head = f"SELECT {file_no} AS file_no, {sql_str(source.path)} AS source_file"
        bad_rows = f"(SELECT idx, reason, raw FROM {lines.table} WHERE reason IS NOT NULL)"
        parts.append(f"{head}, line, reason, raw FROM {lines.numbered(bad_rows)}")
        if source.kind == "meta":
            key = f"{{'{fmt.meta_item_field}': item, 'title': title}}"
            repeats = (
                f"(SELECT idx, left(to_json({key})::VARCHAR, {RAW_PREVIEW_CHARS}) AS raw, 'duplicate_item' AS reason "
                f"FROM described WHERE domain = '{source.domain}' AND occurrence > 1)"
            )
            parts.append(f"{head}, line, reason, raw FROM {lines.numbered(repeats)}")
            for field in ("title", "description"):
                scripts = (
                    f"(SELECT idx, left({field}, {RAW_PREVIEW_CHARS}) AS raw, 'bad_{field}' AS reason FROM described "
                    f"WHERE domain = '{source.domain}' AND occurrence = 1 AND script_{field})"
                )
                parts.append(f"{head}, line, reason, raw FROM {lines.numbered(scripts)}")
    return parts
