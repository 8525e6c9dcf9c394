"""Raw Amazon dumps (2014, 2018, 2023): field mapping, quarantine with true line numbers, discovery.

Every fixture is a small gzip file written here, in the exact shape of the public dumps.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cdsr_pipeline.data import schema, staging
from cdsr_pipeline.data.readers.amazon import discover_amazon_files, ingest_amazon
from cdsr_pipeline.data.ingest import INTERACTIONS_FILE, ITEMS_FILE, QUARANTINE_FILE, SourceError

NAMES = ("Food", "Kitchen")


def write_gz(path: Path, lines: list[str | bytes]) -> Path:
    """One record per line, as the dumps are written (the last line ends with a newline)."""
    data = b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data))
    return path


def review(user: str, asin: str, time: int, /, **extra) -> str:
    """A 2014/2018 review line with the dumps' usual fields."""
    record = {"overall": 5.0, "verified": True, "reviewTime": "09 13, 2009", "reviewerID": user, "asin": asin}
    record |= {"reviewerName": "J. McDonald", "reviewText": "Tastes great", "summary": "Good", "unixReviewTime": time}
    return json.dumps(record | extra)


def read(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name).to_pylist()


def quarantine(out: Path) -> list[tuple[str, int, str]]:
    """(file name, line, reason) of every quarantined record."""
    return [(Path(r["source_file"]).name, r["line"], r["reason"]) for r in read(out, QUARANTINE_FILE)]


def test_2018_fields_items_and_order(tmp_path: Path) -> None:
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", [review("u1", "F1", 1252800000), review("u2", "F2", 1252886400)]),
        "B": write_gz(tmp_path / "Kitchen.json.gz", [review("u1", "K1", 1252800000), review("u1", "F1", 1300000000)]),
    }
    meta_a = {
        "asin": "F1",
        "title": '<span class="a">Earl Grey</span> Tea &amp; Honey',
        "description": ["Loose leaf tea.", "<b>Organic</b>"],
        "imageURL": ["https://img/F1._SS40_.jpg"],
        "imageURLHighRes": ["https://img/F1.jpg", "https://img/F1b.jpg"],
        "also_buy": ["F2"],
    }
    meta = {
        "A": write_gz(
            tmp_path / "meta_Food.json.gz", [json.dumps(meta_a), json.dumps({"asin": "UNUSED", "title": "x"})]
        ),
        "B": write_gz(
            tmp_path / "meta_Kitchen.json.gz",
            [json.dumps({"asin": "K1", "title": "Pan", "imageURL": ["https://img/K1.jpg"], "imageURLHighRes": []})],
        ),
    }
    out = tmp_path / "out"
    report = ingest_amazon("amazon2018", reviews, meta, out, NAMES)

    assert pq.read_schema(out / INTERACTIONS_FILE) == schema.INTERACTIONS
    assert pq.read_schema(out / ITEMS_FILE) == schema.SOURCE_ITEMS
    assert pq.read_schema(out / QUARANTINE_FILE) == schema.QUARANTINE
    # Source order: domain A's file, then B's, each by line.
    assert [(r["user"], r["item"], r["domain"], r["timestamp"]) for r in read(out, INTERACTIONS_FILE)] == [
        ("u1", "F1", "A", 1252800000),
        ("u2", "F2", "A", 1252886400),
        ("u1", "K1", "B", 1252800000),
        ("u1", "F1", "B", 1300000000),
    ]
    assert all(r["position"] is None and r["split"] is None and r["row"] is None for r in read(out, INTERACTIONS_FILE))
    items = {(r["domain"], r["item"]): r for r in read(out, ITEMS_FILE)}
    # F1 reviewed in both categories: one item per domain, each with its own domain's meta.
    assert sorted(items) == [("A", "F1"), ("A", "F2"), ("B", "F1"), ("B", "K1")]
    # HTML tags go; entities and spaces are normalized later, when the items table is built.
    assert items["A", "F1"]["title"] == "Earl Grey  Tea &amp; Honey"
    assert items["A", "F1"]["description"] == "Loose leaf tea.  Organic"
    assert items["A", "F1"]["image_ref"] == "https://img/F1.jpg"
    assert items["B", "K1"]["image_ref"] == "https://img/K1.jpg"  # no high-res image: the small one
    assert items["A", "F2"]["title"] is None and items["B", "F1"]["title"] is None
    assert all(r["given_id"] is None for r in items.values())
    assert report.interactions == 4 and report.items == 4 and report.lines_read == 7
    assert report.quarantined == {}
    assert "1 items of domain A have no meta record (kept without text)" in report.notes
    assert "1 meta records of domain A describe items without interactions (ignored)" in report.notes


