"""Evaluation report of a set of training runs: Markdown + HTML, learning curves as PNG.

:func:`write_report` reads each run folder (:mod:`~cdsr_pipeline.model.trainer`
outputs) and writes ``report.md``, ``report.html`` (self-contained except for the PNG
files beside it) and the figures into ``out_dir``. It states the dataset, the split
and both protocols; gives one results table per protocol and selection rule (the
papers' per-domain best-validation epoch, and the early-stopping checkpoint); the
training facts of each run (epochs, patience, stop); the papers' headline numbers in
a separate, labelled table that says whether they are comparable (only for the
papers' own C2DSR split); learning curves; and an ablation table per
``ablation_group``.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .storage import atomic_write_text  # noqa: E402
from .data.sequences import split_file  # noqa: E402
from .model.data import load_sequences  # noqa: E402
from .model.evaluate import DOMAIN_KEYS, PROTOCOLS, metric_column  # noqa: E402
from .model.metrics import METRICS, mrr, paired_mrr_difference  # noqa: E402
from .model.config import config_to_dict  # noqa: E402
from .model.runs import ABLATION_GROUPS, SINGLE_DOMAIN_SUFFIX, plan_runs, without_seed  # noqa: E402
from .model.trainer import TEST_RANKS_FILE, TrainResult  # noqa: E402

METRIC_LABELS = {"mrr": "MRR", "ndcg_5": "NDCG@5", "ndcg_10": "NDCG@10", "hr_10": "HR@10"}
PAPERS_NEGATIVES = 999
REFERENCE_RUN = "SASRec"
"""The baseline every other run is compared with, row by row on the test set (the
papers' headline ratio is TEMA-LLM's MRR over SASRec's)."""


def protocol_label(protocol: str, negatives: int) -> str:
    if protocol == "full":
        return "full ranking over the target domain"
    papers = " (papers' protocol)" if negatives == PAPERS_NEGATIVES else f" (the papers use {PAPERS_NEGATIVES})"
    return f"{negatives} sampled negatives{papers}"

# docs/SPEC.md "Papers' headline numbers" (%): LLM-EMF Tables 2-3, TEMA-LLM Tables II-III.
PAPERS_SOURCE = (
    "LLM-EMF Tables 2-3 and TEMA-LLM Tables II-III: C2DSR split (Food 29,207 / Kitchen 34,886 items; "
    "Movie 36,845 / Book 63,937), 999 sampled negatives, each domain at its best validation epoch"
)
PAPERS_RESULTS: dict[tuple[str, str], dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    ("food", "kitchen"): {
        "SASRec": ((7.30, 6.90, 7.79), (3.79, 3.35, 3.93)),
        "LLM-EMF": ((9.24, 9.05, 10.21), (5.13, 4.84, 5.43)),
        "TEMA-LLM": ((9.34, 9.14, 10.32), (5.24, 4.95, 5.50)),
    },
    ("movie", "book"): {
        "SASRec": ((3.79, 3.23, 3.69), (1.81, 1.41, 1.71)),
        "LLM-EMF": ((6.32, 5.35, 5.78), (2.86, 2.53, 2.79)),
        "TEMA-LLM": ((6.41, 5.44, 5.89), (2.94, 2.62, 2.91)),
    },
}


@dataclass
class ReportPaths:
    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)


# -- a tiny document model rendered to Markdown and HTML -------------------------


@dataclass
class _Document:
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("bullets", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, file: str, alt: str) -> None:
        self.blocks.append(("image", (file, alt)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out.append(f"{'#' * level} {text}")
            elif kind == "paragraph":
                out.append(value)
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in value))
            elif kind == "table":
                header, rows = value
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "image":
                file, alt = value
                out.append(f"![{alt}]({file})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{_inline(text)}</h{level}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline(value)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{_inline(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "image":
                file, alt = value
                file, alt = html.escape(file), html.escape(alt)
                body.append(f'<figure><img src="{file}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
        )
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
        )


