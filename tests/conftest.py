"""Shared fixtures: the bundled demo sample, the optional ../shared data, scratch storage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cdsr_pipeline.data.sources import demo_data_dir

SHARED_DATA = Path(os.environ.get("CDSR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real releases in ../shared/data; tests needing them skip on machines without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled demo sample (LLMCDSR format)."""
    target = tmp_path / "llmcdsr-food-kitchen-sample"
    shutil.copytree(demo_data_dir(), target, ignore=shutil.ignore_patterns("SOURCE.md"))
    return target