def test_2023_milliseconds_parent_asin_and_images(tmp_path: Path) -> None:
    line = {
        "rating": 4.0,
        "title": "ok",
        "text": "fine",
        "images": [],
        "asin": "V1-red",
        "parent_asin": "P1",
        "user_id": "U1",
        "timestamp": 1588687728923,
        "helpful_vote": 0,
        "verified_purchase": True,
    }
    reviews = {
        "A": write_gz(
            tmp_path / "Grocery.jsonl.gz",
            [json.dumps(line), json.dumps(line | {"asin": "V1-blue", "timestamp": 1588687729999})],
        ),
        "B": write_gz(tmp_path / "Kitchen.jsonl.gz", [json.dumps(line | {"parent_asin": "P2"})]),
    }
    image = {"thumb": "https://t.jpg", "large": "https://l.jpg", "variant": "MAIN", "hi_res": None}
    meta_record = {
        "main_category": "Grocery",
        "title": "Tea",
        "features": ["f"],
        "description": ["Black", "tea"],
        "images": [image],
        "parent_asin": "P1",
    }
    meta = {"A": write_gz(tmp_path / "meta_Grocery.jsonl.gz", [json.dumps(meta_record)]), "B": None}
    out = tmp_path / "out"
    report = ingest_amazon("amazon2023", reviews, meta, out, ("Grocery", "Kitchen"))

    rows = read(out, INTERACTIONS_FILE)
    assert [(r["user"], r["item"], r["timestamp"]) for r in rows] == [
        ("U1", "P1", 1588687728),  # milliseconds floored to seconds
        ("U1", "P1", 1588687729),  # another variant of the same parent: the same item, another second
        ("U1", "P2", 1588687728),
    ]
    items = {(r["domain"], r["item"]): r for r in read(out, ITEMS_FILE)}
    assert items["A", "P1"]["title"] == "Tea" and items["A", "P1"]["description"] == "Black tea"
    assert items["A", "P1"]["image_ref"] == "https://l.jpg"
    assert items["B", "P2"]["title"] is None
    assert "no meta file for domain B (Kitchen): its items have no title, description or image" in report.notes


def test_2014_python_literal_meta(tmp_path: Path) -> None:
    reviews = {
        "A": write_gz(
            tmp_path / "reviews_Food.json.gz",
            [review("u1", "F1", 100), review("u1", "F2", 200), review("u1", "F3", 300)],
        ),
        "B": write_gz(tmp_path / "reviews_Kitchen.json.gz", [review("u1", "K1", 100)]),
    }
    records = [
        # str(dict) is how the 2014 meta lines were written: quotes chosen per string.
        {
            "asin": "F1",
            "title": 'Tom\'s "Best" Tea',
            "description": "It's <i>great</i>\nreally",
            "imUrl": "http://ecx.images-amazon.com/F1.jpg",
            "related": {"also_bought": ["F2", "F3"]},
            "categories": [["Grocery", "Tea"], ["Gifts"]],
            "salesRank": {"Grocery": 12},
            "price": 3.5,
        },
        {"asin": "F2", "title": "Caf\u00e9 \\ backslash", "imUrl": ""},
    ]
    meta_lines = [
        str(records[0]),
        "{'asin': 'BROKEN', 'title': 'unterminated}",
        str(records[1]),
        "{'title': 'no asin'}",
    ]
    meta = {"A": write_gz(tmp_path / "meta_Food.json.gz", meta_lines), "B": None}
    out = tmp_path / "out"
    report = ingest_amazon("amazon2014", reviews, meta, out, NAMES)

    items = {(r["domain"], r["item"]): r for r in read(out, ITEMS_FILE)}
    assert items["A", "F1"]["title"] == 'Tom\'s "Best" Tea'
    assert items["A", "F1"]["description"] == "It's  great \nreally"
    assert items["A", "F1"]["image_ref"] == "http://ecx.images-amazon.com/F1.jpg"
    assert items["A", "F2"]["title"] == "Caf\u00e9 \\ backslash" and items["A", "F2"]["image_ref"] is None
    assert items["A", "F3"]["title"] is None
    assert quarantine(out) == [
        ("meta_Food.json.gz", 2, "malformed_literal"),
        ("meta_Food.json.gz", 4, "missing_field:asin"),
    ]
    assert report.quarantined == {"malformed_literal": 1, "missing_field:asin": 1}