def _inline(text: str) -> str:
    """Escape HTML, then render Markdown's **bold** and `code`."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


# -- report ----------------------------------------------------------------------


def _percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.2f}"  # NaN -> "-"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def write_report(
    runs: Sequence[TrainResult | Path],
    out_dir: Path,
    dataset_info: dict | None = None,
    *,
    title: str | None = None,
    missing: Sequence[str] = (),
    sequences_dir: Path | None = None,
) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and PNG figures for ``runs`` into ``out_dir``.

    Args:
        runs: finished runs (results or run folders), all on the same dataset.
        dataset_info: the sequences folder's ``stats.json`` (default: the one recorded
            in the first run's metrics).
        title: heading of the report (default from the dataset name).
        missing: model assets that were not materialized (listed as missing).
        sequences_dir: the runs' ``cdsr_sequences`` folder: with it, the report breaks
            each run's test MRR down by how often the target item occurs in training
            (:func:`target_frequencies`).
    """
    results = [run if isinstance(run, TrainResult) else TrainResult.load(Path(run)) for run in runs]
    if not results:
        raise ValueError("no runs to report")
    datasets = {r.metrics["dataset"] for r in results}
    if len(datasets) > 1:
        raise ValueError(f"runs from different datasets cannot share a report: {sorted(datasets)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocols = {(r.metrics["negatives"]["count"], r.metrics["negatives"]["seed"]) for r in results}
    if len(protocols) > 1:
        raise ValueError(f"runs evaluated with different negatives (count, seed) cannot share a report: {sorted(protocols)}")
    negatives = results[0].metrics["negatives"]["count"]
    stats = dataset_info or results[0].metrics["data"]["stats"]
    names = results[0].metrics["domain_names"]
    dataset = results[0].metrics["dataset"]
    title = title or f"Evaluation report: {dataset}"

    paired = paired_comparisons(results)
    doc = _Document()
    doc.heading(1, title)
    _data_section(doc, stats, names, results)
    _runs_section(doc, results, names)
    if missing:
        doc.paragraph(
            "Not in this report (not materialized yet): " + ", ".join(f"`{name}`" for name in missing) + "."
        )
    for protocol in PROTOCOLS:
        doc.heading(2, f"Results: {protocol_label(protocol, negatives)}")
        doc.paragraph(
            "Test metrics in %, per target domain. **Papers' rule**: each domain at the epoch of its best validation "
            "MRR under this protocol (epochs in the last column). **Best checkpoint**: the early-stopping epoch "
            "(best mean validation MRR of the two domains under the run's selection protocol)."
            + (
                " **(bf16)**: trained with bf16 matrix products (weights, loss and evaluation in fp32), a speed-up "
                "checked against fp32 runs with `scripts/precision_table.py`."
                if any((r.metrics.get("precision") or "fp32") == "bf16" for r in results)
                else ""
            )
        )
        doc.heading(3, "Papers' rule (per-domain best validation epoch)")
        doc.table(*_results_table(results, names, protocol, per_domain=True))
        doc.heading(3, "Best checkpoint")
        doc.table(*_results_table(results, names, protocol, per_domain=False))
        if paired and any(protocol in by_protocol for by_protocol in paired.values()):
            doc.heading(3, f"Against {REFERENCE_RUN}, paired over the test rows (best checkpoint)")
            doc.paragraph(
                f"Each run's test MRR as a multiple of {REFERENCE_RUN}'s, and the difference in MRR points with its 95% "
                "paired bootstrap interval (10,000 resamples of the test rows, seed 0): both runs ranked the same rows "
                "against the same negatives, so the interval reflects the test sample, not the seed. An interval that "
                "contains 0 is no evidence of a difference on this test set; one run per model does not measure "
                "training noise (see the seeds table where there is one)."
            )
            doc.table(*_paired_table(paired, names, protocol))
        if any(len(group) > 1 for group in seed_groups(results).values()):
            doc.heading(3, "Mean and spread over seeds (best checkpoint)")
            doc.paragraph(
                "Test MRR in % of the runs that differ only by their seed (`extra_seeds`): mean ± standard deviation "
                "over n runs. A difference between two models smaller than their spread is not a result."
            )
            doc.table(*_seed_table(results, names, protocol))
        if protocol == "sampled":
            _papers_section(doc, dataset, names, negatives)
    by_frequency = None
    if sequences_dir is not None:
        frequencies = target_frequencies(sequences_dir, results[0].config.max_len)
        by_frequency = frequency_breakdown(results, frequencies)
        if by_frequency["runs"]:
            _frequency_section(doc, by_frequency, names)
    figures = _figures(results, names, out_dir)
    doc.heading(2, "Learning curves")
    doc.paragraph("Training loss and validation MRR per epoch; the dashed line marks the best checkpoint.")
    for path, alt in figures:
        doc.image(path.name, alt)
    groups = sorted({r.config.ablation_group for r in results if r.config.ablation_group})
    if groups:
        doc.heading(2, "Ablations")
        for group in groups:
            doc.heading(3, group)
            rows = _in_table_order([r for r in results if r.config.ablation_group == group], group)
            doc.table(*_ablation_table(rows, names))
            if _same_runs(rows):
                doc.paragraph(
                    "A row marked \"the same run as\" differs from that row only by a tower whose features no item "
                    "has (no images in this data): a model leaves such a tower out, so the two rows are one model, "
                    "trained once."
                )

    markdown, html_path = out_dir / "report.md", out_dir / "report.html"
    summary = metrics_summary(results, stats, missing) | {"paired_against_reference": {"reference": REFERENCE_RUN, "runs": paired}}
    if by_frequency is not None:
        summary["by_target_frequency"] = by_frequency
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(summary, indent=2))
    atomic_write_text(markdown, doc.markdown())
    atomic_write_text(html_path, doc.html(title))
    return ReportPaths(markdown=markdown, html=html_path, figures=[path for path, _ in figures])


