"""Materialized once, rerun only when inputs change: both directions, through Dagster."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from cdsr_pipeline.assets.ingest import cdsr_sequences, raw_interactions
from cdsr_pipeline.resources import DatasetSource, StorageResource
from cdsr_pipeline.storage import ArtifactStore


def _materialize(assets, storage: Path, source: Path, run_config=None) -> dict[str, dict]:
    result = dg.materialize(
        assets,
        resources={"storage": StorageResource(root=str(storage)), "source": DatasetSource(format="llmcdsr", path=str(source))},
        run_config=run_config,
    )
    assert result.success
    out = {}
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        out[event.asset_key.path[-1]] = {
            "reused": materialization.metadata["reused"].value,
            "data_version": materialization.tags["dagster/data_version"],
        }
    return out


@pytest.fixture
def first_run(tmp_path, demo_copy):
    storage = tmp_path / "storage"
    return storage, demo_copy, _materialize([raw_interactions, cdsr_sequences], storage, demo_copy)


def test_unchanged_rerun_skips_and_keeps_data_versions(first_run):
    storage, source, first = first_run
    assert not first["raw_interactions"]["reused"] and not first["cdsr_sequences"]["reused"]
    second = _materialize([raw_interactions, cdsr_sequences], storage, source)
    assert second["raw_interactions"] == {**first["raw_interactions"], "reused": True}
    assert second["cdsr_sequences"] == {**first["cdsr_sequences"], "reused": True}


def test_changed_raw_file_reruns_the_chain(first_run):
    storage, source, first = first_run
    with open(source / "train_overlap.txt", "a") as handle:
        handle.write("9999\t0,1,300\n")
    second = _materialize([raw_interactions, cdsr_sequences], storage, source)
    for asset in ("raw_interactions", "cdsr_sequences"):
        assert not second[asset]["reused"]
        assert second[asset]["data_version"] != first[asset]["data_version"]


def test_changed_config_reruns_only_that_asset(first_run):
    storage, source, first = first_run
    config = {"ops": {"cdsr_sequences": {"config": {"min_user_interactions": 5}}}}
    second = _materialize([raw_interactions, cdsr_sequences], storage, source, run_config=config)
    assert second["raw_interactions"]["reused"]
    assert not second["cdsr_sequences"]["reused"]
    # A released split ignores the thresholds: recomputed, yet the same data.
    assert second["cdsr_sequences"]["data_version"] == first["cdsr_sequences"]["data_version"]
    assert ArtifactStore(storage).read_manifest("cdsr_sequences").config["min_user_interactions"] == 5


def _with_code_version(asset: dg.AssetsDefinition, version: str) -> dg.AssetsDefinition:
    """The same asset function under another code version (what a code change looks like)."""
    return asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))


def test_changed_code_version_reruns_it_and_identical_output_stops_propagation(first_run):
    storage, source, first = first_run
    second = _materialize([_with_code_version(raw_interactions, "bumped"), cdsr_sequences], storage, source)
    assert not second["raw_interactions"]["reused"]
    # Same bytes out => same data version => downstream fingerprint unchanged => reused.
    assert second["raw_interactions"]["data_version"] == first["raw_interactions"]["data_version"]
    assert second["cdsr_sequences"]["reused"]
    third = _materialize([raw_interactions, _with_code_version(cdsr_sequences, "bumped")], storage, source)
    assert not third["raw_interactions"]["reused"]  # back to its own code version: a different fingerprint
    assert not third["cdsr_sequences"]["reused"]


def test_missing_upstream_is_a_clear_error(tmp_path, demo_copy):
    with pytest.raises(Exception, match="asset 'raw_interactions' has no complete output"):
        dg.materialize(
            [cdsr_sequences],
            resources={"storage": StorageResource(root=str(tmp_path)), "source": DatasetSource(path=str(demo_copy))},
        )
