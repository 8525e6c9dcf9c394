"""Benchmark of the ingest-and-filter stage on generated Amazon-2018-format dumps.

Generates (seeded, cached under ``benchmarks/.data/``) two review files of two
categories, ``Grocery_and_Gourmet_Food.json.gz`` (domain A) and
``Home_and_Kitchen.json.gz`` (domain B), with every field of the real 2018 dumps
(reviewerID, asin, unixReviewTime, overall, reviewText of realistic length, summary,
verified, reviewTime, style, vote, reviewerName), their ``meta_*.json.gz`` files, a
few malformed lines and some duplicate reviews. Then, at two sizes, times:

- the pipeline: :func:`cdsr_pipeline.data.readers.amazon.ingest_amazon` (DuckDB, streaming)
  followed by :func:`cdsr_pipeline.data.sequences.build_sequences` (the filters);
- a straightforward reader: ``gzip`` + ``json.loads`` per line into a list of dicts,
  ``pandas.DataFrame``, then the same filters in pandas.

Each stage runs in its own subprocess so that its CPU time and peak memory
(``ru_maxrss`` of that child, from ``os.wait4``) are its own. The ingest runs under a
DuckDB ``memory_limit`` (``--memory-limit``, default 1GB): DuckDB caches up to its
limit and moves its staging tables to disk beyond it, so its peak memory is set by the
limit, not by the file size, once the data outgrows it.

Besides the two readers it prints the pipeline's breakdown (the ingest's steps, which
overlap in time, and the filter), and two floors that the pipeline's design cannot
beat on this machine: inflating each gzip file alone with ISA-L (the pipeline's
inflater; zlib, which DuckDB's own reader uses, takes about three times as long), one
core per file, so with both cores busy the floor is the larger file's time; and the
pipeline's line reader (``staging.TextLines``: inflating, and DuckDB splitting the
text into lines) over both files at once, without parsing. The speed-up that the
inflation floor allows is printed beside the measured one.

The output states the machine and its load (the 1-minute load average before and
after every timed stage, and the share of a core each stage got): other work on a
shared machine slows both readers, the two-threaded pipeline more than the
single-threaded naive reader, so compare the two within one run, and prefer a quiet
machine. ``--repeat N`` runs every timed stage N times and keeps each one's fastest
run. Usage::

    .venv/bin/python benchmarks/ingest.py                 # 750k rows, then 3M rows
    .venv/bin/python benchmarks/ingest.py --rows 400000   # a quicker look (100k, 400k)

The naive reader needs pandas (``pip install pandas``; about 3.7 KB of memory per
review); it is skipped with a message when pandas is missing or memory is short.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ROOT = Path(__file__).resolve().parent / ".data"
CATEGORIES = ("Grocery_and_Gourmet_Food", "Home_and_Kitchen")
SHARE_OF_A = 0.4  # Kitchen is the larger category, as in the real dumps
MIN_INTERACTIONS = 10
MIN_ITEMS_PER_DOMAIN = 3
CHUNK_ROWS = 100_000
GENERATOR_VERSION = 1  # part of the cache folder's name: bump it when the generated data changes

# -- data generation ----------------------------------------------------------------

_WORDS = (
    "the this it and a to for is was of my in with but not very good great love product taste flavor "
    "price quality would recommend again buy bought amazon use used works well easy after before box "
    "package arrived quickly fresh coffee tea sauce pan knife pot lid handle sturdy cheap expensive "
    "perfect little too much more less than really nice bad disappointed happy kitchen family kids "
    "daughter husband wife dinner breakfast every day week month year since ordered order "
    "size small large color one two three stars five four easily clean dishwasher safe smell "
    "sweet salty spicy organic healthy snack bag bottle jar cup grinder blender mixer toaster"
).split()
# Real reviews contain escaped quotes, non-ASCII letters and curly apostrophes.
_SPECIAL_WORDS = ['\\"great\\"', "caf\u00e9", "it\u2019s", "na\u00efve", "\\u00bd", "don't", "5\\/5", "&amp;"]
_NAMES = ["J. McDonald", "Amazon Customer", "Kindle Customer", "Mary", "John Smith", "K. Lee", "Bob", "A reader"]
_STYLES = [
    '{"Size:": " 12 Ounce (Pack of 6)"}',
    '{"Flavor:": " Original"}',
    '{"Color:": " Black"}',
    '{"Style:": " Set"}',
]
_EPOCH_2000 = 946684800
_DAYS = 6900  # 2000-01-01 .. 2018-11


def _ids(rng: np.random.Generator, count: int, prefix: str, length: int) -> list[str]:
    """``count`` distinct Amazon-looking ids (reviewerID ``A...``, ASIN ``B0...``)."""
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype="S1")
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        codes = rng.integers(0, len(alphabet), size=(count - len(ids), length))
        for raw in alphabet[codes].view(f"S{length}").ravel():
            text = prefix + raw.decode()
            if text not in seen:
                seen.add(text)
                ids.append(text)
    return ids


class _Corpus:
    """A long word stream; a review text is a slice of it cut at word boundaries."""

    def __init__(self, rng: np.random.Generator, words: int = 2_000_000):
        vocabulary = np.array(_WORDS + _SPECIAL_WORDS, dtype=object)
        weights = np.r_[np.ones(len(_WORDS)), np.full(len(_SPECIAL_WORDS), 0.05)]
        picks = vocabulary[rng.choice(len(vocabulary), size=words, p=weights / weights.sum())]
        self.text = " ".join(picks) + " "
        lengths = np.fromiter((len(w) + 1 for w in picks), dtype=np.int64, count=words)
        self.starts = np.r_[0, np.cumsum(lengths)]

    def slices(self, rng: np.random.Generator, n_words: np.ndarray) -> list[str]:
        n_words = np.minimum(n_words, len(self.starts) // 2)
        first = rng.integers(0, len(self.starts) - n_words - 1)
        begin, end = self.starts[first], self.starts[first + n_words] - 1
        return [self.text[b:e] for b, e in zip(begin.tolist(), end.tolist())]


def _review_times() -> list[str]:
    """``reviewTime`` as the 2018 dumps write it ("09 13, 2009"), per day since 2000."""
    start = dt.date(2000, 1, 1)
    return [f"{d:%m} {d.day}, {d.year}" for d in (start + dt.timedelta(days=i) for i in range(_DAYS))]


def _write_gz(path: Path, lines: list[bytes]) -> None:
    # mtime=0: the same seed gives byte-identical files. Level 1 keeps generation quick;
    # decompression speed barely depends on the level.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        for start in range(0, len(lines), CHUNK_ROWS):
            gz.write(b"".join(lines[start : start + CHUNK_ROWS]))


def _review_lines(
    rng: np.random.Generator,
    corpus: _Corpus,
    rows: int,
    users: list[str],
    user_weights: np.ndarray,
    asins: list[str],
    item_weights: np.ndarray,
    times: list[str],
) -> list[bytes]:
    user_idx = rng.choice(len(users), size=rows, p=user_weights / user_weights.sum())
    item_idx = rng.choice(len(asins), size=rows, p=item_weights / item_weights.sum())
    days = (rng.beta(4.0, 1.6, size=rows) * (_DAYS - 1)).astype(np.int64)
    ratings = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=rows, p=[0.06, 0.05, 0.09, 0.2, 0.6])
    text_words = np.clip(rng.lognormal(np.log(45), 0.9, size=rows), 1, 3000).astype(np.int64)
    texts = corpus.slices(rng, text_words)
    summaries = corpus.slices(rng, rng.integers(1, 9, size=rows))
    verified = rng.random(rows) < 0.8
    votes = np.where(rng.random(rows) < 0.15, rng.integers(2, 60, size=rows), 0)
    styles = np.where(rng.random(rows) < 0.3, rng.integers(0, len(_STYLES), size=rows), -1)
    names = rng.integers(0, len(_NAMES), size=rows)
    lines = []
    for i in range(rows):
        vote = f'"vote": "{votes[i]}", ' if votes[i] else ""
        style = f'"style": {_STYLES[styles[i]]}, ' if styles[i] >= 0 else ""
        lines.append(
            (
                f'{{"overall": {ratings[i]}, {vote}"verified": {"true" if verified[i] else "false"}, '
                f'"reviewTime": "{times[days[i]]}", "reviewerID": "{users[user_idx[i]]}", '
                f'"asin": "{asins[item_idx[i]]}", {style}"reviewerName": "{_NAMES[names[i]]}", '
                f'"reviewText": "{texts[i]}", "summary": "{summaries[i]}", '
                f'"unixReviewTime": {_EPOCH_2000 + 86400 * days[i]}}}\n'
            ).encode()
        )
    return lines


def _spoil(rng: np.random.Generator, lines: list[bytes]) -> list[bytes]:
    """Realistic damage: about 0.2% exact duplicate reviews and one line of each bad kind."""
    duplicated = set(rng.choice(len(lines), size=max(1, len(lines) // 500), replace=False).tolist())
    out: list[bytes] = []
    for i, line in enumerate(lines):
        out.append(line)
        if i in duplicated:
            out.append(line)
    bad = [
        out[1][: len(out[1]) // 2] + b"\n",  # truncated JSON
        out[2].replace(b'"summary": "', b'"summary": "\xff\xfe'),  # invalid UTF-8
        out[3].replace(b'"reviewerID"', b'"reviewer"'),  # missing field
        out[4].replace(b'"unixReviewTime": ', b'"unixReviewTime": "n/a", "x": '),  # bad timestamp
        b"\n",  # blank line
    ]
    for offset, line in enumerate(bad):
        out.insert(len(out) * (offset + 1) // (len(bad) + 1), line)
    return out


def _meta_lines(rng: np.random.Generator, corpus: _Corpus, asins: list[str], category: str) -> list[bytes]:
    main = category.replace("_", " ")
    lines = []
    descriptions = corpus.slices(rng, rng.integers(10, 120, size=len(asins)))
    titles = corpus.slices(rng, rng.integers(3, 15, size=len(asins)))
    related_ids = rng.integers(0, len(asins), size=(len(asins), 8))
    for i, asin in enumerate(asins):
        related = json.dumps([asins[j] for j in related_ids[i]])
        image = f"https://images-na.ssl-images-amazon.com/images/I/{asin[2:]}"
        lines.append(
            (
                f'{{"category": ["{main}", "Sub {i % 40}"], "tech1": "", "description": ["{descriptions[i]}"], '
                f'"fit": "", "title": "{titles[i].capitalize()}", "also_buy": {related}, "tech2": "", '
                f'"brand": "Brand {i % 997}", "feature": [], "rank": "{i * 7 + 11:,} in {main} (", '
                f'"also_view": {related}, "main_cat": "{main}", "similar_item": "", "date": "", '
                f'"price": "${1 + i % 90}.99", "asin": "{asin}", "imageURL": ["{image}._SS40_.jpg"], '
                f'"imageURLHighRes": ["{image}.jpg"]}}\n'
            ).encode()
        )
    described = [line for line, keep in zip(lines, rng.random(len(lines)) < 0.95) if keep]
    return described + described[:3] + [b'{"asin": "B0BROKEN", "title": \n']  # duplicates, one malformed


def generate(folder: Path, rows: int, seed: int) -> None:
    """Write the two review files and two meta files (``rows`` reviews in total)."""
    rng = np.random.default_rng(seed)
    corpus = _Corpus(rng)
    times = _review_times()
    # About 12 reviews per user and 20 per item, long-tailed: the filters keep about 35%.
    users = _ids(rng, max(rows // 12, 100), "A", 13)
    activity = rng.lognormal(0.0, 1.0, size=len(users))
    affinity = rng.beta(0.8, 0.8, size=len(users))  # share of a user's activity in domain A
    rows_a = int(rows * SHARE_OF_A)
    for letter, category, domain_rows, weights in (
        ("A", CATEGORIES[0], rows_a, activity * affinity),
        ("B", CATEGORIES[1], rows - rows_a, activity * (1 - affinity)),
    ):
        asins = _ids(rng, max(domain_rows // 20, 20), "B0", 8)
        popularity = rng.lognormal(0.0, 1.2, size=len(asins))
        lines = _review_lines(rng, corpus, domain_rows, users, weights, asins, popularity, times)
        _write_gz(folder / f"{category}.json.gz", _spoil(rng, lines))
        _write_gz(folder / f"meta_{category}.json.gz", _meta_lines(rng, corpus, asins, category))
        print(
            f"  generated domain {letter}: {category} ({domain_rows:,} reviews, {len(asins):,} items)", file=sys.stderr
        )


def dataset(rows: int, seed: int) -> tuple[Path, dict]:
    """The cached data folder for ``rows`` and ``seed`` (generated on first use) and its sizes."""
    folder = DATA_ROOT / f"amazon2018-{rows}-seed{seed}-v{GENERATOR_VERSION}"
    done = folder / "sizes.txt"  # JSON; written last, so its presence means the data is complete
    if not done.is_file():
        print(f"generating {rows:,} reviews into {folder} (cached for later runs)", flush=True)
        measure("generate", str(folder), str(rows), str(seed))
    return folder, json.loads(done.read_text())


def generate_dataset(folder: Path, rows: int, seed: int) -> dict:
    """Generate the files, then record their sizes (the marker of a complete folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    generate(folder, rows, seed)
    review_files = [folder / f"{c}.json.gz" for c in CATEGORIES]
    sizes = {"review_lines": 0, "gzip_bytes": sum(f.stat().st_size for f in review_files), "raw_bytes": 0}
    for file in review_files:
        with gzip.open(file, "rb") as handle:
            for line in handle:
                sizes["review_lines"] += 1
                sizes["raw_bytes"] += len(line)
    (folder / "sizes.txt").write_text(json.dumps(sizes))
    return sizes


# -- the stages (each runs in its own process) -----------------------------------------


def run_ingest(folder: Path, work: Path, memory_limit: str) -> dict:
    """The pipeline's read: ``ingest_amazon`` into ``work/ingest``."""
    from cdsr_pipeline.data.readers.amazon import discover_amazon_files, ingest_amazon

    reviews, meta, names = discover_amazon_files("amazon2018", folder, CATEGORIES)
    started = time.perf_counter()
    report = ingest_amazon(
        "amazon2018", reviews, meta, work / "ingest", names, work / "spill", memory_limit=memory_limit
    )
    return {
        "seconds": time.perf_counter() - started,
        "interactions": report.interactions,
        "quarantined": report.quarantined_total,
        "steps": report.timings,
    }


def run_filter(work: Path) -> dict:
    """The pipeline's filters: ``build_sequences`` on what ``run_ingest`` wrote."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cdsr_pipeline.data.sequences import build_sequences

    started = time.perf_counter()
    report = build_sequences(
        work / "ingest", work / "sequences", dataset="benchmark", domain_names=CATEGORIES, temp_dir=work / "spill"
    )
    seconds = time.perf_counter() - started
    test = pq.read_table(work / "sequences" / "test.parquet", columns=["sequence"])["sequence"]
    return {
        "seconds": seconds,
        "users": len(test),
        "kept": pc.sum(pc.list_value_length(test)).as_py() or 0,
        "rounds": report.filter_rounds,
    }


def run_naive(folder: Path) -> dict:
    """A straightforward reader: json.loads per line, a DataFrame, the same filters in pandas."""
    import pandas as pd

    started = time.perf_counter()
    frames = []
    for letter, category in zip(("A", "B"), CATEGORIES):
        records = []
        with gzip.open(folder / f"{category}.json.gz", "rb") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except ValueError:  # invalid JSON or UTF-8
                    continue
        frame = pd.DataFrame(records)
        frame["domain"] = letter
        frames.append(frame)
    reviews = pd.concat(frames, ignore_index=True)
    read = time.perf_counter()

    reviews["unixReviewTime"] = pd.to_numeric(reviews["unixReviewTime"], errors="coerce")
    reviews = reviews.dropna(subset=["reviewerID", "asin", "unixReviewTime"])
    reviews = reviews.drop_duplicates(["domain", "reviewerID", "asin", "unixReviewTime"])
    while True:  # the thresholds of build_sequences, repeated until nothing changes
        per_domain = reviews.groupby(["reviewerID", "domain"]).size().unstack(fill_value=0)
        users = per_domain.index[
            (per_domain.sum(axis=1) >= MIN_INTERACTIONS)
            & (per_domain["A"] >= MIN_ITEMS_PER_DOMAIN)
            & (per_domain["B"] >= MIN_ITEMS_PER_DOMAIN)
        ]
        item_counts = reviews.groupby(["domain", "asin"]).size()
        items = item_counts.index[item_counts >= MIN_INTERACTIONS]
        kept = reviews[
            reviews["reviewerID"].isin(users) & pd.MultiIndex.from_frame(reviews[["domain", "asin"]]).isin(items)
        ]
        if len(kept) == len(reviews):
            break
        reviews = kept
    sequences = (
        reviews.sort_values(["reviewerID", "unixReviewTime"], kind="stable").groupby("reviewerID")["asin"].agg(list)
    )
    filtered = time.perf_counter()
    return {"read_s": read - started, "filter_s": filtered - read, "users": len(sequences), "kept": len(reviews)}


def decompress_seconds(folder: Path) -> dict:
    """Wall and CPU seconds to only inflate each review file (ISA-L, the pipeline's
    inflater, one core): a floor for the pipeline's read of these files."""
    from isal import igzip

    seconds, cpu = {}, {}
    for category in CATEGORIES:
        started, cpu_started = time.perf_counter(), time.process_time()
        with igzip.open(folder / f"{category}.json.gz", "rb") as handle:
            while handle.read(1 << 24):
                pass
        seconds[category] = time.perf_counter() - started
        cpu[category] = time.process_time() - cpu_started
    return {"seconds": seconds, "cpu": cpu}


def scan_seconds(folder: Path) -> dict:
    """The pipeline's line reader over both review files at once (one DuckDB cursor
    each), lines counted, no parsing: the floor of the pipeline's design (its ingest
    reads each file exactly so, then parses)."""
    from concurrent.futures import ThreadPoolExecutor

    import duckdb

    from cdsr_pipeline.data.staging import TextLines

    con = duckdb.connect()

    def scan(category: str) -> int:
        cursor = con.cursor()
        lines = TextLines(folder / f"{category}.json.gz")
        with lines.registered(cursor, f"chunks_{category}") as chunks:
            return cursor.execute(f"SELECT count(*) FROM ({lines.rows_sql(chunks)})").fetchall()[0][0]

    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(scan, CATEGORIES))
    return {"seconds": time.perf_counter() - started, "scan_cpu": time.process_time() - cpu_started}


