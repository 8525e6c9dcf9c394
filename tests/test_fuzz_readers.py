"""Property-based fuzzing of the raw readers (hypothesis): corrupted lines never sink a file.

Formats: the interactions CSV, the Amazon 2014, 2018 and 2023 review JSON lines, the
LLMCDSR and C2DSR sequence files (Parquet has no lines to corrupt). Each example takes
valid lines of one raw format, corrupts some of them (truncation,
byte flips, invalid UTF-8, a missing field, a wrong type, a duplicated line) and checks
the readers' contract:

- no crash: the reader returns (only an unreadable file as a whole may be refused);
- every record read is either kept or quarantined with a reason (counts add up);
- the untouched lines give the same rows, in the same order, as a file holding only
  them; each corrupted line adds at most one row;
- (line-exact formats) every quarantined line number is a corrupted line's.

The examples are derandomized, so CI runs the same cases every time;
``scripts/fault_campaign.py --fuzz-examples N`` runs more of them.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdsr_pipeline.data.readers.amazon import ingest_amazon
from cdsr_pipeline.data.ingest import INTERACTIONS_FILE, QUARANTINE_FILE, IngestReport
from cdsr_pipeline.data.readers.interactions_file import ingest_interactions_file

N_LINES = 12
NAMES = ("Food", "Kitchen")
EXAMPLES = int(os.environ.get("CDSR_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CORRUPTIONS = ("truncate", "flip", "bad_utf8", "missing_field", "wrong_type", "duplicate")

# (line index, corruption, a number that picks the position / byte)
corruption_plans = st.lists(
    st.tuples(st.integers(0, N_LINES - 1), st.sampled_from(CORRUPTIONS), st.integers(0, 2**16)),
    min_size=1,
    max_size=5,
    unique_by=lambda c: c[0],
)


def corrupt_csv(line: bytes, kind: str, pick: int) -> list[bytes]:
    fields = line.split(b",")
    if kind == "missing_field":
        return [b",".join(fields[:pick % 4] + fields[pick % 4 + 1 :])]
    if kind == "wrong_type":
        return [b",".join(fields[:3] + [b"soon"])] if pick % 2 else [b",".join(fields[:2] + [b"Toys", fields[3]])]
    return corrupt_bytes(line, kind, pick)


REVIEW_FIELDS = {  # user, item, time fields of each dump's review lines
    "amazon2014": ("reviewerID", "asin", "unixReviewTime"),
    "amazon2018": ("reviewerID", "asin", "unixReviewTime"),
    "amazon2023": ("user_id", "parent_asin", "timestamp"),
}


def corrupt_json(line: bytes, kind: str, pick: int, fields: tuple[str, str, str] = REVIEW_FIELDS["amazon2018"]) -> list[bytes]:
    record = json.loads(line)
    if kind == "missing_field":
        del record[fields[pick % 3]]
        return [json.dumps(record).encode()]
    if kind == "wrong_type":
        record[fields[2]] = ("soon", [1], {"t": 1}, None)[pick % 4]
        return [json.dumps(record).encode()]
    return corrupt_bytes(line, kind, pick)


def corrupt_bytes(line: bytes, kind: str, pick: int) -> list[bytes]:
    position = pick % len(line)
    if kind == "truncate":
        return [line[:position]]
    if kind == "flip":
        return [line[:position] + bytes([pick % 256]) + line[position + 1 :]]
    if kind == "bad_utf8":
        return [line[:position] + b"\xff\xfe" + line[position:]]
    assert kind == "duplicate"
    return [line, line]


def fuzzed(test):
    """A fuzz test over corruption plans, always including a repeated line, a stray quote
    and a line split in two."""
    seeded = example(plan=[(0, "duplicate", 0), (3, "flip", ord('"')), (5, "flip", ord("\n") + 256 * 3)])(test)
    return FUZZ(given(plan=corruption_plans)(seeded))


def untouched(lines: list[bytes], plan: list[tuple[int, str, int]]) -> bytes:
    """The file of the lines no corruption touched."""
    touched = {index for index, _, _ in plan}
    return b"".join(line + b"\n" for i, line in enumerate(lines) if i not in touched)


def assemble(lines: list[bytes], plan: list[tuple[int, str, int]], corrupt, first_line: int) -> tuple[bytes, set[int]]:
    """The file's bytes and the physical line numbers (1-based) that hold corrupted text."""
    by_index = {index: (kind, pick) for index, kind, pick in plan}
    physical: list[bytes] = []
    corrupted_lines: set[int] = set()
    for index, line in enumerate(lines):
        if index not in by_index:
            physical.append(line)
            continue
        for piece in corrupt(line, *by_index[index]):
            start = first_line + len(physical) + sum(p.count(b"\n") for p in physical)
            corrupted_lines.update(range(start, start + piece.count(b"\n") + 1))
            physical.append(piece)
    return b"".join(p + b"\n" for p in physical), corrupted_lines