METRICS_FILE = "metrics.json"
RUN_FIELDS = (
    "name", "ablation_group", "epochs_run", "max_epochs", "patience", "stopped_early", "selection", "best_checkpoint",
    "per_domain_best", "timing", "device", "precision", "threads", "hardware", "data", "negatives", "features", "model_summary", "notes",
)


CURVE_COLUMNS = ("epoch", "train_loss") + tuple(
    metric_column("valid", protocol, key, "mrr") for protocol in ("sampled", "full") for key in DOMAIN_KEYS
)
"""Per epoch, in ``metrics.json``: what the learning curves plot, as numbers, so that runs on
other machines or precisions can be compared epoch by epoch from the published file alone."""


def _curve(result: TrainResult) -> dict[str, list]:
    if not result.metrics.get("epochs_run"):
        return {}
    epochs = result.epochs()
    return {column: epochs[column].to_list() for column in CURVE_COLUMNS if column in epochs.columns}


def metrics_summary(results: Sequence[TrainResult], stats: dict, missing: Sequence[str] = ()) -> dict:
    """Every run's metrics (both protocols, both reporting rules), epochs and its per-epoch
    curve, timing, hardware and exact config, with the dataset they share: the report's
    ``metrics.json``."""
    runs = []
    for r in results:
        entry = {key: r.metrics.get(key) for key in RUN_FIELDS}
        entry["data"] = {k: v for k, v in (entry["data"] or {}).items() if k != "stats"}
        entry["config"] = config_to_dict(r.config)
        entry["curve"] = _curve(r)
        runs.append(entry)
    return {
        "dataset": results[0].metrics["dataset"],
        "domain_names": results[0].metrics["domain_names"],
        "split": stats.get("protocol"),
        "stats": stats,
        "protocols": {
            "sampled": f"{results[0].metrics['negatives']['count']} negatives drawn uniformly with replacement from the "
            "target's domain, excluding only the target",
            "full": "the target against every item of its domain",
        },
        "reporting_rules": {
            "best_checkpoint": "the epoch of the best mean validation MRR of the two domains (early stopping)",
            "per_domain_best": "each domain at the epoch of its own best validation MRR (the papers' rule)",
        },
        "runs": runs,
        "missing_model_assets": list(missing),
    }


