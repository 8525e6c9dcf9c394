"""Every trained run of a storage's training cache, with what differs between them and
their validation MRR: the evidence behind a choice of hyperparameters.

Model assets keep one folder per (config, inputs) under ``<storage>/cache/training/``,
so each configuration a model asset was ever materialized with is there. Selection
uses validation only: the table shows validation MRR (both protocols, at the best
checkpoint) and no test number.

    python scripts/tuning_table.py --storage ~/cdsr-release/food-kitchen [--name SASRec]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

TUNED = ("hidden_dim", "dropout", "temperature", "num_layers", "learning_rate", "weight_decay", "batch_size",
         "max_len", "patience", "lambda1", "lambda2", "alpha", "train_user_domains", "loss_negatives")


def runs(storage: Path) -> list[dict]:
    rows = []
    for folder in sorted((storage / "cache" / "training").glob("*/")):
        config_file, epochs_file = folder / "config.json", folder / "epochs.parquet"
        if not (config_file.is_file() and epochs_file.is_file()):
            continue
        config = json.loads(config_file.read_text())["train_config"]
        flat = {**{k: v for k, v in config.items() if k != "model"}, **config["model"]}
        epochs = pl.read_parquet(epochs_file)
        best = epochs.sort(["valid_sampled_mean_mrr", "epoch"], descending=[True, False]).row(0, named=True)
        rows.append(
            {
                "run": config["name"],
                "folder": folder.name,
                "settings": {k: flat.get(k) for k in TUNED},
                "epochs": epochs.height,
                "best_epoch": best["epoch"],
                "valid_sampled_mrr": best["valid_sampled_mean_mrr"],
                "valid_full_mrr": best["valid_full_mean_mrr"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, type=Path)
    parser.add_argument("--name", help="only runs of this name (e.g. SASRec)")
    args = parser.parse_args()
    rows = [r for r in runs(args.storage) if not args.name or r["run"] == args.name]
    if not rows:
        raise SystemExit(f"no trained runs under {args.storage / 'cache' / 'training'}")
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["run"], []).append(row)
    for name, group in by_name.items():
        varying = [k for k in TUNED if len({json.dumps(r["settings"][k]) for r in group}) > 1]
        print(f"\n{name}: {len(group)} run(s); validation MRR (mean of the two domains) at the best epoch")
        header = ["settings" if not varying else ", ".join(varying), "epochs", "best", "valid MRR sampled", "valid MRR full"]
        print(" | ".join(header))
        for r in sorted(group, key=lambda r: -r["valid_sampled_mrr"]):
            label = ", ".join(f"{k}={r['settings'][k]}" for k in varying) or "(defaults)"
            print(f"{label} | {r['epochs']} | {r['best_epoch']} | {r['valid_sampled_mrr']:.4f} | {r['valid_full_mrr']:.4f}")


if __name__ == "__main__":
    main()
