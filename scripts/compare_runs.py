"""Compare the runs of two sources by name: a report's ``metrics.json`` (its ``runs``)
or a storage's training cache (``<storage>/cache/training/*/metrics.json``).

    python scripts/compare_runs.py results/llmcdsr-food-kitchen/metrics.json ~/cdsr-release/food-kitchen \\
        --labels "AMD EPYC" "Intel Xeon" --markdown

For each run present in both: the CPU it trained on, epochs run, best epoch, the
validation mean MRR that selection saw (sampled protocol) and the test MRR of the best
checkpoint per domain under both protocols, side by side, with the differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_runs(source: Path) -> dict[str, dict]:
    if source.is_file():
        return {run["name"]: run for run in json.loads(source.read_text())["runs"]}
    runs = {}
    for path in sorted((source / "cache" / "training").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        runs[metrics["name"]] = metrics
    return runs


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
    parser.add_argument("second", type=Path)
    parser.add_argument("--labels", nargs=2, default=["first", "second"])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    first, second = load_runs(args.first), load_runs(args.second)
    names = [name for name in first if name in second]
    if not names:
        print("no run is in both sources", file=sys.stderr)
        return 2
    columns = list(_row(first[names[0]]))
    print("| run | " + " | ".join(f"{c}" for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        a, b = _row(first[name]), _row(second[name])
        cells = []
        for column in columns:
            x, y = a[column], b[column]
            if isinstance(x, float):
                cells.append(f"{x:.2f} / {y:.2f} ({y - x:+.2f})")
            else:
                cells.append(f"{x} / {y}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n(each cell: {args.labels[0]} / {args.labels[1]} (difference); MRR in %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