def test_bad_lines_are_quarantined_with_true_line_numbers(tmp_path: Path) -> None:
    lines = [
        review("u1", "F1", 100),  # 1
        b'{"reviewerID": "u9", "asin": "F9", "summary": "\xff\xfe bad bytes", "unixReviewTime": 5}',  # 2
        review("u2", "F1", 100),  # 3
        '{"reviewerID": "u3", "asin": "F1", "unixRevi',  # 4: truncated
        "",  # 5
        review("u4", "F1", 100, reviewerID=""),  # 6
        json.dumps({"reviewerID": "u5", "asin": "F1"}),  # 7
        review("u6", "F1", 0, unixReviewTime="n/a"),  # 8
        b"\xc3",  # 9: a lone lead byte
        review("u1", "F1", 100),  # 10: duplicate of line 1
        "[1, 2]",  # 11: JSON, not a record
        review("u7", "F1", 100, asin=None),  # 12
        '{"reviewerID": "u8", "asin": "F1", "unixReviewTime": 7, "summary": "\x01"}',  # 13: raw control character
        review("u2", "F1", 100, summary="again"),  # 14: duplicate of line 3 (other fields differ)
        review("u8", "F1", 400),  # 15
    ]
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", lines),
        "B": write_gz(tmp_path / "Kitchen.json.gz", [review("u1", "K1", 1)]),
    }
    out = tmp_path / "out"
    report = ingest_amazon("amazon2018", reviews, {}, out, NAMES)

    assert quarantine(out) == [
        ("Food.json.gz", 2, "bad_encoding"),
        ("Food.json.gz", 4, "malformed_json"),
        ("Food.json.gz", 5, "empty_line"),
        ("Food.json.gz", 6, "missing_field:reviewerID"),
        ("Food.json.gz", 7, "missing_field:unixReviewTime"),
        ("Food.json.gz", 8, "bad_timestamp"),
        ("Food.json.gz", 9, "bad_encoding"),
        ("Food.json.gz", 10, "duplicate_interaction"),
        ("Food.json.gz", 11, "malformed_json"),
        ("Food.json.gz", 12, "missing_field:asin"),
        ("Food.json.gz", 13, "malformed_json"),
        ("Food.json.gz", 14, "duplicate_interaction"),
    ]
    raw = {r["line"]: r["raw"] for r in read(out, QUARANTINE_FILE)}
    # A duplicate's raw text is the key it repeats.
    assert json.loads(raw[14]) == {"reviewerID": "u2", "asin": "F1", "unixReviewTime": 100}
    assert raw[4] == lines[3] and raw[5] is None
    assert "bad bytes" in raw[2]
    assert [(r["user"], r["timestamp"]) for r in read(out, INTERACTIONS_FILE) if r["domain"] == "A"] == [
        ("u1", 100),
        ("u2", 100),
        ("u8", 400),
    ]
    assert report.lines_read == 16
    assert report.quarantined["bad_encoding"] == 2 and report.quarantined["duplicate_interaction"] == 2
    assert report.quarantined_total == 12


def test_overlong_line_is_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "MAX_LINE_BYTES", 4096)
    lines = [review("u1", "F1", 1), review("u2", "F1", 2, reviewText="x" * 10_000), review("u3", "F1", 3)]
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", lines),
        "B": write_gz(tmp_path / "Kitchen.json.gz", [review("u1", "K1", 1)]),
    }
    out = tmp_path / "out"
    ingest_amazon("amazon2018", reviews, {}, out, NAMES)
    assert quarantine(out) == [("Food.json.gz", 2, "line_too_long")]
    assert [r["user"] for r in read(out, INTERACTIONS_FILE)] == ["u1", "u3", "u1"]


