"""Released benchmark splits (C2DSR, LLMCDSR): kept exactly, incomplete releases, bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from cdsr_pipeline.cli import main as cdsr
from cdsr_pipeline.data.ingest import SourceError
from cdsr_pipeline.data.readers.releases import ingest_c2dsr, ingest_llmcdsr
from cdsr_pipeline.data.sequences import build_sequences


def _build(ingest, folder: Path, tmp_path: Path, names=("Food", "Kitchen")):
    report = ingest(folder, tmp_path / "raw")
    result = build_sequences(tmp_path / "raw", tmp_path / "seq", dataset=folder.name, domain_names=names, notes=report.notes)
    return report, result


@pytest.mark.parametrize(
    "name, expected",
    [
        ("c2dsr-Food-Kitchen", {"A": (29_207, 2_722, 2_747), "B": (34_886, 5_451, 5_659)}),
        ("c2dsr-Movie-Book", {"A": (36_845, 2_032, 1_978), "B": (63_937, 5_612, 5_730)}),
    ],
)
def test_c2dsr_statistics_match_the_papers(shared_data, capsys, name, expected):
    assert cdsr(["stats", str(shared_data / name), "--format", "c2dsr", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train"] is None
    assert any("train is absent" in note for note in stats["notes"])
    for letter, (items, valid, test) in expected.items():
        domain = stats["domains"][letter]
        assert (domain["items"], domain["valid"], domain["test"]) == (items, valid, test)


def test_c2dsr_stats_table_text(shared_data, capsys):
    assert cdsr(["stats", str(shared_data / "c2dsr-Food-Kitchen"), "--format", "c2dsr"]) == 0
    out = capsys.readouterr().out
    assert "Food          29,207    absent    2,722    2,747" in out
    assert "Kitchen       34,886              5,451    5,659" in out


def test_llmcdsr_full_release_kept_exactly(shared_data, tmp_path):
    folder = shared_data / "llmcdsr-food-kitchen"
    report, result = _build(ingest_llmcdsr, folder, tmp_path)
    assert report.quarantined == {}
    stats = result.stats
    assert stats["train_by_user_domains"] == {"A": 5_472, "B": 38_191, "both": 7_501}
    assert stats["domains"]["A"]["valid"] + stats["domains"]["B"]["valid"] == 960
    assert stats["domains"]["A"]["test"] + stats["domains"]["B"]["test"] == 937
    # Sequences are exactly the released lines, in order.
    first_valid = (folder / "valid.txt").read_text().splitlines()[0].split("\t")[1]
    valid = pl.read_parquet(tmp_path / "seq" / "valid.parquet")
    assert valid["sequence"][0].to_list() == [int(x) for x in first_valid.strip(",").split(",")]
    items = pl.read_parquet(tmp_path / "seq" / "items.parquet")
    assert items.height == 36_298 and items["title"].null_count() == 0
    assert items.filter(pl.col("item_id") == 8661)["domain"].item() == "B"


def test_llmcdsr_movie_book_incomplete_release_loads_with_notes(shared_data, tmp_path):
    report, result = _build(ingest_llmcdsr, shared_data / "llmcdsr-movie-book", tmp_path, ("Movie", "Book"))
    assert any("train_B.txt absent" in note for note in report.notes)
    assert any("titles missing for 93,860 of 93,860 Book items" in note for note in report.notes)
    assert result.stats["train_by_user_domains"] == {"A": 12_185, "both": 6_652}


def test_demo_sample_loads(demo_copy, tmp_path):
    report, result = _build(ingest_llmcdsr, demo_copy, tmp_path)
    assert report.quarantined == {} and report.notes == []
    assert result.stats["train"] > 300
    assert result.stats["domains"]["A"]["test"] + result.stats["domains"]["B"]["test"] > 0


def test_missing_required_file_is_one_clear_error(demo_copy, tmp_path):
    (demo_copy / "valid.txt").unlink()
    with pytest.raises(SourceError, match=r"valid.txt.*not found: .*valid.txt"):
        ingest_llmcdsr(demo_copy, tmp_path / "raw")


def test_bad_lines_are_quarantined_with_line_numbers(demo_copy, tmp_path):
    lines = (demo_copy / "train_overlap.txt").read_text().splitlines()
    lines.insert(2, "9999\t1,2,banana")  # line 3: not an id
    lines.insert(4, "10000\t1,999999")  # line 5: id outside the item range
    lines.insert(6, "no tab here")  # line 7
    (demo_copy / "train_overlap.txt").write_text("\n".join(lines) + "\n")
    with open(demo_copy / "test.txt", "a") as handle:
        handle.write("777\t5,\n")  # one item only: no history
    report = ingest_llmcdsr(demo_copy, tmp_path / "raw")
    assert report.quarantined == {"bad_item_id": 1, "unknown_item_id": 1, "malformed_line": 1, "too_short": 1}
    quarantine = pl.read_parquet(tmp_path / "raw" / "quarantine.parquet").sort("line")
    rows = {(Path(r["source_file"]).name, r["line"], r["reason"]) for r in quarantine.iter_rows(named=True)}
    n_test = len((demo_copy / "test.txt").read_text().splitlines())
    assert rows == {
        ("train_overlap.txt", 3, "bad_item_id"),
        ("train_overlap.txt", 5, "unknown_item_id"),
        ("train_overlap.txt", 7, "malformed_line"),
        ("test.txt", n_test, "too_short"),
    }
    assert "banana" in quarantine.filter(pl.col("line") == 3)["raw"].item()


def test_single_domain_file_with_other_domain_items_is_quarantined(demo_copy, tmp_path):
    n_a = int((demo_copy / "num.txt").read_text().split()[0])
    with open(demo_copy / "train_A.txt", "a") as handle:
        handle.write(f"999\t0,1,{n_a}\n")
    report = ingest_llmcdsr(demo_copy, tmp_path / "raw")
    assert report.quarantined == {"domain_mismatch": 1}


def test_trailing_commas_are_tolerated(demo_copy, tmp_path):
    text = (demo_copy / "valid.txt").read_text().splitlines()
    (demo_copy / "valid.txt").write_text("\n".join(line + "," for line in text) + "\n")
    report = ingest_llmcdsr(demo_copy, tmp_path / "raw")
    assert report.quarantined == {}


def _tiny_c2dsr(folder: Path, with_titles: bool) -> None:
    folder.mkdir()
    (folder / "Alist.txt").write_text("10\tASIN_A0\t0\n11\tASIN_A1\t1\n12\tASIN_A2\t2\n")
    (folder / "Blist.txt").write_text("20\tASIN_B0\t0\n21\tASIN_B1\t1\n")
    (folder / "userlist.txt").write_text("REVIEWER_X\t0\nREVIEWER_Y\t1\n")
    # Items out of time order on purpose: the reader sorts each line by timestamp (stable).
    (folder / "validdata_new.txt").write_text(
        "0\t5\t3|300|d|\t0|100|d|\t1|200|d|\t2|300|d|\n"
        "1\t6\t4|50|d|\t0|10|d|\n"
    )
    (folder / "testdata_new.txt").write_text("1\t7\t1|10|d|\t3|20|d|\t4|30|d|\n0\t8\tx|1|d|\t1|2|d|\n")
    if with_titles:
        (folder / "items_with_titles.tsv").write_text(
            "domain\tlocal_id\tglobal_id\torig_id\tasin\ttitle_from_LLMCDSR\nA\t0\t0\t10\tASIN_A0\tOat  milk &amp; honey\nB\t1\t4\t21\tASIN_B1\t\n"
        )


def test_c2dsr_sorting_target_domain_and_missing_train(tmp_path):
    folder = tmp_path / "c2dsr-Tea-Pots"
    _tiny_c2dsr(folder, with_titles=True)
    report, result = _build(ingest_c2dsr, folder, tmp_path, ("Tea", "Pots"))
    assert report.quarantined == {"bad_item_id": 1}
    valid = pl.read_parquet(tmp_path / "seq" / "valid.parquet")
    # Line 1: sorted by time, ties keep file order: 0(100) 1(200) 3(300) 2(300) -> target 2 (domain A).
    assert valid["sequence"].to_list() == [[0, 1, 3, 2], [0, 4]]
    assert valid["target_domain"].to_list() == ["A", "B"]
    assert valid["user"].to_list() == ["REVIEWER_X", "REVIEWER_Y"]
    stats = result.stats
    assert stats["train"] is None
    assert (stats["domains"]["A"]["valid"], stats["domains"]["B"]["valid"]) == (1, 1)
    items = pl.read_parquet(tmp_path / "seq" / "items.parquet")
    assert items["source_id"].to_list() == ["ASIN_A0", "ASIN_A1", "ASIN_A2", "ASIN_B0", "ASIN_B1"]
    assert items["title"].to_list() == ["Oat milk & honey", None, None, None, None]  # entities decoded, spaces collapsed


def test_a_repeated_c2dsr_line_is_quarantined_not_counted_twice(tmp_path):
    folder = tmp_path / "c2dsr-Tea-Pots"
    _tiny_c2dsr(folder, with_titles=False)
    lines = (folder / "validdata_new.txt").read_text().splitlines()
    (folder / "validdata_new.txt").write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")
    report = ingest_c2dsr(folder, tmp_path / "raw")
    assert report.quarantined == {"bad_item_id": 1, "duplicate_line": 1}
    quarantine = pl.read_parquet(tmp_path / "raw" / "quarantine.parquet")
    assert quarantine.filter(pl.col("reason") == "duplicate_line")["line"].to_list() == [3]


def test_c2dsr_without_optional_files(tmp_path):
    folder = tmp_path / "c2dsr-Tea-Pots"
    _tiny_c2dsr(folder, with_titles=False)
    (folder / "userlist.txt").unlink()
    report = ingest_c2dsr(folder, tmp_path / "raw")
    notes = " | ".join(report.notes)
    assert "items_with_titles.tsv absent" in notes and "userlist.txt absent" in notes and "traindata_new.txt absent" in notes


def test_unknown_format_and_missing_path_errors(capsys, tmp_path):
    assert cdsr(["stats", str(tmp_path / "nowhere"), "--format", "llmcdsr"]) == 2
    assert "llmcdsr source not found" in capsys.readouterr().err
