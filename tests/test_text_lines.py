"""The line reader of the Amazon dumps (``staging.TextLines``): every line one row, in
file order, with its true index, however the file falls into chunks."""

from __future__ import annotations

import gzip
from pathlib import Path

import duckdb
import pytest

from cdsr_pipeline.data import staging
from cdsr_pipeline.data.ingest import SourceError
from cdsr_pipeline.data.staging import LineReject, TextLines


def rows(path: Path, chunk_bytes: int) -> tuple[list[tuple[int, str | None]], list[LineReject]]:
    lines = TextLines(path, chunk_bytes=chunk_bytes)
    con = duckdb.connect()
    with lines.registered(con, "chunks") as relation:
        result = con.execute(f"SELECT idx, line FROM ({lines.rows_sql(relation)})").fetchall()
    return result, lines.rejected


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


TEXT = "\ufeff" + "first\r\nsecond line, longer than a chunk\n\n\u00e9t\u00e9 caf\u00e9\nx\r\n\r\nlast, no newline"
EXPECTED = [
    (0, "first"),
    (1, "second line, longer than a chunk"),
    (2, None),
    (3, "\u00e9t\u00e9 caf\u00e9"),
    (4, "x"),
    (5, None),
    (6, "last, no newline"),
]


@pytest.mark.parametrize("name", ["lines.txt", "lines.txt.gz"])
@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64, 1 << 20])
def test_every_line_is_one_row_in_order(tmp_path: Path, name: str, chunk_bytes: int) -> None:
    path = write(tmp_path / name, TEXT.encode())
    assert rows(path, chunk_bytes) == (EXPECTED, [])


def test_many_chunks_keep_file_order(tmp_path: Path) -> None:
    lines = [f'{{"n": {i}, "text": "{"x" * (i % 97)}"}}' for i in range(20_000)]
    path = write(tmp_path / "many.json.gz", ("\n".join(lines) + "\n").encode())
    result, rejected = rows(path, 4096)  # hundreds of batches, read by several DuckDB threads
    assert rejected == [] and result == list(enumerate(lines))


def test_undecodable_lines_arrive_empty_and_are_listed(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json.gz", b"ok 1\nbad \xff\xfe here\nok 3\n\xc3\nok 5")
    result, rejected = rows(path, 8)
    assert result == [(0, "ok 1"), (1, None), (2, "ok 3"), (3, None), (4, "ok 5")]
    assert rejected == [
        LineReject(2, "bad_encoding", "bad \ufffd\ufffd here"),
        LineReject(4, "bad_encoding", "\ufffd"),
    ]


def test_a_line_longer_than_the_limit_is_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "MAX_LINE_BYTES", 100)
    long_line = "L" * 1000
    for ending in ("\nafter\n", ""):  # the long line in the middle, and last without a newline
        path = write(tmp_path / "long.txt.gz", f"before\n{long_line}{ending}".encode())
        result, rejected = rows(path, 16)
        assert result[:2] == [(0, "before"), (1, None)]
        assert result[2:] == ([(2, "after")] if ending else [])
        # raw: what the reader held when it gave up on the line (more than the limit, at most a chunk more)
        assert [(r.line, r.reason, set(r.raw)) for r in rejected] == [(2, "line_too_long", {"L"})]
        assert 100 < len(rejected[0].raw) <= 100 + 16


def test_empty_file_has_no_rows(tmp_path: Path) -> None:
    assert rows(write(tmp_path / "empty.json.gz", b""), 64) == ([], [])
    assert rows(write(tmp_path / "empty.json", b""), 64) == ([], [])


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.json.gz"
    path.write_bytes(gzip.compress(b"a line\n" * 1000)[:-30])
    with pytest.raises(SourceError, match=f"^{path}: unreadable"):
        rows(path, 64)
