"""Training loop: Adam, validation every epoch, early stopping, checkpoints, resume.

:func:`train_model` is the entry point for the Dagster asset. It writes into
``out_dir``:

- ``config.json``: the :class:`TrainConfig`, feature inputs, model summary and notes.
- ``epochs.parquet``: one row per epoch: train loss, examples, seconds, and the
  valid AND test metrics of both domains under both protocols (columns
  ``{split}_{protocol}_{A|B}_{metric}``), so both reporting rules can be applied.
- ``best.pt``: model weights of the epoch with the best validation MRR (mean of
  the two domains, ``selection_protocol``); the early-stopping checkpoint.
- ``last.pt``: model, optimizer, epoch, early-stopping state and history after every
  epoch. A run restarted on the same folder with the same config resumes from it.
- ``metrics.json``: summary (:func:`summarize_history`): best-checkpoint metrics,
  the papers' per-domain rule, timings, data, negatives, notes.

Determinism: the model is initialised from ``seed``; the batch order and the dropout
RNG of epoch e are seeded from ``(seed, e)``, so a run resumed after epoch e draws
exactly what an uninterrupted run draws and no RNG state needs to be checkpointed.
Checkpoints hold only tensors and plain Python values and are loaded with
``torch.load(..., weights_only=True)``.

Device: CUDA when present, else CPU with ``num_threads`` threads (torch's default,
one per core, when None). Precision (:func:`resolve_precision`): the training step's
matrix products in bf16 autocast where the device has fast bf16 arithmetic (CUDA with
bf16; CPUs with AVX-512 BF16 or AMX), fp32 elsewhere or when told; weights, Adam's
state, the softmax normalisers, the loss and every evaluation stay fp32.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from ..data.sequences import DOMAINS_FILE, split_file
from ..errors import UserInputError
from ..hardware import cpu_model, resolve_precision
from ..storage import atomic_target, atomic_write_text, sha256_file, stable_hash, write_parquet_atomic
from . import distributed
from .base import Recommender
from .build import build_model
from .config import TrainConfig, config_to_dict, train_config_from_dict
from .data import (
    Domains,
    FeatureInputs,
    SequenceArrays,
    load_item_features,
    load_sequences,
    load_split_statistics,
    make_batch,
    training_batches,
    training_item_counts,
)
from .evaluate import (
    DOMAIN_KEYS,
    PROTOCOLS,
    EvaluationSplit,
    flatten_metrics,
    metric_column,
    negatives_digest,
    ranks_table,
    split_ranks,
    summarize_ranks,
)
from .metrics import METRICS

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
EPOCHS_FILE = "epochs.parquet"
METRICS_FILE = "metrics.json"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
TEST_RANKS_FILE = "test_ranks.parquet"
"""The target's rank in every test row at the best checkpoint (both protocols): what
paired comparisons of two runs on the same rows read (the report's "Against SASRec")."""
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """A finished (or resumed-to-completion) run folder."""

    out_dir: Path
    config: TrainConfig
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return self.config.label

    @property
    def epochs_file(self) -> Path:
        return self.out_dir / EPOCHS_FILE

    @property
    def best_checkpoint(self) -> Path | None:
        path = self.out_dir / BEST_CHECKPOINT
        return path if path.is_file() else None

    def epochs(self) -> pl.DataFrame:
        return pl.read_parquet(self.epochs_file)

    @classmethod
    def load(cls, out_dir: Path) -> TrainResult:
        out_dir = Path(out_dir)
        config = train_config_from_dict(json.loads((out_dir / CONFIG_FILE).read_text())["train_config"])
        return cls(out_dir, config, json.loads((out_dir / METRICS_FILE).read_text()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_precision(config: TrainConfig) -> str:
    """The precision a run trains in: :func:`resolve_precision` on its device; fp32 for
    a model without trained weights (popularity), whose arithmetic it does not change."""
    if config.model.architecture != "sequential":
        return "fp32"
    return resolve_precision(config.precision, resolve_device(config.device))


def run_identity(config: TrainConfig, precision: str) -> str:
    """The part of a run's identity that its config gives: :meth:`TrainConfig.identity_hash`,
    with the resolved precision when it is not fp32 (fp32 runs keep the identity they
    had before precision was configurable)."""
    extra = {"precision": precision} if precision != "fp32" else {}
    if config.processes > 1:  # a data-parallel run sums its gradients in another order
        extra["processes"] = config.processes
    if not extra:
        return config.identity_hash()
    return stable_hash({"config": config.identity_hash(), **extra})


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_FREED_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes (a C int)


def keep_freed_memory_for_reuse() -> bool:
    """Let this process reuse freed CPU memory instead of returning it to the OS.

    A training step allocates, then frees, gigabytes of logits (see
    :mod:`cdsr_pipeline.model.layers`). glibc serves blocks over 32 MB with fresh
    ``mmap`` pages and unmaps them on free, so every step page-faults all of it in
    again: a quarter of the CPU time went to the kernel. With ``mmap`` off for malloc
    and a high trim threshold, freed blocks stay in the heap for the next step (about
    1.2x faster training on CPU, ``benchmarks/train.py``); the process keeps its peak
    memory until it exits. Process-wide, and only where the C library is glibc;
    returns whether it was applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES) == 1
    except (OSError, AttributeError):
        applied = False
    if not applied:
        log.info("freed CPU memory is returned to the OS as usual (no glibc mallopt here)")
    return applied


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


class CheckpointError(UserInputError):
    """A checkpoint file that this trainer did not write: truncated, edited, or a pickle
    asking to run code (which ``weights_only=True`` refuses to unpickle)."""


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of this trainer (tensors and plain values only)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a checkpoint of this trainer, refused: {first_line}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer, refused: no model weights in it")
    return checkpoint


@dataclass
class _RunData:
    domains: Domains
    train: SequenceArrays
    valid: EvaluationSplit
    test: EvaluationSplit
    stats: dict


def _load_run_data(sequences_dir: Path, config: TrainConfig) -> _RunData:
    domains = Domains.load(sequences_dir)
    train = load_sequences(sequences_dir, "train", max_len=config.max_len, user_domains=config.train_user_domains)
    splits = {
        name: EvaluationSplit.create(
            name,
            load_sequences(sequences_dir, name, max_len=config.max_len),
            domains,
            config.num_negatives,
            config.negatives_seed,
        )
        for name in ("valid", "test")
    }
    if len(train) == 0 or len(splits["valid"].arrays) == 0:
        raise ValueError(f"{sequences_dir}: training needs training sequences and validation rows")
    return _RunData(domains, train, splits["valid"], splits["test"], load_split_statistics(sequences_dir))


def inputs_digest(sequences_dir: Path, features: FeatureInputs) -> str:
    """Content hash of what training reads: the sequences and the feature tables."""
    files = {"domains": Path(sequences_dir) / DOMAINS_FILE}
    files.update({split: Path(sequences_dir) / split_file(split) for split in ("train", "valid", "test")})
    files.update(
        {name: Path(path) for name in ("img", "tex", "llm", "tags", "tag_vocabulary") if (path := getattr(features, name))}
    )
    return stable_hash({name: sha256_file(path) for name, path in sorted(files.items())})


def _build(config: TrainConfig, sequences_dir: Path, features: FeatureInputs, domains: Domains) -> Recommender:
    wanted = set(config.model.modalities) if config.model.architecture == "sequential" else set()
    item_features = load_item_features(features, domains.num_items, wanted)
    torch.manual_seed(config.seed)
    counts = training_item_counts(sequences_dir, domains.num_items, config.train_user_domains)
    return build_model(config.model, domains, item_features, max_len=config.max_len, item_counts=counts)


def train_model(sequences_dir: Path, features: FeatureInputs, config: TrainConfig, out_dir: Path) -> TrainResult:
    """Train (or resume) one run and write its outputs into ``out_dir``.

    Args:
        sequences_dir: a ``cdsr_sequences`` folder (items, train/valid/test, domains.json, stats.json).
        features: the feature tables to use (absent modalities are left out with a note).
        config: the run's configuration.
        out_dir: the run folder. If it holds ``last.pt`` of the same config
            (:meth:`TrainConfig.identity_hash`) and the same inputs (:func:`inputs_digest`),
            training resumes from it; anything else there is an error. ``epochs`` may
            be raised to extend a run.
    Returns:
        The :class:`TrainResult` (also readable later with :meth:`TrainResult.load`).
    """
    sequences_dir, out_dir = Path(sequences_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group = distributed.current_group()
    if config.processes > 1 and group is None and config.model.architecture == "sequential":
        return distributed.launch(sequences_dir, features, config, out_dir)
    main = group is None or group.is_main  # the process that evaluates and writes the run's files
    device = resolve_device(config.device)
    if device.type == "cuda" and group is not None and device.index is None:
        device = torch.device("cuda", group.local_rank)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    precision = run_precision(config)
    data = _load_run_data(sequences_dir, config)
    model = _build(config, sequences_dir, features, data.domains).to(device)
    digest = inputs_digest(sequences_dir, features)  # hashes every input file: once per run
    identity = stable_hash({"config": run_identity(config, precision), "inputs": digest})
    if main:
        atomic_write_text(
            out_dir / CONFIG_FILE,
            json.dumps(
                {
                    "train_config": config_to_dict(config),
                    "identity": identity,
                    "features": features.to_dict(),
                    "model_summary": model.summary,
                    "notes": model.notes,
                    "sequences_dir": str(sequences_dir),
                    "precision": precision,
                },
                indent=2,
            ),
        )
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        if model.trainable
        else None
    )
    state = {"epoch": 0, "best_value": -math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
    history: list[dict[str, Any]] = []
    last_path = out_dir / LAST_CHECKPOINT
    checkpoint = None
    if last_path.is_file():
        try:
            checkpoint = load_checkpoint(last_path)
        except CheckpointError as error:
            # the run is rebuilt from epoch 1 (deterministic: the same result); the
            # refused file is kept beside it for whoever wants to look at it
            if main:
                rejected = last_path.with_suffix(".pt.rejected")
                os.replace(last_path, rejected)
                log.warning("%s; moved to %s, training from the start", error, rejected.name)
    if group is not None:  # every process resumes from the same epoch (rank 0 may have refused the file)
        resumed_after = group.from_main(checkpoint["early_stopping"]["epoch"] if checkpoint is not None else None)
        if resumed_after is None or checkpoint is None or checkpoint["early_stopping"]["epoch"] != resumed_after:
            checkpoint = None
    if checkpoint is not None:
        legacy = stable_hash({"config": config.legacy_identity_hash(), "inputs": digest})
        if precision == "fp32" and checkpoint.get("identity") == legacy:
            identity = legacy  # a run from before patience left the identity: keep its checkpoints consistent
        if checkpoint.get("identity") != identity:
            raise ValueError(f"{out_dir} holds a run of a different configuration or inputs; use a fresh folder")
        model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        state, history = dict(checkpoint["early_stopping"]), list(checkpoint["history"])
        state["stopped"] = _stopped_under(history, config, state)
        log.info("%s: resuming after epoch %d", config.label, state["epoch"])

    selection = f"valid_{config.selection_protocol}_mean_mrr"
    # under torchrun: DistributedDataParallel (its construction gives every process rank 0's weights)
    stepped = distributed.wrap(model, group, device) if group is not None and model.trainable else model
    last_epoch = config.epochs if model.trainable else 0
    first = state["epoch"] + 1 if history else (1 if model.trainable else 0)
    for epoch in range(first, last_epoch + 1):
        if state["stopped"]:
            break
        started = time.perf_counter()
        loss, examples = (
            _train_epoch(stepped, optimizer, data, config, epoch, device, precision, group)
            if model.trainable
            else (math.nan, 0)
        )
        trained = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "train_examples": examples}
        ranks: dict[str, dict] = {}
        if main:
            for split in (data.valid, data.test):
                ranks[split.name] = split_ranks(model, split, data.domains, device, config.eval_batch_size, config.progress)
                row.update(flatten_metrics(split.name, summarize_ranks(ranks[split.name])))
        finished = time.perf_counter()
        row.update(train_seconds=trained - started, eval_seconds=finished - trained, epoch_seconds=finished - started)
        if group is not None:  # the epoch as rank 0 evaluated it: every process takes the same decisions
            row = group.from_main(row)
        history.append(row)
        state["epoch"] = epoch
        if row[selection] > state["best_value"]:
            state.update(best_value=row[selection], best_epoch=epoch, bad_epochs=0)
            if main:
                _save_atomic(
                    {"format": CHECKPOINT_FORMAT, "identity": identity, "epoch": epoch, "model": model.state_dict()},
                    out_dir / BEST_CHECKPOINT,
                )
                write_parquet_atomic(ranks_table(ranks["test"]), out_dir / TEST_RANKS_FILE)
        else:
            state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= config.patience
        if not main:
            continue
        _save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "identity": identity,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "early_stopping": state,
                "history": history,
            },
            last_path,
        )
        write_parquet_atomic(pl.DataFrame(history).to_arrow(), out_dir / EPOCHS_FILE)
        log.info(
            "%s epoch %d: loss %.4f, valid %s mean MRR %.4f (best %.4f @ %d), %.1fs",
            config.label,
            epoch,
            loss,
            config.selection_protocol,
            row[selection],
            state["best_value"],
            state["best_epoch"],
            row["epoch_seconds"],
        )

    metrics = summarize_history(history, state, config)
    metrics.update(
        dataset=data.domains.dataset,
        domain_names=dict(zip(DOMAIN_KEYS, data.domains.names)),
        identity=identity,
        model_summary=model.summary,
        notes=model.notes,
        features=features.to_dict(),
        device=str(device),
        precision=precision,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        hardware=hardware_summary(device),
        data={
            "stats": data.stats,
            "train_sequences": len(data.train),
            "train_examples": data.train.num_examples,
            "train_user_domains": list(config.train_user_domains),
            "max_len": config.max_len,
        },
        negatives={
            "count": config.num_negatives,
            "seed": config.negatives_seed,
            "valid_digest": negatives_digest(data.valid.negatives),
            "test_digest": negatives_digest(data.test.negatives),
        },
    )
    metrics["processes"] = group.world if group is not None else 1
    if main:
        atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2))
    return TrainResult(out_dir, config, metrics)


def _stopped_under(history: list[dict[str, Any]], config: TrainConfig, state: dict) -> bool:
    """Whether a resumed run is finished under this config's patience.

    Patience is a limit like ``epochs``: with a larger one, a run that stopped early
    continues from its last epoch exactly as an uninterrupted run would (epoch e's
    batches and dropout come from (seed, e)). A smaller one is only accepted while
    the recorded epochs are the ones it would have run; otherwise the best checkpoint
    it would keep may have been overwritten, and the run needs a fresh folder.
    """
    selection = f"valid_{config.selection_protocol}_mean_mrr"
    best, bad = -math.inf, 0
    for index, row in enumerate(history):
        if row[selection] > best:
            best, bad = row[selection], 0
        else:
            bad += 1
        if bad >= config.patience and index + 1 < len(history):
            raise ValueError(
                f"{config.label}: the recorded run went {len(history) - index - 1} epoch(s) past where patience "
                f"{config.patience} stops it; a smaller patience needs a fresh run folder"
            )
    return state["bad_epochs"] >= config.patience


def hardware_summary(device: torch.device) -> dict[str, Any]:
    """What the run's figures were measured on: CPU model and cores, torch and its CPU
    capability, the GPU's name when training on CUDA."""
    summary = {
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    return summary


def _train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: _RunData,
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    precision: str,
    group: distributed.ProcessGroup | None = None,
) -> tuple[float, int]:
    """One pass over the training rows; returns (mean loss per example, examples).

    ``model``: the recommender, or its DistributedDataParallel wrapper under torchrun
    (``group``): each process then takes its share of every batch, and its loss is
    weighted by that share so that the averaged gradient is the whole batch's."""
    model.train()
    views = model.module.views if group is not None else model.views
    torch.manual_seed(_epoch_seed(config.seed, epoch))
    rng = np.random.default_rng([config.seed, epoch])
    batches = training_batches(len(data.train), data.train.lengths, config.batch_size, rng)
    total, examples = 0.0, 0
    progress = tqdm(
        batches, desc=f"{config.label} epoch {epoch}", leave=False, disable=not config.progress, mininterval=2.0
    )
    for rows in progress:
        counts = True
        if group is not None:
            rows, counts = group.share(rows)
        batch = make_batch(data.train, rows, data.domains, views).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch)  # Recommender.forward: the mean training loss
        own = batch.num_examples if counts else 0
        step_loss = loss
        if group is not None:
            (everyone,) = group.sum(own)
            step_loss = loss * (own * group.world / everyone)
        optimizer.zero_grad(set_to_none=True)
        step_loss.backward()
        optimizer.step()
        total += loss.item() * own
        examples += own
        progress.set_postfix(loss=f"{total / max(examples, 1):.4f}", refresh=False)
    if group is not None:
        total, examples = group.sum(total, examples)
        examples = int(examples)
    return total / max(examples, 1), examples


def nest_metrics(row: dict[str, Any], split: str) -> dict[str, dict]:
    """Inverse of :func:`~cdsr_pipeline.model.evaluate.flatten_metrics` for one split."""
    return {
        domain: {
            protocol: {metric: row[metric_column(split, protocol, domain, metric)] for metric in METRICS}
            for protocol in PROTOCOLS
        }
        for domain in DOMAIN_KEYS
    }


def summarize_history(history: list[dict[str, Any]], state: dict, config: TrainConfig) -> dict[str, Any]:
    """The two reporting rules and the training facts, from the per-epoch rows.

    - ``best_checkpoint``: the epoch with the best validation MRR (mean of the two
      domains, ``selection_protocol``): what early stopping keeps.
    - ``per_domain_best``: for each protocol and domain, the epoch with that domain's
      best validation MRR under that protocol, and its test metrics (the C2DSR /
      papers' reporting rule: each domain may come from a different epoch).
    """
    by_epoch = {row["epoch"]: row for row in history}
    best = by_epoch[state["best_epoch"]]
    per_domain: dict[str, dict] = {}
    for protocol in PROTOCOLS:
        per_domain[protocol] = {}
        for domain in DOMAIN_KEYS:
            column = metric_column("valid", protocol, domain, "mrr")
            chosen = max(history, key=lambda row: (row[column], -row["epoch"]))
            per_domain[protocol][domain] = {
                "epoch": chosen["epoch"],
                "valid": nest_metrics(chosen, "valid")[domain][protocol],
                "test": nest_metrics(chosen, "test")[domain][protocol],
            }
    trained = [row for row in history if row["train_examples"]]
    train_seconds = sum(row["train_seconds"] for row in trained)
    return {
        "name": config.label,
        "ablation_group": config.ablation_group,
        "epochs_run": len(history) if trained else 0,
        "max_epochs": config.epochs,
        "patience": config.patience,
        "stopped_early": bool(state["stopped"]),
        "selection": f"valid {config.selection_protocol} mean MRR",
        "best_checkpoint": {
            "epoch": best["epoch"],
            "valid": nest_metrics(best, "valid"),
            "test": nest_metrics(best, "test"),
        },
        "per_domain_best": per_domain,
        "timing": {
            "total_seconds": float(sum(row["epoch_seconds"] for row in history)),
            "mean_train_seconds": float(np.mean([row["train_seconds"] for row in trained])) if trained else 0.0,
            "mean_eval_seconds": float(np.mean([row["eval_seconds"] for row in history])),
            "train_examples_per_second": (
                float(sum(row["train_examples"] for row in trained) / train_seconds) if trained else None
            ),
        },
    }


def load_model(
    run_dir: Path, sequences_dir: Path, features: FeatureInputs, checkpoint: str = BEST_CHECKPOINT
) -> Recommender:
    """Rebuild a run's model and load a checkpoint (``best.pt`` or ``last.pt``), on CPU."""
    result_config = train_config_from_dict(json.loads((Path(run_dir) / CONFIG_FILE).read_text())["train_config"])
    model = _build(result_config, Path(sequences_dir), features, Domains.load(sequences_dir))
    model.load_state_dict(load_checkpoint(Path(run_dir) / checkpoint)["model"])
    return model.eval()