def _test_ranks(result: TrainResult) -> pa.Table | None:
    path = result.out_dir / TEST_RANKS_FILE
    return pq.read_table(path) if path.is_file() else None


def paired_comparisons(results: Sequence[TrainResult]) -> dict[str, dict]:
    """Each run against :data:`REFERENCE_RUN` on the same test rows (best checkpoints):
    ``{run: {protocol: {domain: {"ratio", "difference", "low", "high", "rows"}}}}``.

    Empty when the reference is absent or has no per-row ranks; runs without ranks
    (trained before runs kept them) are left out.
    """
    reference = next((r for r in results if r.name == REFERENCE_RUN), None)
    reference_ranks = _test_ranks(reference) if reference is not None else None
    if reference_ranks is None:
        return {}
    out: dict[str, dict] = {}
    for result in results:
        ranks = _test_ranks(result) if result is not reference else None
        if ranks is None:
            continue
        out[result.name] = {}
        for protocol in PROTOCOLS:
            out[result.name][protocol] = {}
            for key in DOMAIN_KEYS:
                mine, theirs = (_domain_ranks(table, key, protocol) for table in (ranks, reference_ranks))
                if not np.array_equal(mine[0], theirs[0]):
                    raise ValueError(f"{result.name} and {REFERENCE_RUN} ranked different test rows: not paired")
                if not mine[0].size:
                    continue
                difference, low, high = paired_mrr_difference(mine[1], theirs[1])
                out[result.name][protocol][key] = {
                    "ratio": mrr(mine[1]) / mrr(theirs[1]),
                    "difference": difference,
                    "low": low,
                    "high": high,
                    "rows": int(mine[0].size),
                }
    return out


FREQUENCY_BUCKETS: tuple[tuple[int, int | None], ...] = ((0, 0), (1, 4), (5, 19), (20, None))
"""Occurrences of a test target in the training sequences: never (cold), rare, middling, frequent."""


def target_frequencies(sequences_dir: Path, max_len: int) -> np.ndarray:
    """For each test row (the ``row`` of a run's test ranks), how often its target item
    occurs in the training sequences of the cross-domain users (every run trains on
    those; a run with the single-domain users added saw more, the same buckets are kept
    so that rows are compared on the same test rows)."""
    train = pl.read_parquet(Path(sequences_dir) / split_file("train"), columns=["sequence", "user_domains"])
    items = train.filter(pl.col("user_domains") == "both")["sequence"].explode().drop_nulls().to_numpy()
    targets = load_sequences(sequences_dir, "test", max_len=max_len).last_targets
    counts = np.bincount(items, minlength=int(targets.max(initial=0)) + 1)
    return counts[targets]