# -- measuring ------------------------------------------------------------------------


def measure(stage: str, *args: str) -> dict:
    """Run one stage in a child process; its result plus the child's CPU time, peak RSS
    and the load average (1 minute) before and after it.

    Every stage, generation included, runs in a child: a child's ``ru_maxrss`` starts
    from its parent's peak RSS (Linux carries it over ``exec``), so the parent stays small.
    """
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--worker", stage, *args], stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark stage {stage} failed (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # all threads, start-up included
    result["wall_s"] = wall  # start-up included, as in cpu_s
    result["core_share"] = result["cpu_s"] / wall if wall else 0.0  # cores' worth this child got
    result["load"] = (load_before, os.getloadavg()[0])
    return result


def measure_best(repeat: int, stage: str, *args: str, key: str = "seconds") -> dict:
    """:func:`measure` ``repeat`` times; the run with the smallest ``key``."""
    runs = [measure(stage, *args) for _ in range(repeat)]
    return min(runs, key=lambda r: r[key])


def machine() -> str:
    """CPU model, cores, memory, kernel and the load when the benchmark starts."""
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.machine()
    memory_gib = float(_proc_field("/proc/meminfo", "MemTotal").split()[0]) / 2**20
    one, five, fifteen = os.getloadavg()
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.1f} GiB RAM, {platform.system()} {platform.release()}, "
        f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min; "
        f"{'quiet' if one < 0.5 else 'other work is running: it slows both readers'})"
    )