def test_meta_duplicates_and_page_script(tmp_path: Path) -> None:
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", [review("u1", "F1", 1), review("u1", "F2", 2)]),
        "B": write_gz(tmp_path / "Kitchen.json.gz", [review("u1", "K1", 1)]),
    }
    script = "var aPageStart = (new Date()).getTime(); var ue_t0 = ue_t0 || +new Date();"
    meta = {
        "A": write_gz(
            tmp_path / "meta_Food.json.gz",
            [
                json.dumps({"asin": "F1", "title": "Green tea"}),
                json.dumps({"asin": "F2", "title": script, "description": ["Fine <b>coffee</b>"]}),
                json.dumps({"asin": "F1", "title": "Green tea (again)"}),
                json.dumps({"asin": "UNUSED", "title": "a"}),
                json.dumps({"asin": "UNUSED", "title": "a"}),  # duplicates of unused items do not matter
            ],
        )
    }
    out = tmp_path / "out"
    ingest_amazon("amazon2018", reviews, meta, out, NAMES)
    items = {(r["domain"], r["item"]): r for r in read(out, ITEMS_FILE)}
    assert items["A", "F1"]["title"] == "Green tea"  # the first record wins
    assert items["A", "F2"]["title"] is None and items["A", "F2"]["description"] == "Fine  coffee"
    assert quarantine(out) == [("meta_Food.json.gz", 2, "bad_title"), ("meta_Food.json.gz", 3, "duplicate_item")]
    raw = {r["reason"]: r["raw"] for r in read(out, QUARANTINE_FILE)}
    assert raw["bad_title"] == script
    assert json.loads(raw["duplicate_item"]) == {"asin": "F1", "title": "Green tea (again)"}


def test_missing_file_and_unknown_version(tmp_path: Path) -> None:
    present = write_gz(tmp_path / "Food.json.gz", [review("u1", "F1", 1)])
    missing = tmp_path / "nowhere" / "Kitchen.json.gz"
    with pytest.raises(SourceError) as error:
        ingest_amazon("amazon2018", {"A": present, "B": missing}, {}, tmp_path / "out", NAMES)
    assert str(error.value) == f"amazon2018 reviews (domain B) not found: {missing}"
    with pytest.raises(SourceError, match="unknown Amazon format 'amazon2020'"):
        ingest_amazon("amazon2020", {"A": present, "B": present}, {}, tmp_path / "out", NAMES)


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_discovery_by_standard_names(tmp_path: Path) -> None:
    touch(
        tmp_path / "y2014", "reviews_Grocery.json.gz", "reviews_Kitchen_5.json.gz", "meta_Grocery.json.gz", "notes.txt"
    )
    reviews, meta, names = discover_amazon_files("amazon2014", tmp_path / "y2014", None)
    assert names == ("Grocery", "Kitchen")
    assert {d: p.name for d, p in reviews.items()} == {"A": "reviews_Grocery.json.gz", "B": "reviews_Kitchen_5.json.gz"}
    assert meta["A"].name == "meta_Grocery.json.gz" and meta["B"] is None

    # 2018: meta files and 5-core names are not categories; the full dump wins over the 5-core.
    touch(tmp_path / "y2018", "Toys.json.gz", "Toys_5.json.gz", "meta_Toys.json.gz", "Books.json", "meta_Books.json.gz")
    reviews, meta, names = discover_amazon_files("amazon2018", tmp_path / "y2018", None)
    assert names == ("Books", "Toys")  # sorted
    assert reviews["A"].name == "Books.json" and reviews["B"].name == "Toys.json.gz"
    assert meta["B"].name == "meta_Toys.json.gz"
    reviews, meta, names = discover_amazon_files("amazon2018", tmp_path / "y2018", ("Toys", "Books"))
    assert names == ("Toys", "Books") and reviews["A"].name == "Toys.json.gz"

    touch(
        tmp_path / "y2023",
        "All_Beauty.jsonl.gz",
        "meta_All_Beauty.jsonl.gz",
        "Baby_Products.jsonl",
        "meta_Baby_Products.jsonl",
    )
    reviews, meta, names = discover_amazon_files("amazon2023", tmp_path / "y2023", None)
    assert names == ("All_Beauty", "Baby_Products")
    assert meta["B"].name == "meta_Baby_Products.jsonl"