def _bucket_label(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"


def frequency_breakdown(results: Sequence[TrainResult], frequencies: np.ndarray) -> dict:
    """Test MRR (best checkpoint) of each run with per-row ranks, per domain and protocol,
    within each :data:`FREQUENCY_BUCKETS` bucket of the target's training frequency."""
    labels = [_bucket_label(low, high) for low, high in FREQUENCY_BUCKETS]

    def bucket_of(rows: np.ndarray) -> np.ndarray:
        found = frequencies[rows]
        return np.select([(found >= low) & (high is None or found <= high) for low, high in FREQUENCY_BUCKETS],
                         np.arange(len(FREQUENCY_BUCKETS)), default=-1)

    out: dict = {
        "definition": "occurrences of the test target item in the training sequences of the cross-domain users",
        "buckets": labels,
        "rows": {},
        "runs": {},
    }
    for result in results:
        ranks = _test_ranks(result)
        if ranks is None:
            continue
        entry: dict = {}
        for key in DOMAIN_KEYS:
            rows, _ = _domain_ranks(ranks, key, "full")
            buckets = bucket_of(rows)
            out["rows"][key] = [int((buckets == b).sum()) for b in range(len(labels))]
            for protocol in PROTOCOLS:
                found = _domain_ranks(ranks, key, protocol)[1]
                entry.setdefault(protocol, {})[key] = [
                    mrr(found[buckets == b]) if (buckets == b).any() else None for b in range(len(labels))
                ]
        out["runs"][result.name] = entry
    return out


def _frequency_section(doc: _Document, breakdown: dict, names: dict) -> None:
    doc.heading(2, "By the target item's training frequency")
    doc.paragraph(
        "Test MRR in % (best checkpoint) within groups of test rows by how often the target item occurs in the "
        "training sequences of the cross-domain users (n: test rows in the group; the same rows for every run). "
        "Text, image and tag towers are meant to help where an item's id embedding has seen little training; "
        "groups of a few dozen rows are noisy."
    )
    labels = breakdown["buckets"]
    header = ["Model"] + [
        f"{names[k]} {label} (n={n})" for k in DOMAIN_KEYS for label, n in zip(labels, breakdown["rows"].get(k, [0] * len(labels)))
    ]
    for protocol in PROTOCOLS:
        doc.heading(3, protocol)
        rows = [
            [name] + [_percent(v if v is not None else float("nan")) for k in DOMAIN_KEYS for v in entry[protocol][k]]
            for name, entry in breakdown["runs"].items()
        ]
        doc.table(header, rows)


def _domain_ranks(table: pa.Table, domain: str, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ranks) of one domain, by row index."""
    rows = table.column("row").to_numpy()
    ranks = table.column(f"rank_{protocol}").to_numpy()
    mask = np.asarray(table.column("domain").to_pylist()) == domain
    order = np.argsort(rows[mask], kind="stable")
    return rows[mask][order], ranks[mask][order]


def _paired_table(paired: dict[str, dict], names: dict, protocol: str) -> tuple[list[str], list[list[str]]]:
    header = ["Model"] + [
        label for k in DOMAIN_KEYS for label in (f"MRR ratio ({names[k]})", f"Δ MRR, 95% interval ({names[k]})")
    ]
    rows = []
    for name, by_protocol in paired.items():
        cells = []
        for key in DOMAIN_KEYS:
            entry = by_protocol.get(protocol, {}).get(key)
            if entry is None:
                cells += ["-", "-"]
                continue
            cells += [
                f"{entry['ratio']:.2f}x",
                f"{100 * entry['difference']:+.2f} [{100 * entry['low']:+.2f}, {100 * entry['high']:+.2f}]",
            ]
        rows.append([name] + cells)
    return header, rows


def _data_section(doc: _Document, stats: dict, names: dict, results: list[TrainResult]) -> None:
    doc.heading(2, "Data and protocol")
    doc.paragraph(f"Dataset **{stats['dataset']}**; split: {stats['protocol']}.")
    rows = []
    for index, key in enumerate(DOMAIN_KEYS):
        d = stats["domains"][key]
        rows.append(
            [
                d["name"],
                f"{d['items']:,}",
                f"{stats['train']:,}" if index == 0 and stats.get("train") else "",
                f"{d['valid']:,}",
                f"{d['test']:,}",
                f"{stats['avg_length']:.2f}" if index == 0 and stats.get("avg_length") else "",
            ]
        )
    doc.table(["Domain", "#Items", "#Train", "#Valid", "#Test", "Avg.length"], rows)
    first = results[0].metrics
    train_users = sorted({", ".join(r.metrics["data"]["train_user_domains"]) for r in results})
    negatives = first["negatives"]
    doc.bullets(
        [
            f"Training sequences used: users active in {' / '.join(train_users)} "
            f"({first['data']['train_sequences']:,} sequences, {first['data']['train_examples']:,} next-item examples, "
            f"last {first['data']['max_len']} positions); validation and test users are those of the split.",
            f"Sampled protocol: {negatives['count']} negatives per row drawn uniformly with replacement from the "
            f"target's domain, excluding only the target, seed {negatives['seed']} (the same for every run: "
            f"valid {negatives['valid_digest']}, test {negatives['test_digest']}).",
            "Full protocol: the target against every item of its domain.",
            *_degenerate_sampling(stats, negatives["count"]),
            "rank = 1 + number of candidates scoring strictly higher than the target; MRR = mean 1/rank; "
            "NDCG@k = mean 1/log2(rank+1) for rank <= k; HR@10 = share with rank <= 10.",
        ]
    )


def _degenerate_sampling(stats: dict, negatives: int) -> list[str]:
    """A warning per domain with no more items than sampled negatives: the sample then
    repeats items (about negatives / items times each), the sampled ranks over-count
    every competitor, and sampled MRR can fall below full-ranking MRR."""
    warnings = []
    for key in DOMAIN_KEYS:
        domain = stats["domains"][key]
        if domain["items"] - 1 <= negatives:
            warnings.append(
                f"**Degenerate sampled protocol for {domain['name']}**: {negatives} negatives drawn from "
                f"{domain['items'] - 1:,} other items, so each is counted about {negatives / max(domain['items'] - 1, 1):.1f} "
                f"times; sampled metrics there are not meaningful (use the full ranking)."
            )
    return warnings


def _runs_section(doc: _Document, results: list[TrainResult], names: dict) -> None:
    doc.heading(2, "Runs")
    rows = []
    for r in results:
        m, model = r.metrics, r.config.model
        summary = m["model_summary"]
        towers = ", ".join(f"{k} {v:.2f}" for k, v in summary["towers"].items()) or "-"
        structure = (
            "popularity"
            if model.architecture == "popularity"
            else f"{model.encoder}, {'+'.join(summary['views'])}, {summary['scoring']}"
            + (f", fusion {model.fusion}" if model.fusion == "early" else "")
            + (f", sampled softmax K={model.loss_negatives}" if model.loss_negatives else "")
        )
        stop = "early stop" if m["stopped_early"] else "max epochs"
        training = (
            f"{m['epochs_run']}/{m['max_epochs']} epochs ({stop}), patience {m['patience']}, best epoch "
            f"{m['best_checkpoint']['epoch']}, {m['timing']['mean_train_seconds']:.0f} s/epoch on {m['device']}"
            f" ({_cpu(m)}), {m.get('precision') or 'fp32'}, seed {r.config.seed}"
            if m["epochs_run"]
            else "not trained"
        )
        provenance = m["features"]["provenance"]
        features = "; ".join(f"{k}: {provenance.get(k, 'not stated')}" for k in summary["sources"] if k != "id") or "-"
        rows.append([r.name, structure, towers, features, training])
    doc.table(["Run", "Model", "Towers (fusion weight)", "Feature sources", "Training"], rows)
    cpus = sorted({_cpu(r.metrics) for r in results if r.metrics["epochs_run"]})
    if len(cpus) > 1:
        doc.paragraph(
            f"**These runs trained on different machines** ({', '.join(cpus)}). A run is reproducible on the "
            "machine it trained on; on another CPU its bf16 products use that CPU's kernels, so the same config "
            "and seed give slightly different numbers: where two runs differ by little, compare runs of one machine."
        )
    notes = [f"**{r.name}**: {note}" for r in results for note in r.metrics["notes"]]
    if notes:
        doc.paragraph("Notes recorded while building the models:")
        doc.bullets(notes)


def seed_groups(results: Sequence[TrainResult]) -> dict[str, list[TrainResult]]:
    """Runs by name without a ``(seed N)`` suffix, in the order they come."""
    groups: dict[str, list[TrainResult]] = {}
    for result in results:
        groups.setdefault(without_seed(result.name), []).append(result)
    return groups


def _seed_table(results: Sequence[TrainResult], names: dict, protocol: str) -> tuple[list[str], list[list[str]]]:
    header = ["Model", "n"] + [f"MRR ({names[k]})" for k in DOMAIN_KEYS]
    rows = []
    for name, group in seed_groups(results).items():
        cells = []
        for key in DOMAIN_KEYS:
            values = np.array([100 * r.metrics["best_checkpoint"]["test"][key][protocol]["mrr"] for r in group])
            spread = values.std(ddof=1) if values.size > 1 else float("nan")
            cells.append(f"{values.mean():.2f} ± {spread:.2f}" if values.size > 1 else f"{values.mean():.2f}")
        rows.append([_labelled_name(group[0]).replace(group[0].name, name), str(len(group))] + cells)
    return header, rows


def _cpu(metrics: dict) -> str:
    """The CPU a run trained on, with torch's CPU capability where recorded (two CPUs of
    one name can differ in the instructions that decide precision and speed)."""
    hardware = metrics.get("hardware") or {}
    cpu = hardware.get("cpu") or "CPU not recorded"
    capability = hardware.get("torch_cpu_capability")
    return f"{cpu} {capability}" if capability else cpu


def _results_table(
    results: list[TrainResult], names: dict, protocol: str, per_domain: bool
) -> tuple[list[str], list[list[str]]]:
    header = ["Model"] + [f"{METRIC_LABELS[m]} ({names[k]})" for k in DOMAIN_KEYS for m in METRICS] + ["Epoch(s)"]
    rows = []
    for r in results:
        m = r.metrics
        if per_domain:
            chosen = m["per_domain_best"][protocol]
            values = [chosen[k]["test"][metric] for k in DOMAIN_KEYS for metric in METRICS]
            epochs = " / ".join(str(chosen[k]["epoch"]) for k in DOMAIN_KEYS)
        else:
            test = m["best_checkpoint"]["test"]
            values = [test[k][protocol][metric] for k in DOMAIN_KEYS for metric in METRICS]
            epochs = str(m["best_checkpoint"]["epoch"])
        rows.append([_labelled_name(r)] + [_percent(v) for v in values] + [epochs])
    return header, rows


def _labelled_name(result: TrainResult) -> str:
    """The run's name, marked when it trained in another precision than fp32 (a speed-up)."""
    precision = result.metrics.get("precision") or "fp32"
    return result.name if precision == "fp32" else f"{result.name} ({precision})"


