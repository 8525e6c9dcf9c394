"""Run a long ``cdsr run`` in time slices, exporting the LLM answers after each slice.

For machines where a working session can stop at any time (and a fresh checkout
may not see the previous session's storage): every ``--slice-minutes`` the run is
interrupted (SIGINT, then SIGKILL after a grace period; the call log commits every
64 calls, so at most one chunk is asked again), the call log is exported per stage
with ``cdsr llm-log export`` into ``--export-dir`` (files that can be committed),
and the run is started again; it resumes from the call log. The loop ends when the
run succeeds, fails on its own, or ``--max-hours`` have passed.

Resuming on a machine without the storage: ``cdsr llm-log import`` each exported file
into a new storage first; nothing recorded is asked again.

    python scripts/sliced_run.py --storage ~/cdsr-release/food-kitchen \\
        --export-dir results/llmcdsr-food-kitchen/llm_answers -- \\
        --select '*item_tag_matrix' --source-format llmcdsr --source-path ../shared/data/llmcdsr-food-kitchen
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGE_FILES = {"augmentation": "augmentation.parquet", "vocabulary": "vocabulary.parquet", "tag_scores": "tag_scores.parquet"}


def cdsr() -> list[str]:
    return [sys.executable, "-m", "cdsr_pipeline.cli"]


def export(storage: Path, export_dir: Path) -> None:
    export_dir.mkdir(parents=True, exist_ok=True)
    for stage, name in STAGE_FILES.items():
        subprocess.run([*cdsr(), "llm-log", "export", str(export_dir / name), "--stage", stage, "--storage", str(storage)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, type=Path)
    parser.add_argument("--export-dir", required=True, type=Path)
    parser.add_argument("--slice-minutes", type=float, default=30.0)
    parser.add_argument("--grace-seconds", type=float, default=90.0)
    parser.add_argument("--max-hours", type=float, default=24.0)
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="arguments of `cdsr run` after --")
    args = parser.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    deadline = time.monotonic() + args.max_hours * 3600
    slice_no = 0
    while True:
        slice_no += 1
        command = [*cdsr(), "run", "--storage", str(args.storage), *run_args]
        print(f"[sliced_run] slice {slice_no}: {' '.join(command)}", flush=True)
        process = subprocess.Popen(command, start_new_session=True)
        try:
            code = process.wait(timeout=args.slice_minutes * 60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=args.grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = None
        export(args.storage, args.export_dir)
        if code is not None:
            print(f"[sliced_run] run ended with exit code {code} after {slice_no} slice(s)", flush=True)
            return code
        if time.monotonic() > deadline:
            print("[sliced_run] --max-hours reached; run again to continue", flush=True)
            return 3


if __name__ == "__main__":
    sys.exit(main())