def test_discovery_errors(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    touch(folder, "Toys.json.gz", "Books.json.gz", "Music.json.gz", "meta_Toys.json.gz")
    with pytest.raises(SourceError) as error:
        discover_amazon_files("amazon2018", folder, None)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message
    assert "found 3 (Books, Music, Toys)" in message and "pass the two categories" in message

    with pytest.raises(SourceError, match="found 0 \\(none\\)"):
        discover_amazon_files("amazon2023", folder, None)  # 2023 names end in .jsonl.gz
    with pytest.raises(SourceError, match="no amazon2018 reviews for category 'Games'"):
        discover_amazon_files("amazon2018", folder, ("Toys", "Games"))
    with pytest.raises(SourceError, match="folder not found"):
        discover_amazon_files("amazon2018", tmp_path / "absent", None)


def test_meta_lines_that_are_not_records_and_text_edges(tmp_path: Path) -> None:
    """2018 meta: valid JSON that is not an object is malformed, an object without asin
    misses a field; titles lose tags and the spaces ``trim`` removes (Unicode ones too)."""
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", [review("u1", f"F{i}", i) for i in range(1, 6)]),
        "B": write_gz(tmp_path / "Kitchen.json.gz", [review("u1", "K1", 1)]),
    }
    meta_lines = [
        "[1, 2]",  # 1: JSON, not a record
        json.dumps({"title": "no asin"}),  # 2
        '  {"asin": "F1", "title": "\\u3000Green tea\\u00a0"}',  # 3: leading blanks before the object
        json.dumps({"asin": "F2", "title": "<b></b>", "description": ["<p>", "</p>"]}),  # 4: only tags
        json.dumps({"asin": "F3", "title": " <i>Mint</i>  tea\n"}),  # 5: trim keeps the newline
        '"just a string"',  # 6
        json.dumps({"asin": "F4", "title": "a < b and c > d"}),  # 7: not a tag
        json.dumps({"asin": "", "title": "empty asin"}),  # 8
    ]
    meta = {"A": write_gz(tmp_path / "meta_Food.json.gz", meta_lines)}
    out = tmp_path / "out"
    ingest_amazon("amazon2018", reviews, meta, out, NAMES)
    assert quarantine(out) == [
        ("meta_Food.json.gz", 1, "malformed_json"),
        ("meta_Food.json.gz", 2, "missing_field:asin"),
        ("meta_Food.json.gz", 6, "malformed_json"),
        ("meta_Food.json.gz", 8, "missing_field:asin"),
    ]
    items = {(r["domain"], r["item"]): r for r in read(out, ITEMS_FILE)}
    assert items["A", "F1"]["title"] == "Green tea"
    assert items["A", "F2"]["title"] is None and items["A", "F2"]["description"] is None
    assert items["A", "F3"]["title"] == "Mint   tea\n"
    assert items["A", "F4"]["title"] == "a < b and c > d"


def test_duplicates_only_within_a_domain_and_first_kept(tmp_path: Path) -> None:
    lines_a = [review("u1", "X", 5), review("u1", "X", 5), review("u1", "X", 6), review("u1", "X", 5)]
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", lines_a),
        "B": write_gz(tmp_path / "Kitchen.json.gz", [review("u1", "X", 5)]),  # same key, other domain: kept
    }
    out = tmp_path / "out"
    report = ingest_amazon("amazon2018", reviews, {}, out, NAMES)
    assert quarantine(out) == [
        ("Food.json.gz", 2, "duplicate_interaction"),
        ("Food.json.gz", 4, "duplicate_interaction"),
    ]
    assert [(r["domain"], r["timestamp"]) for r in read(out, INTERACTIONS_FILE)] == [("A", 5), ("A", 6), ("B", 5)]
    assert report.interactions == 3 and set(report.timings) >= {"stage reviews_A", "stage reviews_B", "items"}


def test_an_unreadable_file_is_an_error_and_leaves_no_output(tmp_path: Path) -> None:
    reviews = {
        "A": write_gz(tmp_path / "Food.json.gz", [review("u1", "F1", 1)]),
        "B": tmp_path / "Kitchen.json.gz",
    }
    reviews["B"].write_bytes(gzip.compress(b'{"reviewerID": "u1"}\n')[:-12])  # truncated gzip stream
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=f"^{re.escape(str(reviews['B']))}: unreadable .*end-of-stream"):
        ingest_amazon("amazon2018", reviews, {}, out, NAMES)
    assert not list(out.iterdir())  # no output, no temporary file