def papers_results_for(domain_names) -> dict | None:
    """The papers' numbers for a scenario whose domain names contain the papers' domain words.

    "Food"/"Kitchen" and Amazon's "Grocery and Gourmet Food"/"Home and Kitchen" both match, as do
    "Movie"/"Book" and "Movies and TV"/"Books" (a trailing "s" is ignored).
    """
    words = [{word.removesuffix("s") for word in name.lower().replace("&", " ").split()} for name in domain_names]
    for (first, second), results in PAPERS_RESULTS.items():
        if first in words[0] and second in words[1]:
            return results
    return None


def _papers_section(doc: _Document, dataset: str, names: dict, negatives: int) -> None:
    papers = papers_results_for(names[k] for k in DOMAIN_KEYS)
    if papers is None:
        return
    same_split = dataset.lower().startswith("c2dsr")
    doc.heading(3, "Papers' numbers (reference, not our runs)")
    if not same_split:
        verdict = (
            f"**Different data: not comparable.** Our dataset is {dataset}; these numbers are on the papers' C2DSR "
            "split, with different items, users and split."
        )
    elif negatives != PAPERS_NEGATIVES:
        verdict = f"**Different protocol: not comparable.** Ours used {negatives} negatives, the papers {PAPERS_NEGATIVES}."
    else:
        verdict = "Same split and protocol as ours; features, hyperparameters and training data may still differ."
    doc.paragraph(f"Source: {PAPERS_SOURCE}. {verdict}")
    metrics = ("mrr", "ndcg_5", "ndcg_10")
    header = ["Model (paper)"] + [f"{METRIC_LABELS[m]} ({names[k]})" for k in DOMAIN_KEYS for m in metrics]
    rows = [[name] + [f"{v:.2f}" for part in values for v in part] for name, values in papers.items()]
    doc.table(header, rows)


