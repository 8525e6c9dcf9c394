"""Raw sources: iterative filtering, global ids (domain A first), leave-last-two-out split, checks."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cdsr_pipeline.data.readers.interactions_file import ingest_interactions_file
from cdsr_pipeline.data.sequences import FilterConfig, build_sequences
from cdsr_pipeline.data.validation import check_contiguous_ids, check_minimums, check_no_leakage

CONFIG = FilterConfig(min_user_interactions=6, min_item_interactions=2, min_items_per_domain=2)


def _write(tmp_path: Path, rows: list[tuple[str, str, str, int]]) -> Path:
    path = tmp_path / "interactions.csv"
    lines = ["user,item,domain,timestamp"] + [f"{u},{i},{d},{t}" for u, i, d, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _user(name: str, a_items: list[str], b_items: list[str], start: int) -> list[tuple[str, str, str, int]]:
    """Interleaved history: A, B, A, B, ... one day apart."""
    rows, t = [], start
    for index in range(max(len(a_items), len(b_items))):
        for items, domain in ((a_items, "Tea"), (b_items, "Pots")):
            if index < len(items):
                rows.append((name, items[index], domain, t))
                t += 86_400
    return rows


@pytest.fixture
def built(tmp_path):
    rows = (
        _user("u1", ["a1", "a2", "a3"], ["b1", "b2", "b3"], 1_000_000)
        + _user("u2", ["a1", "a2", "a3"], ["b1", "b2", "b3"], 2_000_000)
        + _user("u3", ["a2", "a3", "a1"], ["b2", "b3", "b1"], 3_000_000)
        # u4 only has 1 item of domain B: dropped (min 2 per domain).
        + _user("u4", ["a1", "a2", "a3", "a4", "a5"], ["b1"], 4_000_000)
        # u5's second B item is unique to u5 (dropped: min 2 per item); that leaves u5 with
        # one B item, so u5 goes too, in the second round.
        + _user("u5", ["a1", "a2", "a3"], ["b1", "b_rare"], 5_000_000)
        # u6 has an A item (a4) shared only with u4: once u4 is gone, a4 falls below 2,
        # and u6 falls to 5 interactions < 6: a third round.
        + _user("u6", ["a1", "a2", "a4"], ["b1", "b2", "b3"], 6_000_000)
    )
    source = _write(tmp_path, rows)
    report = ingest_interactions_file(source, None, tmp_path / "raw", ("Tea", "Pots"))
    result = build_sequences(tmp_path / "raw", tmp_path / "seq", dataset="tea-pots", domain_names=("Tea", "Pots"), config=CONFIG)
    return tmp_path / "seq", result, report


def test_iterative_filter_reaches_a_fixpoint(built):
    folder, result, _ = built
    test = pl.read_parquet(folder / "test.parquet")
    assert test["user"].to_list() == ["u1", "u2", "u3"]
    assert result.filter_rounds >= 3


def test_ids_domain_a_first_sorted_by_source_id(built):
    folder, _, _ = built
    items = pl.read_parquet(folder / "items.parquet")
    assert items.select("item_id", "domain", "source_id").rows() == [
        (0, "A", "a1"), (1, "A", "a2"), (2, "A", "a3"), (3, "B", "b1"), (4, "B", "b2"), (5, "B", "b3"),
    ]
    assert items["domain_name"].to_list() == ["Tea"] * 3 + ["Pots"] * 3


def test_leave_last_two_out_split(built):
    folder, result, _ = built
    splits = {s: pl.read_parquet(folder / f"{s}.parquet").sort("user") for s in ("train", "valid", "test")}
    # u3: a2 b2 a3 b3 a1 b1 -> ids 1 4 2 5 0 3
    u3 = {s: f.filter(pl.col("user") == "u3")["sequence"].item().to_list() for s, f in splits.items()}
    assert u3 == {"train": [1, 4, 2, 5], "valid": [1, 4, 2, 5, 0], "test": [1, 4, 2, 5, 0, 3]}
    assert splits["valid"]["target_domain"].to_list() == ["A", "A", "A"]
    assert splits["test"]["target_domain"].to_list() == ["B", "B", "B"]
    assert splits["train"]["target_domain"].null_count() == 3
    stats = result.stats
    assert stats["train"] == 3 and stats["domains"]["A"]["valid"] == 3 and stats["domains"]["B"]["test"] == 3
    assert stats["protocol"].startswith("leave-last-two-out")


def test_checks_pass_on_clean_output(built):
    folder, _, _ = built
    assert check_contiguous_ids(folder).passed
    assert check_no_leakage(folder).passed
    assert check_minimums(folder, CONFIG, released=False).passed


def test_leakage_check_names_the_offending_user(built):
    folder, _, _ = built
    valid = pl.read_parquet(folder / "valid.parquet")
    # Move u2's validation target before the end of u2's training data.
    tampered = valid.with_columns(
        pl.when(pl.col("user") == "u2")
        .then(pl.col("timestamps").list.head(4).list.concat(pl.lit([1], dtype=pl.List(pl.Int64))))
        .otherwise(pl.col("timestamps"))
        .alias("timestamps")
    )
    tampered.write_parquet(folder / "valid.parquet")
    outcome = check_no_leakage(folder)
    assert not outcome.passed
    assert "u2" in " ".join(outcome.details["problems"])


def test_minimums_check_catches_a_short_user(built):
    folder, _, _ = built
    stricter = FilterConfig(min_user_interactions=7, min_item_interactions=2, min_items_per_domain=2)
    outcome = check_minimums(folder, stricter, released=False)
    assert not outcome.passed and "users below the minimums" in outcome.details["problems"][0]


def test_ties_keep_source_order(tmp_path):
    rows = []
    for user in ("u1", "u2"):
        # All on the same day: the file order decides.
        rows += [(user, "a2", "Tea", 5), (user, "b1", "Pots", 5), (user, "a1", "Tea", 5), (user, "b2", "Pots", 5)]
    source = _write(tmp_path, rows)
    ingest_interactions_file(source, None, tmp_path / "raw", ("Tea", "Pots"))
    config = FilterConfig(min_user_interactions=1, min_item_interactions=1, min_items_per_domain=1)
    build_sequences(tmp_path / "raw", tmp_path / "seq", dataset="t", domain_names=("Tea", "Pots"), config=config)
    test = pl.read_parquet(tmp_path / "seq" / "test.parquet")
    assert test["sequence"].to_list() == [[1, 2, 0, 3], [1, 2, 0, 3]]


def test_nobody_survives_gives_empty_splits_with_a_note(tmp_path):
    source = _write(tmp_path, [("u1", "a1", "Tea", 1), ("u1", "b1", "Pots", 2)])
    ingest_interactions_file(source, None, tmp_path / "raw", ("Tea", "Pots"))
    result = build_sequences(tmp_path / "raw", tmp_path / "seq", dataset="t", domain_names=("Tea", "Pots"))
    assert result.stats["train"] is None
    assert any("no user meets the filtering thresholds" in note for note in result.notes)


def test_item_text_cleaning_decodes_entities_and_collapses_whitespace():
    from cdsr_pipeline.data.sequences import _clean_item_texts

    items = pl.DataFrame(
        {
            "title": ["Oat &amp; honey", "  a\u00a0 b\tc  ", None, "   ", "plain title"],
            "description": ["&lt;b&gt;bold&lt;/b&gt;", "x\n\ny", None, None, "one  two"],
        }
    )
    cleaned = _clean_item_texts(items)
    assert cleaned["title"].to_list() == ["Oat & honey", "a b c", None, None, "plain title"]
    assert cleaned["description"].to_list() == ["<b>bold</b>", "x y", None, None, "one two"]
