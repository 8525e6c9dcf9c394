"""Data-parallel training: ``torchrun`` processes, PyTorch DistributedDataParallel.

A run with ``TrainConfig.processes = N > 1`` is launched by :func:`launch` as
``torchrun --standalone --nproc_per_node N -m cdsr_pipeline.model.distributed JOB``
(``--nnodes``/``--rdzv-endpoint`` for several machines: run the same command on each,
see the README). Every process builds the same model from the same seed; in each step
process r takes rows ``r, r + N, ...`` of the single-process batch, so the union over
the processes is the single-process epoch, and its loss is weighted by its share of the
batch's examples, so the all-reduced gradient (DDP, ``gloo`` on CPU, ``nccl`` on CUDA)
is the single-process batch's gradient. Evaluation, checkpoints and the run's files
are rank 0's; the others receive each epoch's outcome from it. A process that dies
fails the run: torchrun stops the others, and a collective that waits longer than
``CDSR_DIST_TIMEOUT_S`` (default 1,800 s) raises instead of hanging.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserInputError

JOB_FILE = "distributed_job.json"


class DistributedTrainingError(UserInputError):
    """A data-parallel run whose processes did not all finish."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the data-parallel run."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, rows: np.ndarray) -> tuple[np.ndarray, bool]:
        """This process's rows of a batch, and whether they count (a batch with fewer
        rows than processes leaves some without: they take one row with weight 0 so that
        every process joins the step's all-reduce)."""
        part = rows[self.rank :: self.world]
        if part.size == 0:
            return rows[:1], False
        return part, True

    def sum(self, *values: float) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def from_main(self, value):
        """``value`` as rank 0 has it (any picklable object)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_group() -> ProcessGroup | None:
    """The process group of a torchrun worker (initialised on first use), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        timeout = dt.timedelta(seconds=float(os.environ.get("CDSR_DIST_TIMEOUT_S", "1800")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap(model: torch.nn.Module, group: ProcessGroup, device: torch.device) -> torch.nn.Module:
    """The model under DistributedDataParallel (its forward is the training loss)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else group.local_rank] if device.type == "cuda" else None
    # some parameters get no gradient in a step (a domain without examples in a batch)
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def launch(sequences_dir: Path, features, config, out_dir: Path):
    """Run :func:`~cdsr_pipeline.model.trainer.train_model` in ``config.processes``
    torchrun processes on this machine; returns its :class:`TrainResult`."""
    from .config import config_to_dict
    from .trainer import TrainResult

    out_dir.mkdir(parents=True, exist_ok=True)
    job = out_dir / JOB_FILE
    job.write_text(
        json.dumps(
            {"sequences_dir": str(sequences_dir), "features": features.to_dict(), "config": config_to_dict(config), "out_dir": str(out_dir)}
        )
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.processes}",
        "-m", "cdsr_pipeline.model.distributed", str(job),
    ]
    # each process gets its share of the cores (torch would start one thread per core in each)
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // config.processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    finished = subprocess.run(command, env=env)
    if finished.returncode != 0:
        raise DistributedTrainingError(
            f"{config.label}: the data-parallel run ({config.processes} processes) failed with exit code "
            f"{finished.returncode}; see the processes' errors above. Its last finished epoch is kept in {out_dir}: "
            "the same command resumes it"
        )
    return TrainResult.load(out_dir)


def _worker(job_path: str) -> int:
    from .config import train_config_from_dict
    from .data import FeatureInputs
    from .trainer import train_model

    job = json.loads(Path(job_path).read_text())
    features = dict(job["features"])
    provenance = features.pop("provenance", {})
    inputs = FeatureInputs(**{k: (Path(v) if v else None) for k, v in features.items()}, provenance=provenance)
    try:
        train_model(Path(job["sequences_dir"]), inputs, train_config_from_dict(job["config"]), Path(job["out_dir"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
