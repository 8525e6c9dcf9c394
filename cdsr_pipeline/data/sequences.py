"""From normalized interactions to filtered, split cross-domain sequences (SPEC "Data").

Two paths, one output (the ``cdsr_sequences`` artifacts described in
:mod:`cdsr_pipeline.data.schema`):

- **raw sources** (Amazon dumps, interactions files): keep users active in both
  domains; drop users with fewer than ``min_user_interactions`` interactions, items
  with fewer than ``min_item_interactions`` and users with fewer than
  ``min_items_per_domain`` items in either domain, repeated until nothing changes
  (each filter can break another's condition); give items global ids, domain A
  first; order each user's history by time and split it chronologically: the last
  interaction is the test target, the one before it the validation target, the rest
  is training ("leave the last two out").
- **released splits** (C2DSR, LLMCDSR): ids, sequences and split exactly as released.

The filtering runs in DuckDB over parquet so that a dump of tens of millions of rows
is processed with bounded memory.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .ingest import INTERACTIONS_FILE, ITEMS_FILE, connect, scalar, sql_str
from ..storage import atomic_write_text, write_parquet_atomic

DOMAINS_FILE = "domains.json"
STATS_FILE = "stats.json"
ITEMS_OUT = "items.parquet"


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the raw-data preparation (papers' defaults). Ignored for released splits."""

    min_user_interactions: int = 10
    min_item_interactions: int = 10
    min_items_per_domain: int = 3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class SequencesReport:
    dataset: str
    protocol: str
    stats: dict
    filter_rounds: int = 0
    notes: list[str] = field(default_factory=list)


def split_file(split: str) -> str:
    return f"{split}.parquet"


