"""A full disk: one clear error naming the storage, nothing half-written taken as done,
and the same run succeeds once there is space (on a small tmpfs the test mounts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdsr_pipeline.storage import ArtifactStore, Manifest


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _cdsr_run(storage: Path, source: Path, dagster_home: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cdsr_pipeline.cli", "run", "--storage", str(storage)]
    command += ["--select", "raw_interactions,cdsr_sequences", "--source-format", "llmcdsr", "--source-path", str(source)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "DAGSTER_HOME": str(dagster_home)})


def _data_versions(storage: Path) -> dict[str, str]:
    return {
        asset: Manifest.from_json((storage / "artifacts" / asset / "manifest.json").read_text()).data_version
        for asset in ("raw_interactions", "cdsr_sequences")
    }


@pytest.mark.parametrize("dagster_home_on_it", [False, True], ids=["artifacts-fill-it", "dagster-sqlite-fills-it"])
def test_a_full_disk_is_one_clear_error_and_the_rerun_with_space_completes(small_disk, tmp_path, demo_copy, dagster_home_on_it):
    storage, grow = small_disk
    dagster_home = storage / "dagster" if dagster_home_on_it else tmp_path / "dagster"
    if dagster_home_on_it:
        grow("300k")  # room for the artifacts, not for Dagster's SQLite files

    failed = _cdsr_run(storage, demo_copy, dagster_home)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the disk of {storage} is full") and "run again" in last
    assert "Traceback" not in failed.stdout + failed.stderr
    store = ArtifactStore(storage)
    for asset in ("raw_interactions", "cdsr_sequences"):  # what exists is complete; nothing else claims to be
        manifest = store.read_manifest(asset)
        assert manifest is None or store.damage(asset, manifest) is None
    staging = storage / "artifacts" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())

    grow("20m")
    rerun = _cdsr_run(storage, demo_copy, dagster_home)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    reference = tmp_path / "reference"
    assert _cdsr_run(reference, demo_copy, tmp_path / "dagster-reference").returncode == 0
    assert _data_versions(storage) == _data_versions(reference)
    assert json.loads((storage / "artifacts" / "cdsr_sequences" / "manifest.json").read_text())["files"]
