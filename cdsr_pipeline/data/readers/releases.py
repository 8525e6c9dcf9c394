"""Readers for published CDSR benchmark releases, with their split kept exactly.

Two layouts (see ``../shared/data/README.md`` for the originals):

- **LLMCDSR** (xhran2010/LLMCDSR): ``num.txt`` (|A|, |B|), ``items.tsv`` (domain,
  local_id, global_id, asin, title), ``train_overlap.txt`` and the optional
  single-domain ``train_A.txt``/``train_B.txt`` (``user<TAB>i1,i2,...`` with global ids
  in chronological order), ``valid.txt``/``test.txt`` (the last id is the target).
- **C2DSR** (the "new", leak-free split used by the papers' tables): ``Alist.txt``/
  ``Blist.txt`` (``orig_id<TAB>ASIN<TAB>local_id``), ``userlist.txt``,
  ``validdata_new.txt``/``testdata_new.txt``/``traindata_new.txt``
  (``user_idx<TAB>inter_id<TAB>item|unix_ts|datetime|<TAB>...``; B ids are |A| + local),
  optional ``items_with_titles.tsv``.

Releases are often incomplete as published (no training file, blank titles for a
domain): optional files that are absent become notes; required ones are a
:class:`~cdsr_pipeline.data.ingest.SourceError`. Malformed lines are quarantined
with their file, line number and reason, never dropped silently.

Lines are split and parsed with polars expressions; line numbers stay exact because
the file is split on ``\\n`` ourselves (CSV readers skip blank lines).
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pyarrow as pa

from .. import schema
from ..ingest import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    QUARANTINE_FILE,
    RAW_PREVIEW_CHARS,
    IngestReport,
    SourceError,
    require_file,
)
from ...storage import write_parquet_atomic


def default_domain_names(folder: Path) -> tuple[str, str]:
    """``llmcdsr-food-kitchen`` -> (Food, Kitchen): the last two dash-separated words."""
    parts = [p for p in re.split(r"[-_]", folder.resolve().name) if p]
    if len(parts) >= 2:
        return parts[-2].capitalize(), parts[-1].capitalize()
    return "A", "B"


def _read_lines(path: Path) -> pl.DataFrame:
    """Every line of a text file with its 1-based number; a final empty line is dropped."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    frame = pl.DataFrame({"line": lines}, schema={"line": pl.String})
    frame = frame.with_columns(pl.col("line").str.strip_suffix("\r"))
    return frame.with_row_index("line_no", offset=1).with_columns(pl.col("line_no").cast(pl.Int64))


def _quarantine_rows(frame: pl.DataFrame, file: Path, reason: str | pl.Expr) -> pl.DataFrame:
    reason_expr = pl.lit(reason) if isinstance(reason, str) else reason
    return frame.select(
        pl.lit(str(file)).alias("source_file"),
        pl.col("line_no").alias("line"),
        reason_expr.alias("reason"),
        pl.col("line").str.slice(0, RAW_PREVIEW_CHARS).alias("raw"),
    )


