"""Compare the runs of two sources by name: a report's ``metrics.json`` (its ``runs``)
or a storage's training cache (``<storage>/cache/training/*/metrics.json``). With one
source, its finished runs alone (``--names``: these, in this order), for instance the
rows of an ablation table whose asset has not finished every row yet. Runs of a training
cache that share a name are named by their cache folder (``tema-llm-<identity>``).

    python scripts/compare_runs.py results/llmcdsr-food-kitchen/metrics.json ~/cdsr-release/food-kitchen \\
        --labels "AMD EPYC" "Intel Xeon" --markdown
    python scripts/compare_runs.py ~/cdsr-release/food-kitchen --names "TEMA T4: original" "TEMA T4: +LLM matching"

For each run present in both: the CPU it trained on, epochs run, best epoch, the
validation mean MRR that selection saw (sampled protocol) and the test MRR of the best
checkpoint per domain under both protocols, side by side, with the differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def load_runs(source: Path) -> dict[str, dict]:
    """Runs by name; in a training cache, runs that share a name (one asset's run trained
    again under other settings: "TEMA-LLM" with another tau) by their cache folder's name
    (``tema-llm-<identity>``), so that none hides another."""
    if source.is_file():
        return {run["name"]: run for run in json.loads(source.read_text())["runs"]}
    found = [(path.parent.name, json.loads(path.read_text())) for path in sorted((source / "cache" / "training").glob("*/metrics.json"))]
    names = Counter(metrics["name"] for _, metrics in found)
    return {metrics["name"] if names[metrics["name"]] == 1 else folder: metrics for folder, metrics in found}


def _row(metrics: dict) -> dict[str, float | int | str]:
    best = metrics["best_checkpoint"]
    valid = [best["valid"][d]["sampled"]["mrr"] for d in ("A", "B")]
    row: dict[str, float | int | str] = {
        "cpu": (metrics.get("hardware") or {}).get("cpu", "?"),
        "epochs": metrics["epochs_run"],
        "best epoch": best["epoch"],
        "valid MRR (mean, sampled)": 100 * sum(valid) / 2,
    }
    for protocol in ("sampled", "full"):
        for domain in ("A", "B"):
            row[f"test MRR {domain} {protocol}"] = 100 * best["test"][domain][protocol]["mrr"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path, nargs="?", help="absent: the first source's runs alone")
    parser.add_argument("--labels", nargs=2, default=["first", "second"])
    parser.add_argument("--names", nargs="+", help="only these runs, in this order")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    for source in filter(None, (args.first, args.second)):
        if not source.exists():
            print(f"error: {source}: no such file or storage folder", file=sys.stderr)
            return 2
    first = load_runs(args.first)
    second = load_runs(args.second) if args.second else None
    names = [name for name in first if second is None or name in second]
    if args.names:
        absent = [name for name in args.names if name not in names]
        if absent:
            print(f"error: no finished run named {', '.join(map(repr, absent))} in {'both sources' if second else args.first}; "
                  f"runs: {', '.join(map(repr, names))}", file=sys.stderr)
            return 2
        names = args.names
    if not names:
        print("no run is in both sources" if second else f"no finished run in {args.first}", file=sys.stderr)
        return 2
    columns = list(_row(first[names[0]]))
    print("| run | " + " | ".join(f"{c}" for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        a = _row(first[name])
        b = _row(second[name]) if second is not None else None
        cells = []
        for column in columns:
            x = a[column]
            if b is None:
                cells.append(f"{x:.2f}" if isinstance(x, float) else f"{x}")
            elif isinstance(x, float):
                cells.append(f"{x:.2f} / {b[column]:.2f} ({b[column] - x:+.2f})")
            else:
                cells.append(f"{x} / {b[column]}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n(each cell: {args.labels[0]} / {args.labels[1]} (difference); MRR in %)" if second else "\n(MRR in %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
