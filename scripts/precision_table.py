"""fp32 against bf16: the validation MRR of every epoch of runs that differ only in precision.

Model assets keep one folder per (config, inputs) under ``<storage>/cache/training/``,
and a run's precision is part of its identity, so materializing a model once with
``precision: fp32`` and once with ``precision: bf16`` (or ``auto`` on a CPU with
AVX-512 BF16) leaves both runs there, trained from the same seed on the same batches.
This prints, per pair, the epochs both have run: validation MRR (both protocols) of
each precision, their difference, and the mean training seconds per epoch of each.
Validation only: no test number is shown.

    python scripts/precision_table.py --storage ~/cdsr-release/food-kitchen [--name SASRec] [--markdown out.md]

``--fp32-from REPORT NAME`` takes the fp32 side from a published report instead (its
``metrics.json`` keeps each run's per-epoch validation curve), for a pair trained in two
storages, on two machines: the run NAME of REPORT against each bf16 run of the storage
with the same config but for the name and ablation group (for instance TEMA Table IV's
last row, which is TEMA-LLM). The report has no per-epoch training seconds; its mean is shown.

    python scripts/precision_table.py --storage ~/cdsr-release/food-kitchen \\
        --fp32-from results/llmcdsr-food-kitchen/2026-12-07-fp32/metrics.json TEMA-LLM
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

IGNORED = ("epochs", "patience", "device", "num_threads", "progress", "precision")
NAMING = ("name", "ablation_group")  # what a run is called, not what it computes


def _key(config: dict, ignored: tuple[str, ...] = IGNORED) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in ignored}, sort_keys=True)


def _runs(storage: Path) -> list[dict]:
    rows = []
    for folder in sorted((storage / "cache" / "training").glob("*/")):
        config_file, epochs_file = folder / "config.json", folder / "epochs.parquet"
        if not (config_file.is_file() and epochs_file.is_file()):
            continue
        recorded = json.loads(config_file.read_text())
        config = recorded["train_config"]
        rows.append(
            {
                "name": config["name"],
                "precision": recorded.get("precision", "fp32"),  # runs from before precision was configurable: fp32
                "key": _key(config),
                "unnamed_key": _key(config, IGNORED + NAMING),
                "epochs": pl.read_parquet(epochs_file),
            }
        )
    return rows


def report_run(report: Path, name: str) -> dict:
    """The run ``name`` of a report's ``metrics.json``, its curve as an epochs table."""
    runs = {run["name"]: run for run in json.loads(report.read_text())["runs"]}
    if name not in runs:
        raise SystemExit(f"{report}: no run named {name!r}; runs: {', '.join(map(repr, runs))}")
    run = runs[name]
    if "curve" not in run:
        raise SystemExit(f"{report}: run {name!r} has no per-epoch curve (reports from 2026-12-07 on keep it)")
    curve = pl.DataFrame(run["curve"])
    epochs = curve.select(
        "epoch",
        ((pl.col("valid_sampled_A_mrr") + pl.col("valid_sampled_B_mrr")) / 2).alias("valid_sampled_mean_mrr"),
        ((pl.col("valid_full_A_mrr") + pl.col("valid_full_B_mrr")) / 2).alias("valid_full_mean_mrr"),
        pl.lit(run["timing"]["mean_train_seconds"]).alias("train_seconds"),
    )
    return {"name": name, "precision": run["precision"], "unnamed_key": _key(run["config"], IGNORED + NAMING), "epochs": epochs}


def pair_table(fp32: pl.DataFrame, bf16: pl.DataFrame) -> pl.DataFrame:
    columns = ["epoch", "valid_sampled_mean_mrr", "valid_full_mean_mrr", "train_seconds"]
    joined = fp32.select(columns).join(bf16.select(columns), on="epoch", suffix="_bf16").sort("epoch")
    return joined.with_columns(
        (pl.col("valid_sampled_mean_mrr_bf16") - pl.col("valid_sampled_mean_mrr")).alias("diff_sampled"),
        (pl.col("valid_full_mean_mrr_bf16") - pl.col("valid_full_mean_mrr")).alias("diff_full"),
    )


def format_pair(name: str, table: pl.DataFrame, timing_note: str = "") -> str:
    lines = [
        f"### {name}: fp32 vs bf16, same seed, {table.height} epochs",
        "",
        "| epoch | valid sampled MRR fp32 | bf16 | diff | valid full MRR fp32 | bf16 | diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.iter_rows(named=True):
        lines.append(
            f"| {row['epoch']} | {row['valid_sampled_mean_mrr']:.4f} | {row['valid_sampled_mean_mrr_bf16']:.4f} | "
            f"{row['diff_sampled']:+.4f} | {row['valid_full_mean_mrr']:.4f} | {row['valid_full_mean_mrr_bf16']:.4f} | "
            f"{row['diff_full']:+.4f} |"
        )
    best32 = table.sort("valid_sampled_mean_mrr", descending=True).row(0, named=True)
    best16 = table.sort("valid_sampled_mean_mrr_bf16", descending=True).row(0, named=True)
    lines += [
        "",
        f"- largest |diff| of the sampled validation MRR: {table['diff_sampled'].abs().max():.4f} "
        f"(mean diff {table['diff_sampled'].mean():+.4f}); full: {table['diff_full'].abs().max():.4f} "
        f"(mean {table['diff_full'].mean():+.4f})",
        f"- best epoch within these epochs: fp32 {best32['epoch']} ({best32['valid_sampled_mean_mrr']:.4f}), "
        f"bf16 {best16['epoch']} ({best16['valid_sampled_mean_mrr_bf16']:.4f})",
        f"- training seconds per epoch (mean): fp32 {table['train_seconds'].mean():.1f}, "
        f"bf16 {table['train_seconds_bf16'].mean():.1f} "
        f"({table['train_seconds'].mean() / table['train_seconds_bf16'].mean():.2f}x){timing_note}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, type=Path)
    parser.add_argument("--name", help="only runs of this name (e.g. SASRec)")
    parser.add_argument("--fp32-from", nargs=2, metavar=("REPORT", "NAME"), help="the fp32 run: NAME of REPORT's metrics.json")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    runs = [r for r in _runs(args.storage) if not args.name or r["name"] == args.name]
    sections = []
    if args.fp32_from:
        reference = report_run(Path(args.fp32_from[0]), args.fp32_from[1])
        if reference["precision"] != "fp32":
            raise SystemExit(f"{args.fp32_from[0]}: run {args.fp32_from[1]!r} trained in {reference['precision']}, not fp32")
        for run in runs:
            if run["precision"] == "bf16" and run["unnamed_key"] == reference["unnamed_key"]:
                table = pair_table(reference["epochs"], run["epochs"])
                if table.height:
                    name = f"{reference['name']} (fp32, {args.fp32_from[0]}) and {run['name']} (bf16)"
                    sections.append(format_pair(name, table, "; two trainings, perhaps on two machines: not a speed comparison"))
    else:
        for key in dict.fromkeys(r["key"] for r in runs):
            by_precision = {r["precision"]: r for r in runs if r["key"] == key}
            if {"fp32", "bf16"} <= set(by_precision):
                table = pair_table(by_precision["fp32"]["epochs"], by_precision["bf16"]["epochs"])
                if table.height:
                    sections.append(format_pair(by_precision["fp32"]["name"], table))
    if not sections:
        raise SystemExit(f"no pair of runs differing only in precision under {args.storage / 'cache' / 'training'}"
                         + (f" and in {args.fp32_from[0]}" if args.fp32_from else ""))
    text = "\n".join(sections)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