def _figures(results: list[TrainResult], names: dict, out_dir: Path) -> list[tuple[Path, str]]:
    figures = []
    trained = [r for r in results if r.metrics["epochs_run"]]
    for r in trained:
        epochs = r.epochs()
        x = epochs["epoch"].to_list()
        fig, (loss_ax, mrr_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
        loss_ax.plot(x, epochs["train_loss"].to_list(), color="black")
        loss_ax.set(title=f"{r.name}: training loss", xlabel="epoch", ylabel="loss")
        for protocol, style in (("sampled", "-"), ("full", ":")):
            for key, color in zip(DOMAIN_KEYS, ("tab:blue", "tab:orange")):
                column = metric_column("valid", protocol, key, "mrr")
                mrr_ax.plot(x, (epochs[column] * 100).to_list(), style, color=color, label=f"{names[key]} ({protocol})")
        for ax in (loss_ax, mrr_ax):
            ax.axvline(r.metrics["best_checkpoint"]["epoch"], color="grey", linestyle="--", linewidth=1)
        mrr_ax.set(title=f"{r.name}: validation MRR (%)", xlabel="epoch", ylabel="MRR %")
        mrr_ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"curves_{_slug(r.name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((path, f"{r.name}: training loss and validation MRR"))
    if len(trained) > 1:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in trained:
            epochs = r.epochs()
            ax.plot(epochs["epoch"].to_list(), (epochs["valid_sampled_mean_mrr"] * 100).to_list(), label=r.name)
        ax.set(title="Validation mean MRR (%), sampled protocol", xlabel="epoch", ylabel="MRR %")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "validation_mrr.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((path, "Validation mean MRR of every trained run"))
    return figures


def _in_table_order(results: list[TrainResult], group: str) -> list[TrainResult]:
    """An ablation table's runs in the paper's row order (the order of :func:`plan_runs`),
    each row's extra runs (seeds, single-domain users) after it."""
    if group not in ABLATION_GROUPS:  # a group of the caller's own keeps the runs' order
        return list(results)
    order = {spec.name: index for index, spec in enumerate(plan_runs([], [group]))}

    def position(result: TrainResult) -> tuple[int, str]:
        row = without_seed(result.name).removesuffix(SINGLE_DOMAIN_SUFFIX)
        return order.get(row, len(order)), result.name

    return sorted(results, key=position)


def _same_runs(results: list[TrainResult]) -> dict[str, str]:
    """Rows that are the same run as an earlier row (the identity the trainer recorded:
    config, precision and a digest of every input file), by name: which earlier row each one is."""
    first: dict[str, str] = {}
    same = {}
    for r in results:
        earlier = first.setdefault(r.metrics["identity"], r.name)
        if earlier != r.name:
            same[r.name] = earlier
    return same


def _ablation_table(results: list[TrainResult], names: dict) -> tuple[list[str], list[list[str]]]:
    # the validation MRR that selected each row's checkpoint: the variants are compared
    # on it first (a test difference within the seed spread is not a result)
    header = ["Variant", "Towers", "Sequences", "Tag matrix", "Valid mean MRR (selection)"] + [
        f"MRR {names[k]} ({p})" for p in ("sampled", "full") for k in DOMAIN_KEYS
    ]
    rows = []
    same = _same_runs(results)
    for r in results:
        m = r.metrics
        protocol = r.config.selection_protocol
        valid = statistics.fmean(m["best_checkpoint"]["valid"][k][protocol]["mrr"] for k in DOMAIN_KEYS)
        sampled = [m["per_domain_best"]["sampled"][k]["test"]["mrr"] for k in DOMAIN_KEYS]
        full = [m["best_checkpoint"]["test"][k]["full"]["mrr"] for k in DOMAIN_KEYS]
        tag_source = m["features"]["provenance"].get("tag", "-") if "tag" in m["model_summary"]["towers"] else "-"
        rows.append(
            [r.name + (f" (the same run as {same[r.name]})" if r.name in same else ""), ", ".join(m["model_summary"]["towers"]), "+".join(m["model_summary"]["views"]), tag_source]
            + [f"{_percent(valid)} ({protocol})"]
            + [_percent(v) for v in sampled + full]
        )
    header[-4:] = [h + (" papers' rule" if "sampled" in h else " best ckpt") for h in header[-4:]]
    return header, rows
