"""SIGKILL of ``cdsr run`` in the middle of a stage, then the same command again: the
run completes, every artifact equals an uninterrupted run's (its files verified against
its manifest), nothing half-written is left, and no LLM call recorded before the kill is
asked again.

The kill points are random (seeded): after the stage's lock is taken, a share of the
stage's time in the reference run. ``CDSR_KILL_SEEDS`` (default ``0``) chooses the seeds;
``scripts/fault_campaign.py`` runs more of them and prints the figures.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cdsr_pipeline.data.sample import SampleSize, cut_llmcdsr_sample
from cdsr_pipeline.data.sources import demo_data_dir

from fault_support import artifact_states, cheap_demo_run_args, demo_run_args, half_built_files, recorded_calls, run_and_maybe_kill

pytestmark = pytest.mark.slow

SEEDS = [int(seed) for seed in os.environ.get("CDSR_KILL_SEEDS", "0").split(",")]
# The stages in the order a run builds them; one kill in each, in turn, on one storage.
KILLED_STAGES = ["raw_interactions", "cdsr_sequences", "item_text_embeddings", "sasrec_model", "evaluation_report"]
CHEAP_ASSETS = KILLED_STAGES + ["popularity_model"]
LLM_ASSETS = ["raw_interactions", "cdsr_sequences", "llm_augmented_text"]
LLM_CONFIG = """
ops:
  llm_augmented_text: {config: {max_tokens: 12}}
resources:
  llm: {config: {n_threads: 1}}
"""


@pytest.fixture(scope="module")
def cheap_reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("killed-cheap")
    args = cheap_demo_run_args(work, CHEAP_ASSETS)
    reference = run_and_maybe_kill(work / "reference", args)
    assert reference.returncode == 0, reference.output
    return work, args, reference, artifact_states(work / "reference", CHEAP_ASSETS)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_run_killed_in_every_stage_in_turn_completes_with_the_same_artifacts(cheap_reference, seed):
    work, args, reference, expected = cheap_reference
    rng = random.Random(seed)
    storage = work / f"killed-{seed}"
    kills = []
    for stage in KILLED_STAGES:
        outcome = run_and_maybe_kill(storage, args, kill_in=stage, after_s=rng.uniform(0.0, 0.9) * reference.held[stage])
        kills.append((stage, outcome.returncode, outcome.killed_in))
        assert outcome.returncode in (None, 0), f"needed a person: the run after a kill failed\n{outcome.output}"
        artifact_states(storage, CHEAP_ASSETS)  # whatever claims to be complete is
    final = run_and_maybe_kill(storage, args)
    assert final.returncode == 0, f"needed a person: {kills}\n{final.output}"
    assert artifact_states(storage, CHEAP_ASSETS) == expected, f"lost data: artifacts differ after kills {kills}"
    assert half_built_files(storage) == []
    assert sum(code is None for _, code, _ in kills) >= 2, kills  # the kills landed in runs


def _sample_reference(tmp_path: Path, size: SampleSize, config_text: str, assets: list[str]):
    """The run arguments on a sample of the demo cut to ``size``, and an uninterrupted run of them."""
    source = tmp_path / "small-food-kitchen"
    cut_llmcdsr_sample(demo_data_dir(), source, size)
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    args = demo_run_args(source, assets, config)
    reference = run_and_maybe_kill(tmp_path / "reference", args)
    assert reference.returncode == 0, reference.output
    return args, reference


@pytest.mark.parametrize("seed", SEEDS)
def test_an_llm_stage_killed_mid_way_resumes_without_asking_a_recorded_call_again(tmp_path, seed):
    size = SampleSize(items_a=60, items_b=60, train_users=80, single_domain_users=5, valid_users=20, test_users=20)
    args, reference = _sample_reference(tmp_path, size, LLM_CONFIG, LLM_ASSETS)
    expected_calls = recorded_calls(tmp_path / "reference")

    storage = tmp_path / "killed"
    # killed while the second chunk is asked: the first 64 calls are committed (the
    # progress bar counts a chunk once it is in the log)
    delay = random.Random(seed).uniform(0.0, 2.0)
    killed = run_and_maybe_kill(storage, args, kill_on_output=r"LLM augmentation:[^\n\r]*\b64/\d+\b", after_s=delay)
    assert killed.returncode is None and killed.killed_in == ["llm_augmented_text"], killed.output
    before = recorded_calls(storage)
    assert 0 < len(before) < len(expected_calls)
    resumed = run_and_maybe_kill(storage, args)
    assert resumed.returncode == 0, f"needed a person:\n{resumed.output}"
    after = recorded_calls(storage)
    assert {key: after[key] for key in before} == before, "lost data: a recorded call was asked again"
    assert set(after) == set(expected_calls)
    assert {key: after[key][:2] for key in after} == {key: value[:2] for key, value in expected_calls.items()}
    assert artifact_states(storage, LLM_ASSETS) == artifact_states(tmp_path / "reference", LLM_ASSETS)
    assert half_built_files(storage) == []


TAG_ASSETS = ["raw_interactions", "cdsr_sequences", "item_text_embeddings", "domain_tag_vocabularies", "item_tag_scores"]
TAG_CONFIG = """
ops:
  domain_tag_vocabularies: {config: {tags_per_domain: 6, queries: 2, min_valid_tags: 2}}
  item_tag_scores: {config: {candidates: 3}}
resources:
  llm: {config: {n_threads: 1}}
"""


@pytest.mark.parametrize("seed", SEEDS)
def test_the_tag_stages_killed_in_turn_resume_to_the_same_vocabulary_and_scores(tmp_path, seed):
    size = SampleSize(items_a=30, items_b=30, train_users=60, single_domain_users=5, valid_users=10, test_users=10)
    args, reference = _sample_reference(tmp_path, size, TAG_CONFIG, TAG_ASSETS)

    rng = random.Random(seed)
    storage = tmp_path / "killed"
    kills = []
    for stage in ("domain_tag_vocabularies", "item_tag_scores"):
        killed = run_and_maybe_kill(storage, args, kill_in=stage, after_s=rng.uniform(0.2, 0.9) * reference.held[stage])
        kills.append((stage, killed.returncode, killed.killed_in))
        before = recorded_calls(storage)
        resumed = run_and_maybe_kill(storage, args) if stage == "item_tag_scores" else None
        if resumed is not None:
            assert resumed.returncode == 0, f"needed a person: {kills}\n{resumed.output}"
            after = recorded_calls(storage)
            assert {key: after[key] for key in before} == before, "lost data: a recorded call was asked again"
    assert any(code is None for _, code, _ in kills), kills
    assert artifact_states(storage, TAG_ASSETS) == artifact_states(tmp_path / "reference", TAG_ASSETS), f"lost data: {kills}"
    assert set(recorded_calls(storage)) == set(recorded_calls(tmp_path / "reference"))
    assert half_built_files(storage) == []