class _Collector:
    """Accumulates interactions, quarantined lines and notes of one release."""

    def __init__(self, fmt: str, folder: Path, domain_names: tuple[str, str]):
        self.report = IngestReport(format=fmt, files=[], domain_names=domain_names)
        self.folder = folder
        self.interactions: list[pl.DataFrame] = []
        self.quarantine: list[pl.DataFrame] = []

    def optional(self, name: str, what: str) -> Path | None:
        path = self.folder / name
        if path.is_file():
            self.report.files.append(str(path))
            return path
        self.report.notes.append(f"{name} absent: {what}")
        return None

    def required(self, name: str, what: str) -> Path:
        path = require_file(self.folder / name, f"{self.report.format} release file {name} ({what})")
        self.report.files.append(str(path))
        return path

    def reject(self, rows: pl.DataFrame) -> None:
        if rows.height:
            self.quarantine.append(rows)
            for reason, count in rows.group_by("reason").len().iter_rows():
                self.report.quarantined[reason] = self.report.quarantined.get(reason, 0) + count

    def write(self, items: pl.DataFrame, out_dir: Path) -> IngestReport:
        interactions = (
            pl.concat(self.interactions, how="vertical")
            if self.interactions
            else pl.DataFrame(schema=pl.from_arrow(schema.INTERACTIONS.empty_table()).schema)
        )
        quarantine = (
            pl.concat(self.quarantine, how="vertical")
            if self.quarantine
            else pl.DataFrame(schema=pl.from_arrow(schema.QUARANTINE.empty_table()).schema)
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(_to_arrow(interactions, schema.INTERACTIONS), out_dir / INTERACTIONS_FILE)
        write_parquet_atomic(_to_arrow(items, schema.SOURCE_ITEMS), out_dir / ITEMS_FILE)
        write_parquet_atomic(_to_arrow(quarantine, schema.QUARANTINE), out_dir / QUARANTINE_FILE)
        self.report.interactions = interactions.height
        self.report.items = items.height
        return self.report


def _to_arrow(frame: pl.DataFrame, target: pa.Schema) -> pa.Table:
    return frame.select([f.name for f in target]).to_arrow().cast(target)


# -- LLMCDSR ---------------------------------------------------------------------


def _read_item_counts(path: Path) -> tuple[int, int]:
    values = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        n_a, n_b = int(values[0]), int(values[1])
    except (IndexError, ValueError):
        raise SourceError(f"{path}: expected two item counts (|A| then |B|), got {values[:2]}") from None
    return n_a, n_b


def ingest_llmcdsr(folder: Path, out_dir: Path, domain_names: tuple[str, str] | None = None) -> IngestReport:
    """Read an LLMCDSR release folder into the normalized tables (split kept as released)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"llmcdsr release folder not found: {folder}")
    names = domain_names or default_domain_names(folder)
    collect = _Collector("llmcdsr", folder, names)
    n_a, n_b = _read_item_counts(collect.required("num.txt", "item counts per domain"))
    n_items = n_a + n_b

    items = _llmcdsr_items(collect, n_a, n_b)

    sequence_files = [
        ("train_overlap.txt", "train", "both", True),
        ("train_A.txt", "train", "A", False),
        ("train_B.txt", "train", "B", False),
        ("valid.txt", "valid", "both", True),
        ("test.txt", "test", "both", True),
    ]
    for name, split, user_domains, needed in sequence_files:
        path = (
            collect.required(name, f"{split} sequences")
            if needed
            else collect.optional(name, f"no {names[0 if user_domains == 'A' else 1]}-only training users")
        )
        if path is None:
            continue
        lines = _read_lines(path)
        collect.report.lines_read += lines.height
        parsed = lines.with_columns(
            pl.col("line").str.split_exact("\t", 1).struct.rename_fields(["user", "ids"]).alias("fields")
        ).unnest("fields")
        parsed = parsed.with_columns(
            pl.col("ids").str.strip_chars().str.strip_chars_end(",").str.split(",").alias("tokens")
        ).with_columns(
            pl.col("tokens").list.eval(pl.element().str.strip_chars().cast(pl.Int64, strict=False)).alias("item_ids")
        )
        reasons = (
            pl.when(pl.col("user").is_null() | (pl.col("user").str.strip_chars() == "") | pl.col("ids").is_null())
            .then(pl.lit("malformed_line"))
            .when(pl.col("item_ids").list.eval(pl.element().is_null()).list.any())
            .then(pl.lit("bad_item_id"))
            .when(
                pl.col("item_ids").list.eval((pl.element() < 0) | (pl.element() >= n_items)).list.any()
            )
            .then(pl.lit("unknown_item_id"))
            .when(pl.col("item_ids").list.len() < (2 if split != "train" else 1))
            .then(pl.lit("too_short"))
        )
        if user_domains in schema.DOMAINS:
            outside = (pl.element() >= n_a) if user_domains == "A" else (pl.element() < n_a)
            reasons = reasons.when(pl.col("item_ids").list.eval(outside).list.any()).then(pl.lit("domain_mismatch"))
        parsed = parsed.with_columns(reasons.otherwise(None).alias("reason"))
        # A user's second line in one file (a repeated line, or two sequences under one
        # key) would be merged into the first sequence: the first line is kept.
        repeated = pl.col("reason").is_null() & ~pl.col("user").str.strip_chars().is_first_distinct().over(
            pl.col("reason").is_null()
        )
        parsed = parsed.with_columns(pl.when(repeated).then(pl.lit("duplicate_user")).otherwise(pl.col("reason")).alias("reason"))
        collect.reject(_quarantine_rows(parsed.filter(pl.col("reason").is_not_null()), path, pl.col("reason")))
        good = parsed.filter(pl.col("reason").is_null())
        # Row keys are unique per file: LLMCDSR numbers users from 1 in every file.
        exploded = (
            good.select(
                pl.col("user").str.strip_chars().alias("user_raw"),
                pl.col("item_ids"),
            )
            .with_columns(pl.int_ranges(pl.col("item_ids").list.len()).alias("position"))
            .explode(["item_ids", "position"])
        )
        stem = path.stem
        collect.interactions.append(
            exploded.select(
                pl.format("{}:{}", pl.lit(stem), pl.col("user_raw")).alias("user"),
                pl.col("item_ids").cast(pl.String).alias("item"),
                pl.when(pl.col("item_ids") < n_a).then(pl.lit("A")).otherwise(pl.lit("B")).alias("domain"),
                pl.lit(None, dtype=pl.Int64).alias("timestamp"),
                pl.col("position").cast(pl.Int32),
                pl.lit(split).alias("split"),
                pl.format("{}:{}", pl.lit(stem), pl.col("user_raw")).alias("row"),
                pl.lit(user_domains).alias("user_domains"),
            )
        )
    return collect.write(items, Path(out_dir))


def _llmcdsr_items(collect: _Collector, n_a: int, n_b: int) -> pl.DataFrame:
    ids = pl.DataFrame({"given_id": pl.int_range(0, n_a + n_b, eager=True).cast(pl.Int64)})
    base = ids.with_columns(
        pl.col("given_id").cast(pl.String).alias("item"),
        pl.when(pl.col("given_id") < n_a).then(pl.lit("A")).otherwise(pl.lit("B")).alias("domain"),
    )
    path = collect.optional("items.tsv", "no titles or ASINs; items are known by id only")
    if path is None:
        return base.with_columns(
            pl.lit(None, dtype=pl.String).alias("title"),
            pl.lit(None, dtype=pl.String).alias("description"),
            pl.lit(None, dtype=pl.String).alias("image_ref"),
            pl.lit(None, dtype=pl.String).alias("source_id"),
        )
    lines = _read_lines(path)
    header, body = lines.head(1), lines.slice(1)
    columns = header["line"][0].split("\t") if header.height else []
    expected = ["domain", "local_id", "global_id", "asin", "title"]
    if columns[:5] != expected:
        found = header["line"][0] if header.height else ""
        raise SourceError(f"{path}: expected header columns {expected}, got {found!r}")
    fields = body.with_columns(
        pl.col("line").str.split_exact("\t", 4).struct.rename_fields(expected).alias("f")
    ).unnest("f")
    fields = fields.with_columns(
        pl.col("global_id").cast(pl.Int64, strict=False).alias("gid"),
        pl.col("local_id").cast(pl.Int64, strict=False).alias("lid"),
    )
    offset = pl.when(pl.col("domain") == "B").then(pl.lit(n_a)).otherwise(pl.lit(0))
    bad = (
        pl.when(pl.col("gid").is_null() | pl.col("lid").is_null() | ~pl.col("domain").is_in(["A", "B"]))
        .then(pl.lit("malformed_line"))
        .when((pl.col("gid") != pl.col("lid") + offset) | (pl.col("gid") >= n_a + n_b))
        .then(pl.lit("inconsistent_item_id"))
        .when(pl.col("gid").is_duplicated())
        .then(pl.lit("duplicate_item"))
        .otherwise(None)
    )
    fields = fields.with_columns(bad.alias("reason"))
    collect.reject(_quarantine_rows(fields.filter(pl.col("reason").is_not_null()), path, pl.col("reason")))
    meta = fields.filter(pl.col("reason").is_null()).select(
        pl.col("gid").alias("given_id"),
        pl.col("asin").str.strip_chars(),
        pl.col("title").str.strip_chars().replace("", None).alias("title"),
    )
    items = base.join(meta, on="given_id", how="left").with_columns(
        pl.col("asin").replace("", None).alias("source_id"),
        pl.lit(None, dtype=pl.String).alias("description"),
        pl.lit(None, dtype=pl.String).alias("image_ref"),
    )
    _note_title_coverage(collect, items)
    return items


def _note_title_coverage(collect: _Collector, items: pl.DataFrame) -> None:
    names = dict(zip("AB", collect.report.domain_names))
    for domain, total, titled in (
        items.group_by("domain")
        .agg(pl.len().alias("total"), pl.col("title").is_not_null().sum().alias("titled"))
        .sort("domain")
        .iter_rows()
    ):
        if titled < total:
            collect.report.notes.append(
                f"titles missing for {total - titled:,} of {total:,} {names[domain]} items (domain {domain})"
            )


# -- C2DSR -----------------------------------------------------------------------


def ingest_c2dsr(folder: Path, out_dir: Path, domain_names: tuple[str, str] | None = None) -> IngestReport:
    """Read a C2DSR release folder into the normalized tables (split kept as released)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"c2dsr release folder not found: {folder}")
    names = domain_names or default_domain_names(folder)
    collect = _Collector("c2dsr", folder, names)

    lists = []
    for letter in schema.DOMAINS:
        path = collect.required(f"{letter}list.txt", f"item list of domain {letter}")
        lines = _read_lines(path)
        fields = lines.with_columns(
            pl.col("line").str.split_exact("\t", 2).struct.rename_fields(["orig_id", "asin", "local_id"]).alias("f")
        ).unnest("f").with_columns(pl.col("local_id").str.strip_chars().cast(pl.Int64, strict=False).alias("lid"))
        bad = fields.filter(pl.col("lid").is_null() | pl.col("asin").is_null())
        collect.reject(_quarantine_rows(bad, path, "malformed_line"))
        lists.append(fields.filter(pl.col("lid").is_not_null() & pl.col("asin").is_not_null()).with_columns(
            pl.lit(letter).alias("domain")
        ))
    n_a = lists[0].height
    n_b = lists[1].height
    items = pl.concat(lists).select(
        pl.col("domain"),
        (pl.col("lid") + pl.when(pl.col("domain") == "B").then(pl.lit(n_a)).otherwise(pl.lit(0))).alias("given_id"),
        pl.col("asin").str.strip_chars().alias("source_id"),
    ).with_columns(pl.col("given_id").cast(pl.String).alias("item"))
    for letter, count, frame in (("A", n_a, lists[0]), ("B", n_b, lists[1])):
        if frame["lid"].sort().to_list() != list(range(count)):
            raise SourceError(f"{folder / (letter + 'list.txt')}: local ids are not 0..{count - 1}")

    titles_path = collect.optional("items_with_titles.tsv", "no item titles")
    if titles_path is not None:
        lines = _read_lines(titles_path).slice(1)
        cols = ["domain", "local_id", "global_id", "orig_id", "asin", "title"]
        titles = (
            lines.with_columns(pl.col("line").str.split_exact("\t", 5).struct.rename_fields(cols).alias("f"))
            .unnest("f")
            .select(
                pl.col("global_id").cast(pl.Int64, strict=False).alias("given_id"),
                pl.col("title").str.strip_chars().replace("", None).alias("title"),
            )
            .filter(pl.col("given_id").is_not_null())
            .unique("given_id", keep="first")
        )
        items = items.join(titles, on="given_id", how="left")
    else:
        items = items.with_columns(pl.lit(None, dtype=pl.String).alias("title"))
    items = items.with_columns(
        pl.lit(None, dtype=pl.String).alias("description"),
        pl.lit(None, dtype=pl.String).alias("image_ref"),
    ).sort("given_id")
    _note_title_coverage(collect, items)

    users_path = collect.optional("userlist.txt", "users are known by index only")
    user_names = None
    if users_path is not None:
        user_names = (
            _read_lines(users_path)
            .with_columns(pl.col("line").str.split_exact("\t", 1).struct.rename_fields(["reviewer", "idx"]).alias("f"))
            .unnest("f")
            .select(pl.col("idx").str.strip_chars().alias("user_idx"), pl.col("reviewer").str.strip_chars())
            .filter(pl.col("user_idx").is_not_null())
            .unique("user_idx", keep="first")
        )

    for name, split, needed in (
        ("traindata_new.txt", "train", False),
        ("validdata_new.txt", "valid", True),
        ("testdata_new.txt", "test", True),
    ):
        path = (
            collect.required(name, f"{split} sequences")
            if needed
            else collect.optional(name, "train is absent from this release (not public)")
        )
        if path is not None:
            _c2dsr_sequences(collect, path, split, n_a, n_a + n_b, user_names)
    return collect.write(items, Path(out_dir))


