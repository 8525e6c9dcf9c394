"""Concurrent runs on one storage root: one writer per asset and per call log, the
other waits (told who holds the lock) and then reuses what the first one built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cdsr_pipeline.storage import ArtifactStore, StorageLockTimeout, exclusive_lock

HOLD = """
import sys, time
from pathlib import Path
from cdsr_pipeline.storage import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), "the holder test"):
    print("held", flush=True)
    time.sleep(600)
"""


def _cdsr_run(storage: Path, source: Path, select: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cdsr_pipeline.cli", "run", "--storage", str(storage), "--select", select]
    command += ["--source-format", "llmcdsr", "--source-path", str(source)]
    env = {name: value for name, value in os.environ.items() if name != "DAGSTER_HOME"}  # no run history needed
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_a_lock_names_its_holder_times_out_and_dies_with_a_killed_holder(tmp_path):
    path = tmp_path / "locks" / "asset.lock"
    path.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        notices: list[str] = []
        with pytest.raises(StorageLockTimeout, match=rf"held by pid {holder.pid} on .*the holder test"):
            with exclusive_lock(path, "the waiter", on_wait=notices.append, timeout=1.0):
                pass
        assert len(notices) == 1 and f"pid {holder.pid}" in notices[0]
        holder.send_signal(signal.SIGKILL)  # no cleanup: the kernel drops the lock
        holder.wait(timeout=30)
        started = time.monotonic()
        with exclusive_lock(path, "the waiter", timeout=10.0):
            assert "the waiter" in path.read_text()
        assert time.monotonic() - started < 5
        assert path.read_text() == ""  # nobody holds it now
    finally:
        holder.kill()


def test_a_run_waits_for_the_writer_of_an_asset_and_says_who_it_is(tmp_path, demo_copy):
    storage = tmp_path / "storage"
    store = ArtifactStore(storage)
    notice = f"waiting for raw_interactions.lock: held by pid {os.getpid()}"
    lines: list[str] = []
    waiting = threading.Event()

    def read(stream) -> None:
        for line in stream:
            lines.append(line)
            if notice in line:
                waiting.set()

    with store.lock("raw_interactions", "a test holding raw_interactions"):
        run = _cdsr_run(storage, demo_copy, "raw_interactions")
        reader = threading.Thread(target=read, args=(run.stdout,), daemon=True)
        reader.start()
        # held until the run has reached the asset and said whom it waits for (however slow its start)
        assert waiting.wait(timeout=300), "".join(lines)
        assert run.poll() is None, "".join(lines)
    run.wait(timeout=300)
    reader.join(timeout=10)
    output = "".join(lines)
    assert run.returncode == 0, output
    assert "a test holding raw_interactions" in output


def test_two_runs_at_once_build_each_asset_once_and_both_succeed(tmp_path, demo_copy):
    storage = tmp_path / "storage"
    runs = [_cdsr_run(storage, demo_copy, "raw_interactions,cdsr_sequences") for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    for asset in ("raw_interactions", "cdsr_sequences"):
        built = sum(f"{asset}: inputs, config and code unchanged" not in output for output in outputs)
        assert built == 1, f"{asset} built by {built} runs"
        manifest = json.loads((storage / "artifacts" / asset / "manifest.json").read_text())
        assert manifest["asset"] == asset
    assert not any((storage / "artifacts" / ".staging").iterdir())  # no half-built version left
