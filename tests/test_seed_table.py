"""scripts/seed_table.py: seeds gathered from several reports' metrics.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seed_table.py"


def _run(name: str, mrr: float, precision: str = "bf16", capability: str = "AVX512") -> dict:
    cell = {"mrr": mrr, "ndcg_5": 0.0, "ndcg_10": 0.0, "hr_10": 0.0}
    test = {domain: {"sampled": dict(cell), "full": dict(cell, mrr=mrr / 3)} for domain in ("A", "B")}
    return {
        "name": name,
        "precision": precision,
        "hardware": {"cpu": "AMD EPYC", "torch_cpu_capability": capability},
        "best_checkpoint": {"epoch": 3, "test": test, "valid": test},
        "epochs_run": 5,
    }


def _table(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"runs": [_run("TEMA-LLM", 0.24), _run("TEMA-LLM (seed 1)", 0.26), _run("SASRec", 0.20)]}))
    (tmp_path / "other.json").write_text(json.dumps({"runs": [_run("TEMA-LLM", 0.28, "fp32", "AVX2")]}))
    command = [sys.executable, str(SCRIPT), str(report), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=SCRIPT.parents[1])


def _row(output: str, model: str) -> list[str]:
    return next(line.split(" | ") for line in output.splitlines() if line.startswith(f"| {model} |"))


def test_a_seed_from_a_storage_joins_its_model_and_says_its_precision(tmp_path):
    done = _table(tmp_path, "--add", str(tmp_path / "other.json"), "TEMA-LLM", "TEMA-LLM (seed 2)", "--reference", "SASRec")
    assert done.returncode == 0, done.stderr
    row = _row(done.stdout, "TEMA-LLM")
    assert row[1:3] == ["3", "bf16/AVX512, fp32/AVX2"]
    assert row[3] == "26.00 ± 2.00"  # 24, 26, 28
    assert row[-2] == "1.30x / 1.30x"  # 26 / 20


def test_a_repeated_seed_is_its_own_row_unless_included(tmp_path):
    name = "TEMA-LLM (seed 0, fp32)"
    alone = _table(tmp_path, "--add", str(tmp_path / "other.json"), "TEMA-LLM", name)
    assert _row(alone.stdout, "TEMA-LLM")[1] == "2" and _row(alone.stdout, name)[1] == "1"
    counted = _table(tmp_path, "--add", str(tmp_path / "other.json"), "TEMA-LLM", name, "--include", name)
    assert _row(counted.stdout, "TEMA-LLM")[1] == "3" and f"| {name} |" not in counted.stdout


def test_bad_arguments_are_one_line(tmp_path):
    missing = _table(tmp_path, "--add", str(tmp_path / "other.json"), "GRU4Rec", "GRU4Rec (seed 1)")
    assert missing.returncode == 2 and "no run 'GRU4Rec'" in missing.stderr and "Traceback" not in missing.stderr
    taken = _table(tmp_path, "--add", str(tmp_path / "other.json"), "TEMA-LLM", "TEMA-LLM (seed 1)")
    assert taken.returncode == 2 and "already in" in taken.stderr
    folder = _table(tmp_path, "--add", str(tmp_path), "TEMA-LLM", "TEMA-LLM (seed 2)")
    assert folder.returncode == 2 and "not a report's metrics.json" in folder.stderr


def test_the_plot_is_a_png_of_the_rows_asked_for(tmp_path):
    figure = tmp_path / "figures" / "seeds.png"
    done = _table(tmp_path, "--plot", str(figure), "--plot-models", "TEMA-LLM", "SASRec", "--title", "demo")
    assert done.returncode == 0, done.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in figure.parent.iterdir()] == ["seeds.png"]  # no temporary file left
    unknown = _table(tmp_path, "--plot", str(figure), "--plot-models", "GRU4Rec")
    assert unknown.returncode == 2 and "no row 'GRU4Rec'" in unknown.stderr and "Traceback" not in unknown.stderr
    not_png = _table(tmp_path, "--plot", str(tmp_path / "seeds.pdf"))
    assert not_png.returncode == 2 and "give a .png file name" in not_png.stderr