def _proc_field(path: str, key: str) -> str:
    """The value of ``key`` in a ``key: value`` file of /proc ("" where absent)."""
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def _available_kib() -> float:
    return float(_proc_field("/proc/meminfo", "MemAvailable").split()[0])


def versions() -> str:
    import duckdb

    parts = [f"Python {platform.python_version()}", f"DuckDB {duckdb.__version__}"]
    try:
        import pandas

        parts.append(f"pandas {pandas.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


WORKERS = {
    "generate": lambda folder, rows, seed: generate_dataset(Path(folder), int(rows), int(seed)),
    "ingest": lambda folder, work, memory_limit: run_ingest(Path(folder), Path(work), memory_limit),
    "filter": lambda work: run_filter(Path(work)),
    "naive": lambda folder: run_naive(Path(folder)),
    "decompress": lambda folder: decompress_seconds(Path(folder)),
    "scan": lambda folder: scan_seconds(Path(folder)),
}


@dataclass
class Timing:
    """One reader on one data set."""

    read_s: float
    filter_s: float
    cpu_s: float
    peak_rss_mb: float
    users: int
    kept: int
    core_share: float  # CPU time over wall time: the cores' worth the reader got
    load: tuple[float, float]  # load average (1 min) before and after

    @property
    def total_s(self) -> float:
        return self.read_s + self.filter_s


def bench_size(rows: int, args: argparse.Namespace, naive: bool) -> dict[str, float]:
    """Both readers on one generated data set; prints a table, returns the pipeline's peak RSS per stage."""
    folder, sizes = dataset(rows, args.seed)
    lines = sizes["review_lines"]
    print(
        f"\ndata: {folder.name}: {lines:,} review lines in 2 files (A {CATEGORIES[0]}, B {CATEGORIES[1]}), "
        f"{sizes['gzip_bytes'] / 1e6:,.0f} MB gzip, {sizes['raw_bytes'] / 1e6:,.0f} MB JSON "
        f"({sizes['raw_bytes'] / lines:.0f} bytes/line); 0.2% duplicate reviews, 5 bad lines per file; meta files",
        flush=True,
    )
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="cdsr-bench-", dir=args.work_dir) as tmp:
            ingest = measure("ingest", str(folder), tmp, args.memory_limit)
            filtered = measure("filter", tmp)
        runs.append((ingest, filtered))
    ingest, filtered = min(runs, key=lambda run: run[0]["seconds"] + run[1]["seconds"])
    timings = {
        "pipeline": Timing(
            read_s=ingest["seconds"],
            filter_s=filtered["seconds"],
            cpu_s=ingest["cpu_s"] + filtered["cpu_s"],
            peak_rss_mb=max(ingest["peak_rss_mb"], filtered["peak_rss_mb"]),
            users=filtered["users"],
            kept=filtered["kept"],
            core_share=(ingest["cpu_s"] + filtered["cpu_s"]) / (ingest["wall_s"] + filtered["wall_s"]),
            load=(ingest["load"][0], filtered["load"][1]),
        )
    }
    if naive:
        needed_kib = lines * 4.0  # measured: about 3.7 KB per review as dicts + DataFrame
        if needed_kib > 0.7 * _available_kib():
            print(f"  naive reader skipped: it needs about {needed_kib / 2**20:.1f} GiB, more than is free now")
        else:
            result = min(
                (measure("naive", str(folder)) for _ in range(args.repeat)), key=lambda r: r["read_s"] + r["filter_s"]
            )
            timings["naive"] = Timing(
                **{k: result[k] for k in ("read_s", "filter_s", "cpu_s", "peak_rss_mb", "users", "kept", "load")},
                core_share=result["core_share"],
            )

    header = ("reader", "read s", "filter s", "total s", "rows/s", "CPU s", "cores", "peak RSS MB", "load")
    print("  {:<10}{:>8}{:>10}{:>9}{:>10}{:>8}{:>7}{:>13}{:>11}  kept".format(*header))
    for reader, t in timings.items():
        print(
            f"  {reader:<10}{t.read_s:>8.1f}{t.filter_s:>10.1f}{t.total_s:>9.1f}{lines / t.total_s:>10,.0f}"
            f"{t.cpu_s:>8.1f}{t.core_share:>7.2f}{t.peak_rss_mb:>13,.0f}{t.load[0]:>6.1f}-{t.load[1]:<4.1f}"
            f"  {t.users:,} users, {t.kept:,} interactions"
        )
    steps = ", ".join(f"{name} {seconds:.1f}" for name, seconds in ingest["steps"].items())
    print(
        f"  pipeline ingest {ingest['seconds']:.1f} s ({ingest['cpu_s']:.1f} CPU s), steps in wall s, overlapping "
        f"(two workers stage the files, the main thread writes the interactions): {steps}"
    )
    print(
        f"  pipeline filter {filtered['seconds']:.1f} s ({filtered['cpu_s']:.1f} CPU s): "
        f"{filtered['rounds']} filter rounds to the fixpoint, then ids, split and outputs"
    )
    print(
        f"  pipeline peak RSS by stage: ingest {ingest['peak_rss_mb']:,.0f} MB, "
        f"filter {filtered['peak_rss_mb']:,.0f} MB; ingest quarantined {ingest['quarantined']:,} lines"
    )
    decompress = measure_best(args.repeat, "decompress", str(folder), key="cpu_s")
    scan = measure_best(args.repeat, "scan", str(folder), key="scan_cpu")
    floor = max(decompress["cpu"].values())  # CPU seconds: what other work on the machine does not inflate
    floor_cpu = sum(decompress["cpu"].values())
    per_file = ", ".join(
        f"{category} {seconds:.1f} s ({decompress['cpu'][category]:.1f} CPU s)"
        for category, seconds in decompress["seconds"].items()
    )
    print(
        f"  floors: inflating alone (ISA-L, one core per file): {per_file}, so at least {floor:.1f} s "
        f"with both cores free (the larger file's CPU time) and {floor_cpu:.1f} CPU s; "
        f"the pipeline's line reader over both files at once "
        f"(no parsing): {scan['seconds']:.1f} s, {scan['scan_cpu']:.1f} CPU s "
        f"(load {scan['load'][0]:.1f}-{scan['load'][1]:.1f})"
    )
    if "naive" in timings:
        pipeline, baseline = timings["pipeline"], timings["naive"]
        print(
            f"  speed-up (naive / pipeline): {baseline.total_s / pipeline.total_s:.1f}x wall-clock (target >= 10x), "
            f"{baseline.cpu_s / pipeline.cpu_s:.1f}x CPU time"
        )
        print(
            f"  best possible against these floors: in CPU time at most {baseline.cpu_s / floor_cpu:.1f}x "
            f"(naive CPU / inflation CPU), {baseline.cpu_s / scan['scan_cpu']:.1f}x for the line reader; "
            f"in wall-clock at most {baseline.total_s / floor:.1f}x with both cores free "
            f"(the larger file's inflation), {baseline.total_s * pipeline.core_share / floor_cpu:.1f}x "
            f"with the {pipeline.core_share:.2f} cores the pipeline got in this run"
        )
        print(
            f"  10x needs the whole pipeline within {baseline.total_s / 10:.1f} s here, "
            f"{baseline.cpu_s / 10:.1f} CPU s on one core; the line reader alone takes "
            f"{scan['scan_cpu']:.1f} CPU s, the pipeline's other work (parsing, duplicates, outputs, filter, start-up) "
            f"{pipeline.cpu_s - scan['scan_cpu']:.1f} CPU s"
        )
    return {"ingest": ingest["peak_rss_mb"], "filter": filtered["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, default=3_000_000, help="reviews at the larger size (the smaller is a quarter)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit of the ingest (default 1GB)")
    parser.add_argument("--work-dir", type=Path, help="where the pipeline writes and spills (default: system temp)")
    parser.add_argument("--skip-naive", action="store_true", help="time the pipeline only")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every timed stage; the fastest is kept")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        stage, *stage_args = args.worker
        print(json.dumps(WORKERS[stage](*stage_args)))
        return

    naive = not args.skip_naive
    if naive:
        try:
            import pandas  # noqa: F401
        except ImportError:
            print("pandas is not installed: the naive reader is skipped (install it with: pip install pandas)")
            naive = False

    print("Ingest-and-filter benchmark: ingest_amazon + build_sequences vs json.loads + pandas")
    print(f"machine: {machine()}; {versions()}")
    print(
        f"filters: >= {MIN_INTERACTIONS} interactions per user and per item, "
        f">= {MIN_ITEMS_PER_DOMAIN} items per domain; ingest DuckDB memory_limit {args.memory_limit}"
    )
    small, large = args.rows // 4, args.rows
    peaks = {rows: bench_size(rows, args, naive) for rows in (small, large)}
    print(
        f"\npipeline peak RSS, ingest: {peaks[small]['ingest']:,.0f} MB at {small:,} rows, "
        f"{peaks[large]['ingest']:,.0f} MB at {large:,} rows ({peaks[large]['ingest'] / peaks[small]['ingest']:.2f}x "
        f"for 4x the data; DuckDB holds at most {args.memory_limit} and moves its staging tables to disk beyond); "
        f"filter: {peaks[small]['filter']:,.0f} MB, {peaks[large]['filter']:,.0f} MB"
    )


if __name__ == "__main__":
    main()
