"""scripts/compare_runs.py: runs of two sources side by side, or of one source alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def _metrics(name: str, mrr: float, epoch: int = 3) -> dict:
    cell = {"mrr": mrr, "ndcg_5": 0.0, "ndcg_10": 0.0, "hr_10": 0.0}
    split = {domain: {"sampled": dict(cell), "full": dict(cell, mrr=mrr / 4)} for domain in ("A", "B")}
    return {
        "name": name,
        "hardware": {"cpu": "Intel Xeon"},
        "epochs_run": epoch + 10,
        "best_checkpoint": {"epoch": epoch, "valid": split, "test": split},
    }


def _storage(root: Path, *runs: dict) -> Path:
    for index, run in enumerate(runs):
        folder = root / "cache" / "training" / f"run-{index}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(run))
    (root / "cache" / "training" / "unfinished").mkdir()  # a run still training has no metrics.json
    return root


def _compare(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_one_storage_lists_its_finished_runs_in_the_order_asked(tmp_path):
    storage = _storage(tmp_path / "s", _metrics("T4: original", 0.20, 7), _metrics("T4: +tags", 0.25, 9))
    done = _compare(storage, "--names", "T4: +tags", "T4: original")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| T4")]
    assert rows == [
        "| T4: +tags | Intel Xeon | 19 | 9 | 25.00 | 25.00 | 25.00 | 6.25 | 6.25 |",
        "| T4: original | Intel Xeon | 17 | 7 | 20.00 | 20.00 | 20.00 | 5.00 | 5.00 |",
    ]
    missing = _compare(storage, "--names", "T4: +LLM matching")
    assert missing.returncode == 2 and "no finished run named 'T4: +LLM matching'" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1


def test_two_sources_give_both_values_and_the_difference(tmp_path):
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"runs": [_metrics("SASRec", 0.20), _metrics("GRU4Rec", 0.18)]}))
    storage = _storage(tmp_path / "s", _metrics("SASRec", 0.22, 5))
    done = _compare(report, storage)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| SASRec")]
    assert "| 3 / 5 |" in row and "| 20.00 / 22.00 (+2.00) |" in row
    assert "GRU4Rec" not in done.stdout
    assert _compare(tmp_path / "nowhere").returncode == 2


def test_runs_of_a_storage_that_share_a_name_are_named_by_their_cache_folder(tmp_path):
    storage = _storage(tmp_path / "s", _metrics("TEMA-LLM", 0.20), _metrics("TEMA-LLM", 0.24), _metrics("SASRec", 0.18))
    done = _compare(storage, "--names", "run-1", "run-0", "SASRec")
    assert done.returncode == 0, done.stderr
    assert [line.split(" | ")[0] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:] == [
        "| run-1",
        "| run-0",
        "| SASRec",
    ]
    assert "| run-1 | Intel Xeon | 13 | 3 | 24.00 |" in done.stdout
    ambiguous = _compare(storage, "--names", "TEMA-LLM")
    assert ambiguous.returncode == 2 and "'run-0', 'run-1'" in ambiguous.stderr
