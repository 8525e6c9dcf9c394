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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report's metrics.json")
    parser.add_argument("--add", nargs=3, action="append", default=[], metavar=("REPORT", "RUN", "AS"))
    parser.add_argument("--include", action="append", default=[], help="count this renamed repeat in its model's mean")
    parser.add_argument("--reference", help="the model whose mean the others are divided by")
    args = parser.parse_args()
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
    labels = ["Food sampled", "Kitchen sampled", "Food full", "Kitchen full"]
    header = ["Model", "n", "runs (precision/CPU)"] + labels
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
