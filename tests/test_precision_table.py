"""scripts/precision_table.py --fp32-from: a bf16 run of a storage against the fp32 curve of a published report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "precision_table.py"
CONFIG = {"model": {"modalities": ["id", "tag"]}, "seed": 2, "batch_size": 256, "epochs": 100, "patience": 20, "precision": "auto"}


def _bf16_run(storage: Path, name: str, sampled: list[float], **changes) -> None:
    folder = storage / "cache" / "training" / name.replace(" ", "-")
    folder.mkdir(parents=True)
    config = {**CONFIG, "name": name, "ablation_group": "tema_table4", "patience": 10, **changes}
    (folder / "config.json").write_text(json.dumps({"train_config": config, "precision": "bf16"}))
    pl.DataFrame(
        {
            "epoch": list(range(1, len(sampled) + 1)),
            "valid_sampled_mean_mrr": sampled,
            "valid_full_mean_mrr": [v / 4 for v in sampled],
            "train_seconds": [100.0] * len(sampled),
        }
    ).write_parquet(folder / "epochs.parquet")


def _report(path: Path) -> Path:
    curve = {
        "epoch": [1, 2, 3],
        "valid_sampled_A_mrr": [0.10, 0.20, 0.30],
        "valid_sampled_B_mrr": [0.12, 0.22, 0.32],
        "valid_full_A_mrr": [0.02, 0.04, 0.06],
        "valid_full_B_mrr": [0.04, 0.06, 0.08],
    }
    run = {"name": "TEMA-LLM", "precision": "fp32", "config": {**CONFIG, "name": "TEMA-LLM", "ablation_group": None},
           "timing": {"mean_train_seconds": 200.0}, "curve": curve}
    path.write_text(json.dumps({"runs": [run]}))
    return path


def _table(storage: Path, report: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--storage", str(storage), "--fp32-from", str(report), "TEMA-LLM"]
    return subprocess.run(command, capture_output=True, text=True)


def test_a_bf16_run_is_paired_with_the_reports_fp32_curve_of_the_same_config(tmp_path):
    storage = tmp_path / "storage"
    _bf16_run(storage, "TEMA T4: +multi-attention (TEMA-LLM)", [0.12, 0.20])
    _bf16_run(storage, "TEMA T4: other seed", [0.5, 0.5], seed=3)  # another config: not paired
    done = _table(storage, _report(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr
    assert "TEMA-LLM (fp32," in done.stdout and "TEMA T4: +multi-attention (TEMA-LLM) (bf16)" in done.stdout
    assert "other seed" not in done.stdout
    assert "| 1 | 0.1100 | 0.1200 | +0.0100 | 0.0300 | 0.0300 | +0.0000 |" in done.stdout
    assert "| 2 | 0.2100 | 0.2000 | -0.0100 |" in done.stdout and "| 3 |" not in done.stdout  # the epochs both ran
    assert "fp32 200.0, bf16 100.0 (2.00x); two trainings, perhaps on two machines" in done.stdout


def test_no_matching_run_or_name_is_a_clear_error(tmp_path):
    storage = tmp_path / "storage"
    _bf16_run(storage, "TEMA T4: other seed", [0.5], seed=3)
    report = _report(tmp_path / "metrics.json")
    done = _table(storage, report)
    assert done.returncode != 0 and "no pair of runs differing only in precision" in done.stderr
    wrong = subprocess.run(
        [sys.executable, str(SCRIPT), "--storage", str(storage), "--fp32-from", str(report), "SASRec"],
        capture_output=True, text=True,
    )
    assert wrong.returncode != 0 and "no run named 'SASRec'" in wrong.stderr