def build_sequences(
    source_dir: Path,
    out_dir: Path,
    *,
    dataset: str,
    domain_names: tuple[str, str],
    config: FilterConfig = FilterConfig(),
    temp_dir: Path | None = None,
    notes: list[str] | None = None,
) -> SequencesReport:
    """Write items, train/valid/test sequences, domains.json and stats.json into ``out_dir``."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    interactions_path = source_dir / INTERACTIONS_FILE
    released = _is_released(interactions_path)
    if released:
        items, splits = _released(source_dir)
        rounds = 0
        protocol = "released split, kept exactly"
    else:
        items, splits, rounds = _filter_and_split(source_dir, config, temp_dir or out_dir / ".duckdb_tmp")
        protocol = "leave-last-two-out chronological split (valid = second-to-last, test = last interaction)"

    n_a = int((items["domain"] == "A").sum())
    items = _clean_item_texts(items).with_columns(
        pl.when(pl.col("domain") == "A")
        .then(pl.lit(domain_names[0]))
        .otherwise(pl.lit(domain_names[1]))
        .alias("domain_name")
    )
    write_parquet_atomic(_arrow(items, schema.ITEMS), out_dir / ITEMS_OUT)
    for split, frame in splits.items():
        frame = frame.with_columns(_target_domain(split, n_a))
        write_parquet_atomic(_arrow(frame, schema.SEQUENCES), out_dir / split_file(split))

    domains = {
        "dataset": dataset,
        "A": {"name": domain_names[0], "num_items": n_a, "first_id": 0},
        "B": {"name": domain_names[1], "num_items": items.height - n_a, "first_id": n_a},
    }
    atomic_write_text(out_dir / DOMAINS_FILE, json.dumps(domains, indent=2))
    all_notes = list(notes or [])
    if not released and splits["test"].height == 0:
        all_notes.append("no user meets the filtering thresholds: every split is empty")
    stats = split_statistics(out_dir, protocol=protocol, notes=all_notes)
    atomic_write_text(out_dir / STATS_FILE, json.dumps(stats, indent=2))
    return SequencesReport(dataset=dataset, protocol=protocol, stats=stats, filter_rounds=rounds, notes=all_notes)


def _is_released(interactions_path: Path) -> bool:
    """Whether the interactions carry a released split (all rows) or none (raw source).

    Read from the parquet statistics (null counts), not the column itself.
    """
    metadata = pq.ParquetFile(interactions_path).metadata
    column = metadata.schema.names.index("split")
    rows = metadata.num_rows
    nulls = 0
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_null_count:
            nulls = pq.read_table(interactions_path, columns=["split"])["split"].null_count
            break
        nulls += stats.null_count
    if nulls not in (0, rows):
        raise ValueError(f"{interactions_path}: some interactions carry a released split and some don't")
    return rows > 0 and nulls == 0


def _arrow(frame: pl.DataFrame, target: pa.Schema) -> pa.Table:
    return frame.select([f.name for f in target]).to_arrow().cast(target)


def _target_domain(split: str, n_a: int) -> pl.Expr:
    if split == "train":
        return pl.lit(None, dtype=pl.String).alias("target_domain")
    return pl.when(pl.col("sequence").list.last() < n_a).then(pl.lit("A")).otherwise(pl.lit("B")).alias("target_domain")


def _clean_text(column: str) -> pl.Expr:
    """HTML entities decoded (Amazon titles carry ``&amp;``), whitespace collapsed, blank -> null."""
    text = pl.col(column).map_elements(html.unescape, return_dtype=pl.String)
    text = text.str.replace_all(r"\s+", " ").str.strip_chars()
    return pl.when(text == "").then(None).otherwise(text).alias(column)


def _read_source_items(source_dir: Path) -> pl.DataFrame:
    items = pl.read_parquet(source_dir / ITEMS_FILE)
    if "source_id" not in items.columns:
        items = items.with_columns(pl.lit(None, dtype=pl.String).alias("source_id"))
    return items.with_columns(pl.coalesce(pl.col("source_id"), pl.col("item")).alias("source_id"))


def _clean_item_texts(items: pl.DataFrame) -> pl.DataFrame:
    return items.with_columns(_clean_text("title"), _clean_text("description"))


# -- released splits -------------------------------------------------------------


def _released(source_dir: Path) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    items = _read_source_items(source_dir).sort("given_id")
    ids = items["given_id"]
    if ids.null_count() or ids.to_list() != list(range(items.height)):
        raise ValueError(f"{source_dir / ITEMS_FILE}: released item ids are not contiguous 0..{items.height - 1}")
    domains = items["domain"].to_list()
    n_a = domains.count("A")
    if domains != ["A"] * n_a + ["B"] * (len(domains) - n_a):
        raise ValueError(f"{source_dir / ITEMS_FILE}: released ids do not put domain A before domain B")
    items = items.rename({"given_id": "item_id"})

    interactions = pl.read_parquet(source_dir / INTERACTIONS_FILE)
    sequences = (
        interactions.with_columns(pl.col("item").cast(pl.Int64).alias("item_id"))
        .sort(["row", "timestamp", "position"], nulls_last=True, maintain_order=True)
        .group_by("row", maintain_order=True)
        .agg(
            pl.col("split").first(),
            pl.col("user").first(),
            pl.col("user_domains").first(),
            pl.col("item_id").alias("sequence"),
            pl.col("timestamp").alias("timestamps"),
        )
        .with_columns(
            pl.when(pl.col("timestamps").list.eval(pl.element().is_null()).list.any())
            .then(None)
            .otherwise(pl.col("timestamps"))
            .alias("timestamps")
        )
    )
    splits = {split: sequences.filter(pl.col("split") == split) for split in schema.SPLITS}
    return items, splits


# -- raw sources -----------------------------------------------------------------


def _filter_and_split(
    source_dir: Path, config: FilterConfig, temp_dir: Path
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame], int]:
    con = connect(temp_dir)
    try:
        # Filter on integer keys: every round scans a narrow table instead of strings.
        con.execute(
            f"""
            CREATE TEMP TABLE raw AS
            SELECT "user", item, domain, "timestamp", file_row_number AS ord
            FROM read_parquet({sql_str(source_dir / INTERACTIONS_FILE)}, file_row_number = true)
            WHERE domain IN ('A', 'B');
            CREATE TEMP TABLE user_keys AS
            SELECT "user", (row_number() OVER ())::INTEGER AS uid FROM (SELECT DISTINCT "user" FROM raw);
            CREATE TEMP TABLE item_keys AS
            SELECT item, domain, (row_number() OVER ())::INTEGER AS iid FROM (SELECT DISTINCT item, domain FROM raw);
            CREATE TEMP TABLE kept AS
            SELECT uid, iid, domain = 'A' AS is_a, ord FROM raw JOIN user_keys USING ("user") JOIN item_keys USING (item, domain);
            """
        )
        per_domain = max(config.min_items_per_domain, 1)  # active in both domains, always
        rounds = 0
        count = scalar(con, "SELECT count(*) FROM kept")
        while True:
            rounds += 1
            con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE kept AS
                WITH users_ok AS (
                    SELECT uid FROM kept GROUP BY uid
                    HAVING count(*) >= {config.min_user_interactions}
                       AND count(*) FILTER (WHERE is_a) >= {per_domain}
                       AND count(*) FILTER (WHERE NOT is_a) >= {per_domain}
                ), items_ok AS (
                    SELECT iid FROM kept GROUP BY iid HAVING count(*) >= {config.min_item_interactions}
                )
                SELECT k.* FROM kept k SEMI JOIN users_ok USING (uid) SEMI JOIN items_ok USING (iid)
                """
            )
            new_count = scalar(con, "SELECT count(*) FROM kept")
            if new_count == count:
                break
            count = new_count
        con.execute(
            """
            CREATE TEMP TABLE item_ids AS
            SELECT iid, item, domain, (row_number() OVER (ORDER BY domain, item) - 1)::BIGINT AS item_id
            FROM item_keys SEMI JOIN (SELECT DISTINCT iid FROM kept) USING (iid)
            """
        )
        item_ids = pl.from_arrow(con.sql("SELECT item, domain, item_id FROM item_ids ORDER BY item_id").to_arrow_table())
        sequences = pl.from_arrow(
            con.sql(
                """
                SELECT u."user",
                       list(i.item_id ORDER BY r."timestamp", k.ord) AS sequence,
                       list(r."timestamp" ORDER BY r."timestamp", k.ord) AS timestamps
                FROM kept k
                JOIN raw r USING (ord)
                JOIN item_ids i USING (iid)
                JOIN user_keys u USING (uid)
                GROUP BY u."user" ORDER BY u."user"
                """
            ).to_arrow_table()
        )
    finally:
        con.close()

    source_items = _read_source_items(source_dir).unique(["item", "domain"], keep="first", maintain_order=True)
    items = item_ids.join(source_items, on=["item", "domain"], how="left").sort("item_id")
    if sequences.height == 0:
        empty = sequences.with_columns(pl.lit("both").alias("user_domains"))
        return items, {split: empty for split in schema.SPLITS}, rounds
    sequences = sequences.with_columns(pl.lit("both").alias("user_domains"))
    splits = {
        "train": sequences.with_columns(
            pl.col("sequence").list.head(pl.col("sequence").list.len() - 2),
            pl.col("timestamps").list.head(pl.col("timestamps").list.len() - 2),
        ),
        "valid": sequences.with_columns(
            pl.col("sequence").list.head(pl.col("sequence").list.len() - 1),
            pl.col("timestamps").list.head(pl.col("timestamps").list.len() - 1),
        ),
        "test": sequences,
    }
    return items, splits, rounds


