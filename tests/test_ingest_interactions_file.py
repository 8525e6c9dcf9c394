"""The generic interactions file (CSV or Parquet) with its optional items file."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdsr_pipeline.data import schema
from cdsr_pipeline.data.ingest import INTERACTIONS_FILE, ITEMS_FILE, QUARANTINE_FILE, SourceError
from cdsr_pipeline.data.readers.interactions_file import ingest_interactions_file


def read(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name).to_pylist()


def quarantine(out: Path) -> list[tuple[str, int, str]]:
    return [(Path(r["source_file"]).name, r["line"], r["reason"]) for r in read(out, QUARANTINE_FILE)]


def test_csv_with_items_file(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_text(
        "user,item,domain,timestamp,rating\n"
        "u1,i1,Food,1400000000,5\n"
        "u1,k1,Kitchen,2015-03-01T12:30:00Z,4\n"
        "u2,i1,Food,2015-03-01,3\n"
        'u2,"k,2",Kitchen,2015-03-01 14:30:00+02:00,1\n'
        "u3,i2,Food,1400000000.9,2\n"
    )
    (tmp_path / "items.csv").write_text(
        "item,domain,title,description,image\n"
        'i1,Food,"Tea, ""green""",  Loose leaf  ,img/i1.jpg\n'
        "k1,Kitchen,Pan,,https://example.org/k1.jpg\n"
        "k9,Kitchen,Unused,,\n"
    )
    out = tmp_path / "out"
    report = ingest_interactions_file(tmp_path / "interactions.csv", tmp_path / "items.csv", out, None)

    assert report.domain_names == ("Food", "Kitchen")
    assert "domain names taken from the file (sorted): A = Food, B = Kitchen" in report.notes
    assert pq.read_schema(out / INTERACTIONS_FILE) == schema.INTERACTIONS
    assert pq.read_schema(out / ITEMS_FILE) == schema.SOURCE_ITEMS
    assert [(r["user"], r["item"], r["domain"], r["timestamp"]) for r in read(out, INTERACTIONS_FILE)] == [
        ("u1", "i1", "A", 1400000000),
        ("u1", "k1", "B", 1425213000),
        ("u2", "i1", "A", 1425168000),  # a date: midnight UTC
        ("u2", "k,2", "B", 1425213000),  # the offset is applied
        ("u3", "i2", "A", 1400000000),  # decimal seconds are floored
    ]
    items = {(r["domain"], r["item"]): r for r in read(out, ITEMS_FILE)}
    assert sorted(items) == [("A", "i1"), ("A", "i2"), ("B", "k,2"), ("B", "k1")]
    assert items["A", "i1"]["title"] == 'Tea, "green"' and items["A", "i1"]["description"] == "Loose leaf"
    assert items["A", "i1"]["image_ref"] == (tmp_path / "img" / "i1.jpg").resolve().as_posix()
    assert items["B", "k1"]["image_ref"] == "https://example.org/k1.jpg" and items["B", "k1"]["description"] is None
    assert items["A", "i2"]["title"] is None
    assert report.quarantined == {}
    assert "1 items-file rows of domain B describe items without interactions (ignored)" in report.notes


def test_parquet_with_typed_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "user": pa.array([7, 7, 8], pa.int64()),
            "item": ["a", "b", "a"],
            "domain": ["Books", "Movies", "Books"],
            "timestamp": pa.array([dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 2), None], pa.timestamp("s")),
        }
    )
    pq.write_table(table, tmp_path / "log.parquet")
    pq.write_table(pa.table({"item": ["a"], "domain": ["Books"]}), tmp_path / "items.parquet")
    out = tmp_path / "out"
    report = ingest_interactions_file(tmp_path / "log.parquet", tmp_path / "items.parquet", out, ("Movies", "Books"))

    assert [(r["user"], r["item"], r["domain"], r["timestamp"]) for r in read(out, INTERACTIONS_FILE)] == [
        ("7", "a", "B", 1577836800),
        ("7", "b", "A", 1577923200),
    ]
    assert quarantine(out) == [("log.parquet", 3, "missing_field:timestamp")]  # Parquet: the row number
    assert "items file has no title, description, image column: none for any item" in report.notes


def test_bad_rows_with_exact_line_numbers(tmp_path: Path) -> None:
    lines = [
        b"user,item,domain,timestamp",  # 1
        b"u1,i1,Food,100",  # 2
        b"",  # 3: skipped by the CSV reader, still counted
        b'u2,"i,3",Kitchen',  # 4: too few fields
        b"u3,i4,Kitchen,300,extra",  # 5: too many fields
        b"u4,i5,Kitch\xffen,400",  # 6: invalid UTF-8
        b"u5,i6,Toys,500",  # 7
        b"u1,i1,Food,100",  # 8: duplicate of line 2
        b"u6,,Food,600",  # 9
        b"u7,i7,Food,yesterday",  # 10
        b"u8,i8,,700",  # 11
        b"u9,i9,Kitchen,",  # 12
        b"u1,i1,Kitchen,100",  # 13: same ids in the other domain: not a duplicate
    ]
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    out = tmp_path / "out"
    report = ingest_interactions_file(path, None, out, ("Food", "Kitchen"))

    assert quarantine(out) == [
        ("log.csv.gz", 4, "malformed_row"),
        ("log.csv.gz", 5, "malformed_row"),
        ("log.csv.gz", 6, "bad_encoding"),
        ("log.csv.gz", 7, "unknown_domain"),
        ("log.csv.gz", 8, "duplicate_interaction"),
        ("log.csv.gz", 9, "missing_field:item"),
        ("log.csv.gz", 10, "bad_timestamp"),
        ("log.csv.gz", 11, "missing_field:domain"),
        ("log.csv.gz", 12, "missing_field:timestamp"),
    ]
    raw = {r["line"]: r["raw"] for r in read(out, QUARANTINE_FILE)}
    assert raw[5] == "u3,i4,Kitchen,300,extra"
    assert raw[7] == '{"user":"u5","item":"i6","domain":"Toys","timestamp":"500"}'
    assert [(r["user"], r["domain"]) for r in read(out, INTERACTIONS_FILE)] == [("u1", "A"), ("u1", "B")]
    assert report.lines_read == 11  # the data rows, the blank line aside
    assert "1 blank lines of " + str(path) + " skipped" in report.notes
    assert "no items file: items have no title, description or image" in report.notes


