"""Mean ± standard deviation over seeds of runs gathered from several reports'
``metrics.json``, for runs that were trained where the others' storage was gone (a
report's own seeds table only sees one storage's runs).

    python scripts/seed_table.py results/llmcdsr-food-kitchen/metrics.json \\
        --add results/llmcdsr-food-kitchen/2026-12-07-fp32/metrics.json "TEMA-LLM" "TEMA-LLM (seed 2)" \\
        --add results/llmcdsr-food-kitchen/2026-12-07-fp32/metrics.json "SASRec" "SASRec (seed 0, fp32)" \\
        --reference SASRec

``--add REPORT RUN AS`` takes run ``RUN`` of another report's ``metrics.json`` (the runs
its ``evaluation_report`` read, not every run a training cache holds) under the name ``AS``: a name
ending in ``(seed N)`` joins that model's seed group; a run that repeats a seed already
present (the same seed in another precision or on another CPU) is named with what
differs, and is counted only with ``--include``. Each row says how many runs it holds and
their precisions and CPU capabilities, so numbers of different precision are never mixed
silently. MRR in %, best validation checkpoint (selection on validation only).

``--plot FILE.png`` also draws the table: one panel per domain and protocol, a row per
model, every run a dot (hollow where its precision or CPU differs from the model's first
run's) and its mean ± sd as a bar, so what a seed moves and what a model moves can be
seen side by side. ``--title`` heads it (say the dataset and split); ``--plot-models`` picks
the rows to draw, top first (default: every row of the table).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from compare_runs import load_runs  # noqa: E402

from cdsr_pipeline.model.runs import without_seed  # noqa: E402
from cdsr_pipeline.storage import atomic_target  # noqa: E402

COLUMNS = [("A", "sampled"), ("B", "sampled"), ("A", "full"), ("B", "full")]
_SEED = re.compile(r" \(seed (\d+)[^)]*\)$")


def group_name(name: str) -> str:
    """The model a run belongs to: its name without any ``(seed ...)`` suffix."""
    return _SEED.sub("", name)


def test_mrr(run: dict, domain: str, protocol: str) -> float:
    return 100 * run["best_checkpoint"]["test"][domain][protocol]["mrr"]


def describe(run: dict) -> str:
    hardware = run.get("hardware") or {}
    return f"{run.get('precision', '?')}/{hardware.get('torch_cpu_capability', '?')}"


def seed_rows(runs: dict[str, dict], include: set[str]) -> list[tuple[str, list[dict], list[tuple[float, float]]]]:
    """Per model: its runs (each seed once, plus the ``include``d repeats) and (mean, sd) per column."""
    groups: dict[str, list[dict]] = {}
    for name, run in runs.items():
        repeat = _SEED.search(name) is not None and without_seed(name) == name  # "(seed 0, fp32)"
        # a repeat of a seed under other conditions is a row of its own unless included
        groups.setdefault(name if repeat and name not in include else group_name(name), []).append(run)
    rows = []
    for model, group in groups.items():
        stats = []
        for domain, protocol in COLUMNS:
            values = [test_mrr(run, domain, protocol) for run in group]
            stats.append((statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")))
        rows.append((model, group, stats))
    return rows


LABELS = ["Food sampled", "Kitchen sampled", "Food full", "Kitchen full"]


def plot(rows, path: Path, title: str) -> None:
    """The seed table as dots (runs) and bars (mean ± sd), one panel per column, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = rows[::-1]  # the table's first row at the top
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.3 * len(COLUMNS), 0.55 * len(rows) + 1.6), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, (ax, (domain, protocol), label) in enumerate(zip(axes, COLUMNS, LABELS, strict=True)):
        for y, (model, group, stats) in enumerate(order):
            color = colors[(len(order) - 1 - y) % len(colors)]
            mean, sd = stats[panel]
            if len(group) > 1:
                ax.errorbar(mean, y, xerr=sd, fmt="|", color=color, markersize=14, capsize=3, lw=1.5)
            first = describe(group[0])
            for k, run in enumerate(group):
                jitter = (k - (len(group) - 1) / 2) * 0.08
                same = describe(run) == first
                ax.plot(test_mrr(run, domain, protocol), y + jitter, "o", ms=5,
                        color=color, markerfacecolor=color if same else "none")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("test MRR (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(order)), [f"{model} (n={len(group)})" for model, group, _ in order])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_target(path) as temporary:
            fig.savefig(temporary, dpi=110, format="png")
    finally:
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report's metrics.json")
    parser.add_argument("--add", nargs=3, action="append", default=[], metavar=("REPORT", "RUN", "AS"))
    parser.add_argument("--include", action="append", default=[], help="count this renamed repeat in its model's mean")
    parser.add_argument("--reference", help="the model whose mean the others are divided by")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the table: a dot per run, mean ± sd per model")
    parser.add_argument("--title", default="Test MRR over seeds (best validation checkpoint)", help="the plot's title")
    parser.add_argument("--plot-models", nargs="+", metavar="MODEL", help="the table's rows to draw, top first (default: all)")
    args = parser.parse_args()
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        print(f"{args.plot}: the plot is written as PNG: give a .png file name", file=sys.stderr)
        return 2
    runs = load_runs(args.report)
    for source, run, name in args.add:
        if not Path(source).expanduser().is_file():
            print(f"{source}: not a report's metrics.json", file=sys.stderr)
            return 2
        found = load_runs(Path(source).expanduser())
        if run not in found:
            print(f"{source}: no run {run!r} (it has {sorted(found)})", file=sys.stderr)
            return 2
        if name in runs:
            print(f"{name!r} is already in {args.report}: name the added run otherwise", file=sys.stderr)
            return 2
        runs[name] = dict(found[run], name=name)
    rows = seed_rows(runs, set(args.include))
    reference = next((stats for model, _, stats in rows if model == args.reference), None)
    if args.reference and reference is None:
        print(f"no model {args.reference!r} among {[model for model, _, _ in rows]}", file=sys.stderr)
        return 2
    header = ["Model", "n", "runs (precision/CPU)"] + LABELS
    if reference:
        header += [f"x {args.reference} (sampled)", f"x {args.reference} (full)"]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---|" + "---:|" * (len(header) - 3))
    for model, group, stats in rows:
        cells = [f"{m:.2f} ± {s:.2f}" if len(group) > 1 else f"{m:.2f}" for m, s in stats]
        kinds = ", ".join(sorted({describe(run) for run in group}))
        line = [model, str(len(group)), kinds] + cells
        if reference:
            ratios = [stats[i][0] / reference[i][0] for i in range(4)]
            line += [f"{ratios[0]:.2f}x / {ratios[1]:.2f}x", f"{ratios[2]:.2f}x / {ratios[3]:.2f}x"]
        print("| " + " | ".join(line) + " |")
    print("\n(mean ± sample standard deviation of test MRR in % over the runs counted; Food = domain A, Kitchen = B)")
    if args.plot is not None:
        by_model = {model: (model, group, stats) for model, group, stats in rows}
        unknown = [model for model in args.plot_models or [] if model not in by_model]
        if unknown:
            print(f"--plot-models: no row {unknown[0]!r} (rows: {', '.join(by_model)})", file=sys.stderr)
            return 2
        try:
            plot([by_model[model] for model in args.plot_models] if args.plot_models else rows, args.plot, args.title)
        except OSError as error:
            print(f"{args.plot}: cannot write the plot: {error.strerror or error}", file=sys.stderr)
            return 2
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