def rows(out: Path) -> list[tuple]:
    return [(r["user"], r["item"], r["domain"], r["timestamp"]) for r in pq.read_table(out / INTERACTIONS_FILE).to_pylist()]


def is_subsequence(small: list, large: list) -> bool:
    remaining = iter(large)
    return all(any(row == other for other in remaining) for row in small)


def check_contract(report: IngestReport, out: Path, clean_out: Path, n_corrupted: int) -> list[dict]:
    quarantined = pq.read_table(out / QUARANTINE_FILE).to_pylist()
    assert report.interactions + report.quarantined_total == report.lines_read
    assert len(quarantined) == report.quarantined_total and all(r["reason"] for r in quarantined)
    kept, clean = rows(out), rows(clean_out)
    assert is_subsequence(clean, kept), (clean, kept)
    assert len(kept) - len(clean) <= n_corrupted
    return quarantined


CSV_HEADER = b"user,item,domain,timestamp"
CSV_LINES = [f"u{i:02d},i{i:02d},{NAMES[i % 2]},{1000 + i}".encode() for i in range(N_LINES)]


@fuzzed
def test_interactions_csv_survives_corrupted_lines(tmp_path_factory, plan) -> None:
    work = tmp_path_factory.mktemp("csv")
    body, _ = assemble(CSV_LINES, plan, corrupt_csv, first_line=2)
    (work / "log.csv").write_bytes(CSV_HEADER + b"\n" + body)
    (work / "clean.csv").write_bytes(CSV_HEADER + b"\n" + untouched(CSV_LINES, plan))
    report = ingest_interactions_file(work / "log.csv", None, work / "out", NAMES)
    ingest_interactions_file(work / "clean.csv", None, work / "clean_out", NAMES)
    check_contract(report, work / "out", work / "clean_out", len(plan))


def review_line(version: str, i: int) -> bytes:
    user, item, when = REVIEW_FIELDS[version]
    if version == "amazon2023":
        record = {"rating": 5.0, "title": "ok", "text": "Tastes great", "asin": f"V{i:02d}", user: f"u{i:02d}",
                  item: f"I{i:02d}", when: 1588687728923 + 86_400_000 * i}
    else:
        record = {"overall": 5.0, "verified": True, user: f"u{i:02d}", item: f"I{i:02d}", "reviewText": "Tastes great",
                  when: 1252800000 + i}
    return json.dumps(record).encode()


@pytest.mark.parametrize("version", sorted(REVIEW_FIELDS))
@fuzzed
def test_amazon_reviews_survive_corrupted_lines(tmp_path_factory, version, plan) -> None:
    lines = [review_line(version, i) for i in range(N_LINES)]
    corrupt = lambda line, kind, pick: corrupt_json(line, kind, pick, REVIEW_FIELDS[version])  # noqa: E731
    work = tmp_path_factory.mktemp("amazon")
    body, corrupted_lines = assemble(lines, plan, corrupt, first_line=1)
    suffix = ".jsonl.gz" if version == "amazon2023" else ".json.gz"
    (work / f"Food{suffix}").write_bytes(gzip.compress(body))
    (work / f"Kitchen{suffix}").write_bytes(gzip.compress(lines[0] + b"\n"))  # domain B: one good review
    (work / f"clean{suffix}").write_bytes(gzip.compress(untouched(lines, plan)))
    meta = {"A": None, "B": None}
    report = ingest_amazon(version, {"A": work / f"Food{suffix}", "B": work / f"Kitchen{suffix}"}, meta, work / "out", NAMES)
    ingest_amazon(version, {"A": work / f"clean{suffix}", "B": work / f"Kitchen{suffix}"}, meta, work / "clean_out", NAMES)
    quarantined = check_contract(report, work / "out", work / "clean_out", len(plan))
    for record in quarantined:
        assert Path(record["source_file"]).name == f"Food{suffix}" and record["line"] in corrupted_lines, record


DEMO_RELEASE = Path(__file__).resolve().parents[1] / "cdsr_pipeline" / "demo_data" / "llmcdsr-food-kitchen-sample"
SEQUENCE_LINES = (DEMO_RELEASE / "train_overlap.txt").read_bytes().splitlines()[:N_LINES]


def corrupt_sequence(line: bytes, kind: str, pick: int) -> list[bytes]:
    user, ids = line.split(b"\t")
    if kind == "missing_field":
        return [ids] if pick % 2 else [user + b"\t"]
    if kind == "wrong_type":
        tokens = ids.split(b",")
        tokens[pick % len(tokens)] = (b"x", b"-3", b"99999", b"1.5")[pick % 4]
        return [user + b"\t" + b",".join(tokens)]
    return corrupt_bytes(line, kind, pick)


def release_with(folder: Path, train_overlap: bytes) -> Path:
    folder.mkdir()
    for source in DEMO_RELEASE.iterdir():
        if source.suffix == ".txt" or source.name == "items.tsv":
            (folder / source.name).write_bytes(source.read_bytes())
    (folder / "train_overlap.txt").write_bytes(train_overlap)
    return folder


