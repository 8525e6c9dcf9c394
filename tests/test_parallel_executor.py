"""The parallel job (`cdsr run --parallel N`: the multiprocess executor, one heavy stage
of each kind at a time) builds the same artifacts as the default in-process run."""

from __future__ import annotations

import pytest

from fault_support import artifact_states, cheap_demo_run_args, run_and_maybe_kill

pytestmark = pytest.mark.slow

# Two branches that can run side by side: the text encoder and the two trainings.
ASSETS = ["raw_interactions", "cdsr_sequences", "item_text_embeddings", "popularity_model", "sasrec_model"]


def test_the_parallel_run_builds_what_the_in_process_run_builds(tmp_path):
    args = cheap_demo_run_args(tmp_path, ASSETS)
    in_process = run_and_maybe_kill(tmp_path / "in-process", args)
    assert in_process.returncode == 0, in_process.output
    parallel = run_and_maybe_kill(tmp_path / "parallel", [*args, "--parallel", "2"])
    assert parallel.returncode == 0, parallel.output
    assert "in subprocess." in parallel.output, parallel.output[-3000:]  # the multiprocess executor ran the steps
    assert artifact_states(tmp_path / "parallel", ASSETS) == artifact_states(tmp_path / "in-process", ASSETS)
    for asset in ASSETS:
        assert f"{asset:<28} built" in parallel.output, parallel.output[-3000:]