@pytest.mark.parametrize("compressed", [False, True])
def test_a_line_with_an_unbalanced_quote_is_quarantined_and_the_rest_is_read(tmp_path: Path, compressed: bool) -> None:
    lines = [
        b"user,item,domain,timestamp",  # 1
        b"u1,i1,Food,1",  # 2
        b'u0,"multi',  # 3: a quoted field over two lines: one good record
        b'line",Food,2',  # 4
        b'"unterminated,i3,Food,4',  # 5: its quote runs to line 7's quote
        b"u2,i2,Kitchen,5",  # 6
        b'u3,"i4",Kitchen,6',  # 7
        b"u4,i5,Food,7",  # 8
        b'u5,"i6,Food,8',  # 9: its quote runs to the end of the file
        b"u6,i7,Kitchen,9",  # 10
        b"u7,i8,Kitchen,10",  # 11
    ]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("log.csv.gz" if compressed else "log.csv")
    path.write_bytes(gzip.compress(data) if compressed else data)
    out = tmp_path / "out"
    report = ingest_interactions_file(path, None, out, ("Food", "Kitchen"))
    assert quarantine(out) == [(path.name, 5, "unbalanced_quote"), (path.name, 9, "unbalanced_quote")]
    raw = {r["line"]: r["raw"] for r in read(out, QUARANTINE_FILE)}
    assert raw == {5: '"unterminated,i3,Food,4', 9: 'u5,"i6,Food,8'}
    kept = [(r["user"], r["item"]) for r in read(out, INTERACTIONS_FILE)]
    assert kept == [("u1", "i1"), ("u0", "multi\nline"), ("u2", "i2"), ("u3", "i4"), ("u4", "i5"), ("u6", "i7"), ("u7", "i8")]
    assert report.lines_read == 9  # records: the two-line one counts once
    assert not any("blank lines" in note for note in report.notes)


def test_a_csv_without_a_header_line_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("")
    with pytest.raises(SourceError, match=r"log.csv: no header line"):
        ingest_interactions_file(path, None, tmp_path / "out", None)


def test_domain_values(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user,item,domain,timestamp\nu1,a,Food,1\nu1,b,Kitchen,2\nu1,c,Toys,3\n")
    with pytest.raises(SourceError) as error:
        ingest_interactions_file(path, None, tmp_path / "out", None)
    assert (
        str(error.value)
        == f"{path}: expected exactly two domain values, found 3 ('Food', 'Kitchen', 'Toys'); pass the domain names"
    )
    report = ingest_interactions_file(path, None, tmp_path / "out", ("Kitchen", "Food"))
    assert report.quarantined == {"unknown_domain": 1}
    assert [(r["item"], r["domain"]) for r in read(tmp_path / "out", INTERACTIONS_FILE)] == [("a", "B"), ("b", "A")]


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as error:
        ingest_interactions_file(tmp_path / "absent.csv", None, tmp_path / "out", None)
    assert str(error.value) == f"interactions file not found: {tmp_path / 'absent.csv'}"
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(SourceError, match="unknown format .*log.json"):
        ingest_interactions_file(tmp_path / "log.json", None, tmp_path / "out", None)
    (tmp_path / "log.csv").write_text("user,item,when\nu1,a,1\n")
    with pytest.raises(
        SourceError, match=r"log.csv: missing column\(s\) domain, timestamp \(found: user, item, when\)"
    ):
        ingest_interactions_file(tmp_path / "log.csv", None, tmp_path / "out", None)


def test_items_file_duplicates_and_unknown_domains(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("user,item,domain,timestamp\nu1,a,Food,1\nu1,b,Kitchen,2\n")
    (tmp_path / "items.csv").write_text("item,domain,title\na,Food,First\na,Food,Second\nb,Toys,Elsewhere\n,Food,x\n")
    out = tmp_path / "out"
    report = ingest_interactions_file(tmp_path / "log.csv", tmp_path / "items.csv", out, ("Food", "Kitchen"))
    items = {(r["domain"], r["item"]): r["title"] for r in read(out, ITEMS_FILE)}
    assert items == {("A", "a"): "First", ("B", "b"): None}
    assert quarantine(out) == [
        ("items.csv", 3, "duplicate_item"),
        ("items.csv", 4, "unknown_domain"),
        ("items.csv", 5, "missing_field:item"),
    ]
    assert "1 items of domain B have no items-file row (kept without text)" in report.notes
