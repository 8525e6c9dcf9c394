"""Data-parallel training (torchrun, DistributedDataParallel over gloo on CPU): two
processes train the epochs one process trains, and a killed process fails the run
with a clear error instead of hanging."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_synthetic import write_synthetic_features, write_synthetic_sequences

from cdsr_pipeline.model import PRESETS, TrainConfig, train_model
from cdsr_pipeline.model.config import config_to_dict
from cdsr_pipeline.model.distributed import JOB_FILE, DistributedTrainingError

pytestmark = pytest.mark.slow


def _config(**changes) -> TrainConfig:
    # dropout 0: the processes' dropout masks differ from one process's; without dropout
    # the only difference left is the order of the gradient sums
    model = dataclasses.replace(PRESETS["sasrec"], hidden_dim=32, dropout=0.0)
    values = dict(model=model, name="SASRec", epochs=3, patience=50, num_negatives=20, num_threads=1,
                  precision="fp32", progress=False)
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_sequences(root / "sequences", names=("Food", "Kitchen")), write_synthetic_features(root / "features", num_items=50)


def test_two_processes_train_the_epochs_of_one_within_tolerance(dataset, tmp_path):
    sequences, features = dataset
    one = train_model(sequences, features, _config(), tmp_path / "one")
    two = train_model(sequences, features, _config(processes=2), tmp_path / "two")
    assert two.metrics["processes"] == 2 and one.metrics["processes"] == 1
    assert two.metrics["identity"] != one.metrics["identity"]  # a different run: its own folder and cache entry
    a, b = one.epochs(), two.epochs()
    assert a["train_examples"].to_list() == b["train_examples"].to_list()  # the union of the shares is the epoch
    # measured: train loss 2e-7 apart, the MRRs equal (fp32, no dropout, 3 epochs)
    tolerance = {"train_loss": 1e-5, "valid_sampled_mean_mrr": 1e-3, "valid_full_mean_mrr": 1e-3}
    for column, limit in tolerance.items():
        for x, y in zip(a[column].to_list(), b[column].to_list()):
            assert abs(x - y) <= limit * max(1.0, abs(x)), (column, a[column].to_list(), b[column].to_list())
    assert (tmp_path / "two" / "best.pt").is_file() and (tmp_path / "two" / "metrics.json").is_file()
    # resumed and extended like a one-process run
    more = train_model(sequences, features, _config(processes=2, epochs=4), tmp_path / "two")
    assert more.epochs()["epoch"].to_list() == [1, 2, 3, 4]
    assert more.epochs().head(3)["valid_sampled_mean_mrr"].to_list() == b["valid_sampled_mean_mrr"].to_list()


def test_two_processes_on_the_demo_data_give_the_validation_metrics_of_one(demo_copy, tmp_path):
    import dagster as dg

    from cdsr_pipeline.assets.ingest import cdsr_sequences, raw_interactions
    from cdsr_pipeline.model import FeatureInputs
    from cdsr_pipeline.resources import DatasetSource, StorageResource
    from cdsr_pipeline.storage import ArtifactStore

    storage = tmp_path / "storage"
    resources = {"storage": StorageResource(root=str(storage)), "source": DatasetSource(format="llmcdsr", path=str(demo_copy))}
    assert dg.materialize([raw_interactions, cdsr_sequences], resources=resources).success
    sequences = ArtifactStore(storage).asset_dir("cdsr_sequences")
    config = _config(epochs=2, num_negatives=99)
    one = train_model(sequences, FeatureInputs(), config, tmp_path / "one")
    two = train_model(sequences, FeatureInputs(), dataclasses.replace(config, processes=2), tmp_path / "two")
    a, b = one.epochs(), two.epochs()
    assert a["train_examples"].to_list() == b["train_examples"].to_list()
    for column in ("valid_sampled_mean_mrr", "valid_full_mean_mrr"):
        for x, y in zip(a[column].to_list(), b[column].to_list()):
            assert abs(x - y) <= 1e-3, (column, a[column].to_list(), b[column].to_list())


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: field 4 of /proc/<pid>/stat)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def test_a_killed_process_fails_the_run_instead_of_hanging(dataset, tmp_path):
    sequences, features = dataset
    out = tmp_path / "run"
    out.mkdir()
    config = _config(processes=2, epochs=200)
    job = out / JOB_FILE
    job.write_text(json.dumps({"sequences_dir": str(sequences), "features": features.to_dict(),
                               "config": config_to_dict(config), "out_dir": str(out)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cdsr_pipeline.model.distributed", str(job)]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CDSR_DIST_TIMEOUT_S": "60"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "epochs.parquet").exists():  # training is under way
            assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read()
            time.sleep(0.2)
        workers = _children(runner.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        runner.wait(timeout=90)  # torchrun notices the dead worker and stops the other
        assert runner.returncode != 0
    finally:
        if runner.poll() is None:
            runner.kill()


def test_a_failed_launch_is_one_clear_error(dataset, tmp_path):
    _, features = dataset
    with pytest.raises(DistributedTrainingError, match=r"SASRec: the data-parallel run \(2 processes\) failed with exit code"):
        train_model(tmp_path / "no-sequences", features, _config(processes=2), tmp_path / "x")