# -- statistics ------------------------------------------------------------------


def split_statistics(sequences_dir: Path, *, protocol: str, notes: list[str] | None = None) -> dict:
    """The papers' Table 1 for one scenario: items per domain, train size, valid/test per target domain.

    ``avg_length`` is the mean number of items per sequence over every sequence of
    every split present (evaluation sequences include their target).
    """
    sequences_dir = Path(sequences_dir)
    domains = json.loads((sequences_dir / DOMAINS_FILE).read_text())
    frames = {split: pl.read_parquet(sequences_dir / split_file(split)) for split in schema.SPLITS}
    lengths = pl.concat([f.select(pl.col("sequence").list.len().alias("n")) for f in frames.values()])
    train = frames["train"]
    n_a = domains["A"]["num_items"]
    train_examples = (
        train.select(pl.col("sequence").list.slice(1).alias("targets"))
        .explode("targets")
        .drop_nulls()
        .select((pl.col("targets") < n_a).alias("is_a"))
    )
    stats = {
        "dataset": domains["dataset"],
        "protocol": protocol,
        "train": train.height if train.height else None,
        "train_by_user_domains": dict(train.group_by("user_domains").len().sort("user_domains").iter_rows()),
        "avg_length": round(float(lengths["n"].mean()), 2) if lengths.height else None,
        "domains": {},
        "notes": list(notes or []),
    }
    for letter in ("A", "B"):
        counts = {"name": domains[letter]["name"], "items": domains[letter]["num_items"]}
        for split in ("valid", "test"):
            counts[split] = int((frames[split]["target_domain"] == letter).sum())
        is_a = train_examples["is_a"]
        counts["train_examples"] = int(is_a.sum() if letter == "A" else (~is_a).sum())
        stats["domains"][letter] = counts
    return stats


def format_statistics(stats: dict) -> str:
    """Table 1 as plain text: one row per domain, the scenario's train size on the first."""
    train = f"{stats['train']:,}" if stats["train"] is not None else "absent"
    header = f"{'Domain':<10}{'#Items':>10}{'#Train':>10}{'#Valid':>9}{'#Test':>9}{'Avg.length':>12}"
    lines = [f"Dataset: {stats['dataset']}  ({stats['protocol']})", header, "-" * len(header)]
    avg = f"{stats['avg_length']:.2f}" if stats["avg_length"] is not None else "-"
    for index, letter in enumerate(("A", "B")):
        d = stats["domains"][letter]
        lines.append(
            f"{d['name']:<10}{d['items']:>10,}{(train if index == 0 else ''):>10}"
            f"{d['valid']:>9,}{d['test']:>9,}{(avg if index == 0 else ''):>12}"
        )
    by_group = stats.get("train_by_user_domains") or {}
    if len(by_group) > 1 or (by_group and "both" not in by_group):
        parts = ", ".join(f"{k}: {v:,}" for k, v in by_group.items())
        lines.append(f"train sequences by users' domains: {parts}")
    if stats["train"] is not None:
        lines.append(
            "train next-item examples by target domain: "
            + ", ".join(f"{stats['domains'][x]['name']} {stats['domains'][x]['train_examples']:,}" for x in ("A", "B"))
        )
    lines.extend(f"note: {note}" for note in stats.get("notes", []))
    return "\n".join(lines)
