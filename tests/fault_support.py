"""Killing ``cdsr run`` at a chosen stage: the machinery of the kill tests and of
``scripts/fault_campaign.py``.

A stage is being built while its asset's lock file (``<storage>/locks/<asset>.lock``)
names a holder: the run holds it around the cache check and the build. A kill waits
for that, lets the stage work for a while, and SIGKILLs the run's whole process group
(no handler runs, nothing is flushed: a power cut as far as the storage can tell).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from cdsr_pipeline.data.sources import demo_data_dir
from cdsr_pipeline.storage import ArtifactStore


TRAINING = "{epochs: 4, patience: 4, hidden_dim: 32, batch_size: 64, num_negatives: 50, num_threads: 1}"
CHEAP_CONFIG = f"""
ops:
  sasrec_model: {{config: {TRAINING}}}
  popularity_model: {{config: {TRAINING}}}
"""
"""Run config of the cheap selections of the demo (two small trainings)."""


def demo_run_args(source: Path, assets: list[str], config: Path) -> list[str]:
    return ["--select", ",".join(assets), "--source-format", "llmcdsr", "--source-path", str(source), "--domains", "Food,Kitchen",
            "--config", str(config)]


def cheap_demo_run_args(work: Path, assets: list[str]) -> list[str]:
    """``cdsr run`` arguments for ``assets`` on a copy of the demo in ``work``, trained with :data:`CHEAP_CONFIG`."""
    source = work / "llmcdsr-food-kitchen-sample"
    shutil.copytree(demo_data_dir(), source, ignore=shutil.ignore_patterns("SOURCE.md"))
    config = work / "config.yaml"
    config.write_text(CHEAP_CONFIG)
    return demo_run_args(source, assets, config)


@dataclass
class RunOutcome:
    returncode: int | None  # None: killed
    output: str
    held: dict[str, float]  # asset -> seconds its lock was seen held
    killed_in: list[str]  # assets being built when the run was killed


def cdsr_run_command(storage: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cdsr_pipeline.cli", "run", "--storage", str(storage), *args]


def _held_locks(storage: Path) -> set[str]:
    folder = storage / "locks"
    held = set()
    if folder.is_dir():
        for path in folder.glob("*.lock"):
            try:
                if path.read_text():
                    held.add(path.stem)
            except OSError:
                pass
    return held


def run_and_maybe_kill(
    storage: Path,
    args: list[str],
    *,
    kill_in: str | None = None,
    kill_on_output: str | None = None,
    after_s: float = 0.0,
    timeout_s: float = 900.0,
    poll_s: float = 0.02,
) -> RunOutcome:
    """Run ``cdsr run``; with ``kill_in``, SIGKILL it ``after_s`` seconds after that
    asset's lock is first seen held (or let it finish if the asset never starts); with
    ``kill_on_output`` (a regular expression), ``after_s`` seconds after the run's output
    first matches it.
    Records how long each asset's lock was seen held (the stage times of a reference run)."""
    env = {name: value for name, value in os.environ.items() if name != "DAGSTER_HOME"}
    log = storage.parent / f"{storage.name}.run-{time.time_ns()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            cdsr_run_command(storage, args), stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        first_seen: dict[str, float] = {}
        last_seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        kill_at: float | None = None
        killed_in: list[str] = []

        def held() -> dict[str, float]:
            return {asset: last_seen[asset] - first_seen[asset] for asset in first_seen}

        try:
            while process.poll() is None:
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"cdsr run {args} did not finish in {timeout_s} s; see {log}")
                current = _held_locks(storage)
                for asset in current:
                    first_seen.setdefault(asset, now)
                    last_seen[asset] = now
                if kill_in is not None and kill_at is None and kill_in in current:
                    kill_at = now + after_s
                if kill_on_output is not None and kill_at is None and re.search(kill_on_output, log.read_text(errors="replace")):
                    kill_at = now + after_s
                if kill_at is not None and now >= kill_at:
                    killed_in = sorted(current - {"llm_calls", "dagster_instance"})
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    return RunOutcome(None, log.read_text(), held(), killed_in)
                time.sleep(poll_s)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return RunOutcome(process.returncode, log.read_text(), held(), [])


def _without_timing(value):
    if isinstance(value, dict):
        return {key: _without_timing(item) for key, item in value.items() if key != "timing"}
    if isinstance(value, list):
        return [_without_timing(item) for item in value]
    return value


def artifact_states(storage: Path, assets: list[str]) -> dict[str, object]:
    """What must not change when a run is interrupted, per asset, after checking its files
    against its manifest: the data version (a hash of the files); for trained models and
    the report, whose files hold wall times and absolute paths, their metrics without the
    timings (every metric of every epoch, the selected checkpoint, the negatives' digests)."""
    store = ArtifactStore(storage)
    states: dict[str, object] = {}
    for asset in assets:
        manifest = store.read_manifest(asset)
        if manifest is None:
            states[asset] = None
            continue
        problem = store.damage(asset, manifest)
        assert problem is None, f"lost data: {asset} claims to be complete but {problem}"
        folder = store.asset_dir(asset)
        metrics = sorted(folder.rglob("metrics.json"))
        states[asset] = (
            {str(path.relative_to(folder)): _without_timing(json.loads(path.read_text())) for path in metrics}
            if metrics
            else manifest.data_version
        )
    return states


def recorded_calls(storage: Path) -> dict[str, tuple]:
    """key -> (raw answer, status, attempts, latency) of every call in the storage's call log."""
    path = storage / "cache" / "llm_calls.duckdb"
    if not path.exists():
        return {}
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT key, raw_answer, status, attempts, latency_s FROM llm_calls").fetchall()
    return {key: tuple(rest) for key, *rest in rows}


def half_built_files(storage: Path) -> list[Path]:
    """Staged versions left behind (the next run clears them; none may be read as complete)."""
    staging = storage / "artifacts" / ".staging"
    return sorted(staging.iterdir()) if staging.is_dir() else []
