"""Tampered artifacts are detected and rebuilt, or refused; never used silently."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import dagster as dg
import pytest
import torch

from cdsr_pipeline.assets.ingest import cdsr_sequences, raw_interactions
from cdsr_pipeline.model import PRESETS, TrainConfig
from cdsr_pipeline.model.trainer import CheckpointError, load_checkpoint, train_model
from cdsr_pipeline.resources import DatasetSource, StorageResource
from cdsr_pipeline.storage import ArtifactStore, MissingArtifactError

from model_synthetic import write_synthetic_features, write_synthetic_sequences


def _materialize(storage: Path, source: Path) -> dict[str, dict]:
    result = dg.materialize(
        [raw_interactions, cdsr_sequences],
        resources={"storage": StorageResource(root=str(storage)), "source": DatasetSource(format="llmcdsr", path=str(source))},
    )
    assert result.success
    return {
        event.asset_key.path[-1]: {
            "reused": event.materialization.metadata["reused"].value,
            "data_version": event.materialization.tags["dagster/data_version"],
        }
        for event in result.get_asset_materialization_events()
    }


@pytest.fixture
def built(tmp_path, demo_copy):
    storage = tmp_path / "storage"
    return storage, demo_copy, _materialize(storage, demo_copy)


def _a_parquet_file(storage: Path, asset: str) -> Path:
    return sorted((storage / "artifacts" / asset).glob("*.parquet"))[0]


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the content hash can tell
    file.write_bytes(bytes(data))


def test_an_edited_artifact_of_the_same_size_is_rebuilt_and_refused_to_readers(built):
    storage, source, first = built
    _flip_a_byte(_a_parquet_file(storage, "cdsr_sequences"))
    with pytest.raises(MissingArtifactError, match="does not have the content its manifest records"):
        ArtifactStore(storage).require("cdsr_sequences")
    second = _materialize(storage, source)
    assert second["raw_interactions"]["reused"]
    assert second["cdsr_sequences"] == {**first["cdsr_sequences"], "reused": False}  # rebuilt, identical
    assert ArtifactStore(storage).require("cdsr_sequences")


def test_a_truncated_artifact_and_a_damaged_manifest_are_rebuilt(built):
    storage, source, first = built
    file = _a_parquet_file(storage, "raw_interactions")
    file.write_bytes(file.read_bytes()[:100])
    manifest_file = storage / "artifacts" / "cdsr_sequences" / "manifest.json"
    manifest_file.write_text(manifest_file.read_text()[:50])  # cut mid-JSON
    second = _materialize(storage, source)
    assert second == {name: {**row, "reused": False} for name, row in first.items()}


def test_a_manifest_whose_hash_does_not_match_its_file_is_rebuilt(built):
    storage, source, first = built
    manifest_file = storage / "artifacts" / "cdsr_sequences" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name]["sha256"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    second = _materialize(storage, source)
    assert second["cdsr_sequences"] == {**first["cdsr_sequences"], "reused": False}


class _RunsCode:
    """A pickle that runs code when it is unpickled (what weights_only=True refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_run_rebuilt(tmp_path):
    sequences = write_synthetic_sequences(tmp_path / "sequences", names=("Food", "Kitchen"))
    features = write_synthetic_features(tmp_path / "features", num_items=50)
    model = dataclasses.replace(PRESETS["sasrec"], hidden_dim=16)
    config = TrainConfig(model=model, name="sasrec", epochs=2, num_negatives=20, num_threads=1, progress=False)
    straight = train_model(sequences, features, config, tmp_path / "straight")

    folder = tmp_path / "tampered"
    train_model(sequences, features, dataclasses.replace(config, epochs=1), folder)
    marker = tmp_path / "marker"
    with open(folder / "last.pt", "wb") as handle:
        pickle.dump({"model": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match=r"last\.pt is not a checkpoint of this trainer, refused"):
        load_checkpoint(folder / "last.pt")
    resumed = train_model(sequences, features, config, folder)
    assert not marker.exists()  # the code in the pickle never ran
    assert (folder / "last.pt.rejected").is_file()
    assert resumed.metrics["best_checkpoint"] == straight.metrics["best_checkpoint"]
    assert torch.equal(
        load_checkpoint(folder / "best.pt")["model"]["towers.id.item_embedding.embedding.weight"],
        load_checkpoint(tmp_path / "straight" / "best.pt")["model"]["towers.id.item_embedding.embedding.weight"],
    )