def _c2dsr_sequences(
    collect: _Collector, path: Path, split: str, n_a: int, n_items: int, user_names: pl.DataFrame | None
) -> None:
    lines = _read_lines(path)
    collect.report.lines_read += lines.height
    fields = lines.with_columns(pl.col("line").str.strip_chars_end("\t").str.split("\t").alias("cells")).with_columns(
        pl.col("cells").list.get(0, null_on_oob=True).alias("user_idx"),
        pl.col("cells").list.get(1, null_on_oob=True).alias("inter_id"),
        pl.col("cells").list.slice(2).alias("events"),
    )
    events = fields.with_columns(
        pl.col("events")
        .list.eval(pl.element().str.split("|").list.get(0, null_on_oob=True).cast(pl.Int64, strict=False))
        .alias("item_ids"),
        pl.col("events")
        .list.eval(pl.element().str.split("|").list.get(1, null_on_oob=True).cast(pl.Int64, strict=False))
        .alias("timestamps"),
    )
    reason = (
        pl.when(pl.col("user_idx").is_null() | (pl.col("events").list.len() < 2))
        .then(pl.lit("malformed_line"))
        .when(pl.col("item_ids").list.eval(pl.element().is_null()).list.any())
        .then(pl.lit("bad_item_id"))
        .when(pl.col("timestamps").list.eval(pl.element().is_null()).list.any())
        .then(pl.lit("bad_timestamp"))
        .when(pl.col("item_ids").list.eval((pl.element() < 0) | (pl.element() >= n_items)).list.any())
        .then(pl.lit("unknown_item_id"))
        # a line repeated word for word would count its user's row twice (the first is kept)
        .when(~pl.col("line").str.strip_chars().is_first_distinct())
        .then(pl.lit("duplicate_line"))
        .otherwise(None)
    )
    events = events.with_columns(reason.alias("reason"))
    collect.reject(_quarantine_rows(events.filter(pl.col("reason").is_not_null()), path, pl.col("reason")))
    good = events.filter(pl.col("reason").is_null()).with_columns(pl.col("user_idx").str.strip_chars())
    if user_names is not None:
        good = good.join(user_names, on="user_idx", how="left")
    else:
        good = good.with_columns(pl.lit(None, dtype=pl.String).alias("reviewer"))
    exploded = (
        good.select(
            pl.coalesce(pl.col("reviewer"), pl.col("user_idx")).alias("user"),
            pl.format("{}:{}", pl.lit(path.stem), pl.col("line_no")).alias("row"),
            pl.col("item_ids"),
            pl.col("timestamps"),
            pl.int_ranges(pl.col("item_ids").list.len()).alias("position"),
        )
        .explode(["item_ids", "timestamps", "position"])
    )
    collect.interactions.append(
        exploded.select(
            pl.col("user"),
            pl.col("item_ids").cast(pl.String).alias("item"),
            pl.when(pl.col("item_ids") < n_a).then(pl.lit("A")).otherwise(pl.lit("B")).alias("domain"),
            pl.col("timestamps").alias("timestamp"),
            pl.col("position").cast(pl.Int32),
            pl.lit(split).alias("split"),
            pl.col("row"),
            pl.lit("both").alias("user_domains"),
        )
    )
