"""Cut the bundled demo sample from the LLMCDSR Food-Kitchen release.

Source: ``../shared/data/llmcdsr-food-kitchen`` (Amazon Grocery & Gourmet Food and
Home & Kitchen, from the LLMCDSR release, xhran2010/LLMCDSR). The sample keeps the
release's format (``num.txt``, ``items.tsv``, ``train_overlap.txt``, ``train_A.txt``,
``train_B.txt``, ``valid.txt``, ``test.txt``) so it is read by the same loader.

How it is cut (deterministic for a given ``--seed``):
1. the ``--food-items`` / ``--kitchen-items`` most frequent items of each domain over
   all splits form the item set (ties broken by id);
2. every sequence is restricted to that item set, order kept (like a k-core filter:
   the interactions are real, rare items are left out);
3. cross-domain training users keep at least 2 items per domain; valid/test rows keep
   their original target (it must be in the set) and at least one item per domain;
   single-domain training users keep at least 3 items;
4. users are sampled (seeded) up to the requested counts, and the items they use are
   renumbered contiguously, Food first, exactly as the release numbers them.

Usage: ``python scripts/make_demo_data.py [--source DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import polars as pl

from cdsr_pipeline.data.releases import ingest_llmcdsr
from cdsr_pipeline.data.sequences import build_sequences

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "llmcdsr-food-kitchen"
DEFAULT_OUT = ROOT / "cdsr_pipeline" / "demo_data" / "llmcdsr-food-kitchen-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--food-items", type=int, default=200)
    parser.add_argument("--kitchen-items", type=int, default=250)
    parser.add_argument("--train-users", type=int, default=400)
    parser.add_argument("--single-domain-users", type=int, default=60, help="per domain")
    parser.add_argument("--valid-users", type=int, default=100)
    parser.add_argument("--test-users", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ingest_llmcdsr(args.source, tmp_path / "raw")
        build_sequences(
            tmp_path / "raw", tmp_path / "seq", dataset="llmcdsr-food-kitchen", domain_names=("Food", "Kitchen")
        )
        items = pl.read_parquet(tmp_path / "seq" / "items.parquet")
        splits = {s: pl.read_parquet(tmp_path / "seq" / f"{s}.parquet") for s in ("train", "valid", "test")}

    n_a = int((items["domain"] == "A").sum())
    every = pl.concat([f.select("sequence") for f in splits.values()]).explode("sequence")
    popularity = every.group_by("sequence").len().sort(["len", "sequence"], descending=[True, False])
    keep = set(
        popularity.filter(pl.col("sequence") < n_a).head(args.food_items)["sequence"].to_list()
        + popularity.filter(pl.col("sequence") >= n_a).head(args.kitchen_items)["sequence"].to_list()
    )

    def restrict(frame: pl.DataFrame) -> pl.DataFrame:
        cut = frame.with_columns(
            pl.col("sequence").list.eval(pl.element().filter(pl.element().is_in(list(keep)))).alias("cut")
        )
        return cut.with_columns(
            pl.col("cut").list.eval((pl.element() < n_a).sum()).list.first().alias("n_a"),
            pl.col("cut").list.eval((pl.element() >= n_a).sum()).list.first().alias("n_b"),
        )

    def sample(frame: pl.DataFrame, n: int, salt: int) -> pl.DataFrame:
        return frame.sample(n=min(n, frame.height), seed=args.seed + salt).sort("user")

    train = splits["train"]
    chosen = {
        "train_overlap": sample(
            restrict(train.filter(pl.col("user_domains") == "both")).filter((pl.col("n_a") >= 2) & (pl.col("n_b") >= 2)),
            args.train_users,
            1,
        ),
        "train_A": sample(
            restrict(train.filter(pl.col("user_domains") == "A")).filter(pl.col("n_a") >= 3), args.single_domain_users, 2
        ),
        "train_B": sample(
            restrict(train.filter(pl.col("user_domains") == "B")).filter(pl.col("n_b") >= 3), args.single_domain_users, 3
        ),
    }
    for split, salt in (("valid", 4), ("test", 5)):
        rows = restrict(splits[split]).filter(
            pl.col("sequence").list.last().is_in(list(keep)) & (pl.col("n_a") >= 1) & (pl.col("n_b") >= 1)
        )
        chosen[split] = sample(rows, args.valid_users if split == "valid" else args.test_users, salt)

    used = sorted(set(pl.concat([f.select("cut") for f in chosen.values()]).explode("cut")["cut"].to_list()))
    new_id = {old: new for new, old in enumerate(used)}
    new_a = sum(1 for old in used if old < n_a)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "num.txt").write_text(f"{new_a}\n{len(used) - new_a}\n")
    by_old = {row["item_id"]: row for row in items.filter(pl.col("item_id").is_in(used)).iter_rows(named=True)}
    lines = ["domain\tlocal_id\tglobal_id\tasin\ttitle"]
    for old in used:
        gid = new_id[old]
        domain = "A" if gid < new_a else "B"
        local = gid if domain == "A" else gid - new_a
        row = by_old[old]
        lines.append(f"{domain}\t{local}\t{gid}\t{row['source_id']}\t{row['title'] or ''}")
    (out / "items.tsv").write_text("\n".join(lines) + "\n")
    for name, frame in chosen.items():
        rows = [
            f"{index}\t{','.join(str(new_id[i]) for i in seq)}"
            for index, seq in enumerate(frame["cut"].to_list(), start=1)
        ]
        (out / f"{name}.txt").write_text("\n".join(rows) + "\n")
    (out / "SOURCE.md").write_text(
        "# Demo sample: LLMCDSR Food-Kitchen\n\n"
        "Cut by `scripts/make_demo_data.py` from `llmcdsr-food-kitchen` (Amazon Grocery & Gourmet Food\n"
        "and Home & Kitchen, LLMCDSR release, xhran2010/LLMCDSR; see `../shared/data/README.md`).\n"
        f"Settings: {args.food_items} Food + {args.kitchen_items} Kitchen most frequent items, "
        f"seed {args.seed}; sequences restricted to those items, order kept.\n\n"
        f"Items: {new_a} Food + {len(used) - new_a} Kitchen. Rows: "
        + ", ".join(f"{name} {frame.height}" for name, frame in chosen.items())
        + ".\nNumbers measured on this sample are not comparable with the full release or the papers.\n"
    )
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1024:.0f} KiB): {new_a} + {len(used) - new_a} items; "
          + ", ".join(f"{name} {frame.height}" for name, frame in chosen.items()))


if __name__ == "__main__":
    main()
