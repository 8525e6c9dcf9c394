"""QueryParquetFile: several queries into one parquet file with an exact schema, atomically."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdsr_pipeline.data.ingest import QueryParquetFile, write_query_parquet

SCHEMA = pa.schema(
    [pa.field("name", pa.string(), nullable=False), pa.field("n", pa.int64()), pa.field("extra", pa.string())]
)


def test_parts_are_appended_in_order_with_the_exact_schema(tmp_path: Path) -> None:
    con = duckdb.connect()
    target = tmp_path / "out.parquet"
    with QueryParquetFile(SCHEMA, target) as out:
        assert out.write(con, "SELECT 'a' AS name, 1 AS n") == 1
        assert not target.exists()  # written in place only at the end
        assert out.write(con, "SELECT 'b' || i AS name, i AS n FROM range(3) t(i)") == 3
    assert out.rows == 4
    assert pq.read_schema(target) == SCHEMA
    assert pq.read_table(target).to_pylist() == [
        {"name": "a", "n": 1, "extra": None},
        *({"name": f"b{i}", "n": i, "extra": None} for i in range(3)),
    ]
    assert write_query_parquet(con, "SELECT 'c' AS name", SCHEMA, target) == 1
    assert pq.read_table(target)["name"].to_pylist() == ["c"]


def test_a_failure_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    con = duckdb.connect()
    target = tmp_path / "out.parquet"
    write_query_parquet(con, "SELECT 'old' AS name", SCHEMA, target)
    with pytest.raises(duckdb.Error):
        with QueryParquetFile(SCHEMA, target) as out:
            out.write(con, "SELECT 'new' AS name")
            out.write(con, "SELECT error('boom') AS name")
    with pytest.raises(ValueError, match="lacks required column"):
        with QueryParquetFile(SCHEMA, target) as out:
            out.write(con, "SELECT 1 AS n")
    assert pq.read_table(target)["name"].to_pylist() == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_atomic_writes_give_files_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    from cdsr_pipeline.storage import atomic_write_text, write_parquet_atomic

    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    expected = plain.stat().st_mode & 0o777
    atomic_write_text(tmp_path / "a.json", "{}")
    write_parquet_atomic(pa.table({"n": [1]}), tmp_path / "a.parquet")
    with QueryParquetFile(SCHEMA, tmp_path / "q.parquet") as out:
        out.write(duckdb.connect(), "SELECT 'a' AS name")
    from cdsr_pipeline.model.trainer import _save_atomic

    _save_atomic({"n": 1}, tmp_path / "checkpoint.pt")
    for name in ("a.json", "a.parquet", "q.parquet", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
