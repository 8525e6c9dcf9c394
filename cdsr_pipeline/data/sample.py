"""Cutting a small real sample out of an LLMCDSR release (the bundled demo, test fixtures).

How a sample is cut (deterministic for a given seed):

1. the ``items_a`` / ``items_b`` most frequent items of each domain over all splits
   form the item set (ties broken by id);
2. every sequence is restricted to that item set, order kept (like a k-core filter:
   the interactions are real, rare items are left out);
3. cross-domain training users keep at least 2 items per domain; valid/test rows keep
   their original target (it must be in the set) and at least one item per domain;
   single-domain training users keep at least 3 items;
4. users are sampled (seeded) up to the requested counts, and the items they use are
   renumbered contiguously, domain A first, as the release numbers them.

The sample is written in the release's own format, so the same loader reads it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .ingest import ITEMS_FILE
from .readers.releases import ingest_llmcdsr
from .sequences import build_sequences


@dataclass(frozen=True)
class SampleSize:
    items_a: int = 200
    items_b: int = 250
    train_users: int = 400
    single_domain_users: int = 60  # per domain
    valid_users: int = 100
    test_users: int = 100
    seed: int = 7


def cut_llmcdsr_sample(source: Path, out: Path, size: SampleSize = SampleSize()) -> dict[str, int]:
    """Write a sample of the LLMCDSR release ``source`` into ``out``; return its row counts."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ingest_llmcdsr(source, tmp_path / "raw")
        build_sequences(tmp_path / "raw", tmp_path / "seq", dataset=source.name, domain_names=("A", "B"))
        # Titles exactly as released (the sequences stage cleans them).
        items = pl.read_parquet(tmp_path / "raw" / ITEMS_FILE).rename({"given_id": "item_id"})
        splits = {s: pl.read_parquet(tmp_path / "seq" / f"{s}.parquet") for s in ("train", "valid", "test")}

    n_a = int((items["domain"] == "A").sum())
    every = pl.concat([f.select("sequence") for f in splits.values()]).explode("sequence")
    popularity = every.group_by("sequence").len().sort(["len", "sequence"], descending=[True, False])
    keep = (
        popularity.filter(pl.col("sequence") < n_a).head(size.items_a)["sequence"].to_list()
        + popularity.filter(pl.col("sequence") >= n_a).head(size.items_b)["sequence"].to_list()
    )

    def restrict(frame: pl.DataFrame) -> pl.DataFrame:
        cut = frame.with_columns(pl.col("sequence").list.eval(pl.element().filter(pl.element().is_in(keep))).alias("cut"))
        return cut.with_columns(
            pl.col("cut").list.eval((pl.element() < n_a).sum()).list.first().alias("n_a"),
            pl.col("cut").list.eval((pl.element() >= n_a).sum()).list.first().alias("n_b"),
        )

    def sample(frame: pl.DataFrame, n: int, salt: int) -> pl.DataFrame:
        return frame.sample(n=min(n, frame.height), seed=size.seed + salt).sort("user")

    train = splits["train"]
    chosen = {
        "train_overlap": sample(
            restrict(train.filter(pl.col("user_domains") == "both")).filter((pl.col("n_a") >= 2) & (pl.col("n_b") >= 2)),
            size.train_users,
            1,
        ),
        "train_A": sample(
            restrict(train.filter(pl.col("user_domains") == "A")).filter(pl.col("n_a") >= 3), size.single_domain_users, 2
        ),
        "train_B": sample(
            restrict(train.filter(pl.col("user_domains") == "B")).filter(pl.col("n_b") >= 3), size.single_domain_users, 3
        ),
    }
    for split, salt, wanted in (("valid", 4, size.valid_users), ("test", 5, size.test_users)):
        rows = restrict(splits[split]).filter(
            pl.col("sequence").list.last().is_in(keep) & (pl.col("n_a") >= 1) & (pl.col("n_b") >= 1)
        )
        chosen[split] = sample(rows, wanted, salt)

    used = sorted(set(pl.concat([f.select("cut") for f in chosen.values()]).explode("cut")["cut"].to_list()))
    new_id = {old: new for new, old in enumerate(used)}
    new_a = sum(1 for old in used if old < n_a)

    out.mkdir(parents=True, exist_ok=True)
    (out / "num.txt").write_text(f"{new_a}\n{len(used) - new_a}\n")
    by_old = {row["item_id"]: row for row in items.filter(pl.col("item_id").is_in(used)).iter_rows(named=True)}
    lines = ["domain\tlocal_id\tglobal_id\tasin\ttitle"]
    for old in used:
        gid = new_id[old]
        domain = "A" if gid < new_a else "B"
        row = by_old[old]
        lines.append(f"{domain}\t{gid if domain == 'A' else gid - new_a}\t{gid}\t{row['source_id']}\t{row['title'] or ''}")
    (out / "items.tsv").write_text("\n".join(lines) + "\n")
    for name, frame in chosen.items():
        rows = [f"{index}\t{','.join(str(new_id[i]) for i in seq)}" for index, seq in enumerate(frame["cut"].to_list(), 1)]
        (out / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return {"items_A": new_a, "items_B": len(used) - new_a} | {name: frame.height for name, frame in chosen.items()}