def sequences(out: Path) -> dict[str, list[tuple]]:
    """The training sequences of train_overlap.txt by user: (item, domain, position) in order."""
    by_user: dict[str, list[tuple]] = {}
    for r in pq.read_table(out / INTERACTIONS_FILE).to_pylist():
        if r["user"].startswith("train_overlap:"):
            by_user.setdefault(r["user"], []).append((r["item"], r["domain"], r["position"]))
    return by_user


@fuzzed
def test_llmcdsr_sequences_survive_corrupted_lines(tmp_path_factory, plan) -> None:
    from cdsr_pipeline.data.readers.releases import ingest_llmcdsr

    work = tmp_path_factory.mktemp("release")
    body, corrupted_lines = assemble(SEQUENCE_LINES, plan, corrupt_sequence, first_line=1)
    clean = untouched(SEQUENCE_LINES, plan)
    report = ingest_llmcdsr(release_with(work / "fuzzed", body), work / "out", NAMES)
    clean_report = ingest_llmcdsr(release_with(work / "clean", clean), work / "clean_out", NAMES)
    quarantined = [r for r in pq.read_table(work / "out" / QUARANTINE_FILE).to_pylist() if r["source_file"].endswith("train_overlap.txt")]
    kept, clean_kept = sequences(work / "out"), sequences(work / "clean_out")
    # Every line of the file is one sequence, kept or quarantined.
    n_lines = body.count(b"\n")
    assert len(kept) + len(quarantined) == n_lines
    assert report.lines_read - n_lines == clean_report.lines_read - clean.count(b"\n")
    assert all(record["line"] in corrupted_lines and record["reason"] for record in quarantined), quarantined
    assert all(kept.get(user) == sequence for user, sequence in clean_kept.items()), (clean_kept, kept)
    assert len(kept) - len(clean_kept) <= len(plan)


# C2DSR: user_idx<TAB>inter_id<TAB>item|unix_ts|datetime|<TAB>... (B ids are |A| + local id)
C2DSR_LINES = [
    "\t".join([str(i), str(100 + i)] + [f"{(i + j) % 10}|{1000 * i + j}|d|" for j in range(2 + i % 3)]).encode()
    for i in range(N_LINES)
]


def corrupt_c2dsr(line: bytes, kind: str, pick: int) -> list[bytes]:
    cells = line.split(b"\t")
    if kind == "missing_field":
        return [b"\t".join(cells[:2])] if pick % 2 else [b"\t".join(cells[1:])]
    if kind == "wrong_type":
        event = cells[2 + pick % (len(cells) - 2)].split(b"|")
        event[pick % 2] = (b"x", b"-3", b"99", b"1.5")[pick % 4]
        cells[2 + pick % (len(cells) - 2)] = b"|".join(event)
        return [b"\t".join(cells)]
    return corrupt_bytes(line, kind, pick)


def c2dsr_with(folder: Path, valid: bytes) -> Path:
    folder.mkdir()
    (folder / "Alist.txt").write_text("".join(f"{10 + i}\tASIN_A{i}\t{i}\n" for i in range(5)))
    (folder / "Blist.txt").write_text("".join(f"{20 + i}\tASIN_B{i}\t{i}\n" for i in range(5)))
    (folder / "validdata_new.txt").write_bytes(valid)
    (folder / "testdata_new.txt").write_bytes(C2DSR_LINES[0] + b"\n")
    return folder


def c2dsr_rows(out: Path) -> list[tuple]:
    """The validation rows by content: (user, ((item, timestamp), ...)), in file order."""
    rows: dict[str, list] = {}
    for r in pq.read_table(out / INTERACTIONS_FILE).to_pylist():
        if r["split"] == "valid":
            rows.setdefault(r["row"], [r["user"]]).append((r["item"], r["timestamp"]))
    return [(row[0], tuple(row[1:])) for row in rows.values()]


@fuzzed
def test_c2dsr_sequences_survive_corrupted_lines(tmp_path_factory, plan) -> None:
    from cdsr_pipeline.data.readers.releases import ingest_c2dsr

    work = tmp_path_factory.mktemp("c2dsr")
    body, corrupted_lines = assemble(C2DSR_LINES, plan, corrupt_c2dsr, first_line=1)
    ingest_c2dsr(c2dsr_with(work / "fuzzed", body), work / "out", NAMES)
    ingest_c2dsr(c2dsr_with(work / "clean", untouched(C2DSR_LINES, plan)), work / "clean_out", NAMES)
    quarantined = [r for r in pq.read_table(work / "out" / QUARANTINE_FILE).to_pylist() if r["source_file"].endswith("validdata_new.txt")]
    kept, clean = c2dsr_rows(work / "out"), c2dsr_rows(work / "clean_out")
    assert len(kept) + len(quarantined) == body.count(b"\n")  # every line kept or quarantined
    assert all(record["line"] in corrupted_lines and record["reason"] for record in quarantined), quarantined
    assert is_subsequence(clean, kept), (clean, kept)
    assert len(kept) - len(clean) <= len(plan)
