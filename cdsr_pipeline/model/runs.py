"""Which runs a training request stands for, and training them into a published folder.

A run is a model config plus the tag matrix it reads. Tag matrices are named by
variant (the ``item_tag_matrix`` asset writes every one): ``default`` (the configured
selection and representation), ``static`` (keyword-matched tags, TEMA Table IV) and
``<selection>-<representation>`` (TEMA Tables V and VI).

Each run trains in its own folder of the training cache, named after what determines
it (its identity and the data versions of the inputs it reads), so a crashed run
resumes from its last epoch and a run whose inputs did not change is not trained again
(:func:`run_folder`). A run that differs from a finished one only by its name (the
last row of TEMA Table IV and the default rows of Tables V and VI are TEMA-LLM itself)
starts from that run's files instead of training again (:func:`finished_twin`).
:func:`train_runs` trains (or resumes, or reuses) each run and
copies what a run publishes (:data:`KEPT_FILES`, without the optimizer state) into
``<out>/runs/<run>/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..features.tag_matrix import REPRESENTATIONS, SELECTIONS, STATIC_VARIANT, variant_name
from ..storage import stable_hash
from .config import ABLATIONS, PRESETS, ModelConfig, TrainConfig
from .data import FeatureInputs
from .trainer import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    EPOCHS_FILE,
    METRICS_FILE,
    TEST_RANKS_FILE,
    TrainResult,
    run_identity,
    run_precision,
    train_model,
)

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
KEPT_FILES = (CONFIG_FILE, EPOCHS_FILE, METRICS_FILE, BEST_CHECKPOINT, TEST_RANKS_FILE)  # what a run folder publishes
SINGLE_DOMAIN_SUFFIX = " + single-domain users"
SINGLE_DOMAIN_USERS = ("both", "A", "B")

MODELS = ("tema_llm", "llm_emf", "llm_emf_title", "tema_llm_title", "tema_llm_fused", "sasrec", "gru4rec", "popularity")
MODEL_NAMES = {
    "tema_llm": "TEMA-LLM",
    "llm_emf": "LLM-EMF",
    "llm_emf_title": "LLM-EMF (title text only)",
    "tema_llm_title": "TEMA-LLM (title text only)",
    "tema_llm_fused": "TEMA-LLM (Eq. 9 fused)",
    "sasrec": "SASRec",
    "gru4rec": "GRU4Rec",
    "popularity": "Popularity",
}
ABLATION_GROUPS = ("llm_emf_table4", "tema_table4", "tema_table5", "tema_table6")


@dataclass(frozen=True)
class RunSpec:
    name: str
    model: ModelConfig
    tags: str | None  # tag-matrix variant the run reads; None: the model has no tag tower
    ablation_group: str | None = None


def _tags_for(model: ModelConfig, variant: str) -> str | None:
    return variant if "tag" in model.modalities and model.architecture == "sequential" else None


def ablation_rows(group: str, absent: frozenset[str] = frozenset()) -> dict[str, ModelConfig]:
    """The model config each row of an ablation table trains, where no item has the
    features of the modalities in ``absent``.

    A model leaves out a tower whose features no item has, so a row without such a
    tower and the row that adds only it are the same model. The row without it then
    trains the config of the row with it: one identity, so the pair trains once (the
    second is reused as a :func:`finished_twin`), and the config is the one the model
    presets use (LLM-EMF keeps ``img`` in its modalities on a release without images),
    so a table row equal to a model asset's run reuses that run too. On the Food-Kitchen
    release (no images) LLM-EMF Table 4's six rows are three runs: ``+visual`` is
    ``original``, ``+text+visual`` is ``+text`` (LLM-EMF title only) and ``full`` is
    ``+text+llm`` (LLM-EMF).
    """
    rows = ABLATIONS[group]
    canonical = {}
    for label, model in rows.items():
        present = frozenset(model.modalities) - absent
        twins = [
            other
            for other in rows.values()
            if dataclasses.replace(other, modalities=model.modalities) == model and frozenset(other.modalities) - absent == present
        ]
        canonical[label] = max(twins, key=lambda m: len(m.modalities))  # itself at least; the one naming most absent towers
    return canonical


def plan_runs(
    models: list[str] | tuple[str, ...],
    ablations: list[str] | tuple[str, ...] = (),
    *,
    selection: str = "hybrid",
    representation: str = "weighted",
    absent: frozenset[str] = frozenset(),
) -> list[RunSpec]:
    """The runs of the requested models and ablation tables, in order, without duplicate names.

    ``selection`` and ``representation`` are the default tag matrix's: Table V varies
    the representation at that selection, Table VI the selection at that representation.
    ``absent``: the modalities no item has features for (see :func:`ablation_rows`).
    """
    unknown = [m for m in models if m not in MODELS] + [a for a in ablations if a not in ABLATION_GROUPS]
    if unknown:
        raise ValueError(f"unknown models/ablations {unknown}; models: {MODELS}; ablations: {ABLATION_GROUPS}")
    runs = [RunSpec(MODEL_NAMES[m], PRESETS[m], _tags_for(PRESETS[m], "default")) for m in models]
    for group in ablations:
        if group == "llm_emf_table4":
            rows = [RunSpec(f"LLM-EMF T4: {label}", model, None, group) for label, model in ablation_rows(group, absent).items()]
        elif group == "tema_table4":
            rows = []
            for label, model in ablation_rows(group, absent).items():
                variant = STATIC_VARIANT if "static" in label else "default"
                rows.append(RunSpec(f"TEMA T4: {label}", model, _tags_for(model, variant), group))
        elif group == "tema_table5":
            rows = [
                RunSpec(f"TEMA T5: {rep}", PRESETS["tema_llm"], variant_name(selection, rep), group) for rep in REPRESENTATIONS
            ]
        else:  # tema_table6
            rows = [
                RunSpec(f"TEMA T6: {sel}", PRESETS["tema_llm"], variant_name(sel, representation), group) for sel in SELECTIONS
            ]
        runs.extend(rows)
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"runs requested twice: {duplicates}")
    return runs


def seeded_name(name: str, seed: int) -> str:
    """The name of a run trained again with another seed (the report groups them by ``seed_groups``)."""
    return f"{name} (seed {seed})"


_SEED_SUFFIX = re.compile(r" \(seed \d+\)$")


def without_seed(name: str) -> str:
    """A run's name without the suffix of :func:`seeded_name`: the runs that differ only by their seed share it."""
    return _SEED_SUFFIX.sub("", name)


def spec_of(config: TrainConfig, specs: Sequence[RunSpec]) -> RunSpec:
    """The spec a run of :func:`with_extra_runs` was made from (by its name)."""
    by_name = {spec.name: spec for spec in specs}
    name = without_seed(config.name)
    spec = by_name.get(name) or by_name.get(name.removesuffix(SINGLE_DOMAIN_SUFFIX))
    if spec is None:
        raise KeyError(f"run {config.name!r} comes from none of the specs {sorted(by_name)}")
    return spec


def with_extra_runs(
    configs: Sequence[TrainConfig],
    *,
    single_domain_users: bool,
    extra_seeds: Sequence[int],
    single_domain_patience: int | None = None,
) -> list[TrainConfig]:
    """``configs``, then (when asked) each again on the cross-domain and single-domain users
    (named ``<run> + single-domain users``, with ``single_domain_patience`` when given: its
    epochs are several times longer), then every one of those again with each extra seed
    other than its own (``<run> (seed N)``)."""
    runs = list(configs)
    if single_domain_users:
        runs += [
            dataclasses.replace(
                config,
                name=config.name + SINGLE_DOMAIN_SUFFIX,
                train_user_domains=SINGLE_DOMAIN_USERS,
                patience=single_domain_patience or config.patience,
            )
            for config in configs
        ]
    seeded = [
        dataclasses.replace(config, seed=seed, name=seeded_name(config.label, seed))
        for config in runs
        for seed in dict.fromkeys(extra_seeds)
        if seed != config.seed
    ]
    return runs + seeded


def slug(name: str) -> str:
    """A run's name as a folder name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_folder(cache: Path, config: TrainConfig, versions: dict[str, str]) -> Path:
    """The run's folder in the training cache ``cache``, named after its identity and the
    data versions of its inputs (a folder of the same run from before patience left the
    identity is reused)."""
    def folder(identity: str) -> Path:
        return cache / f"{slug(config.name)}-{stable_hash({'config': identity, 'inputs': versions})[:16]}"

    precision = run_precision(config)
    current = folder(run_identity(config, precision))
    if precision != "fp32":
        return current
    legacy = folder(config.legacy_identity_hash())
    return legacy if legacy.is_dir() and not current.is_dir() else current


def finished_twin(work: Path, features: FeatureInputs) -> Path | None:
    """A finished run folder beside ``work`` of the same run under another name, if any.

    :func:`run_folder` names a folder ``<name>-<key>``, the key hashing the run's identity
    (which leaves the name out) and its inputs' data versions. Those versions are per
    asset, so two tag-matrix variants of one asset share them: the feature files the
    twin recorded (its ``config.json``) must be the same files as well. Finished means
    it wrote its metrics; ``train_model`` then checks the checkpoint's full identity
    (config and a digest of every input file) before resuming from it.
    """
    key = work.name[-16:]
    for other in sorted(work.parent.glob(f"*-{key}")):
        if other == work or not (other / METRICS_FILE).is_file():
            continue
        try:
            recorded = json.loads((other / CONFIG_FILE).read_text())["features"]
        except (OSError, ValueError, KeyError):
            continue
        if recorded == features.to_dict():
            return other
    return None


def link_folder(source: Path, target: Path) -> None:
    """``target`` as a copy of the files of ``source``, hard-linked where the file system
    allows (the trainer replaces files atomically, so neither folder changes the other's
    files), made under a temporary name and renamed into place."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging, copy_function=os.link)
    except OSError:  # another file system, or one without hard links
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
    os.replace(staging, target)


def train_runs(
    configs: Sequence[TrainConfig],
    inputs_of: Callable[[TrainConfig], tuple[FeatureInputs, dict[str, str]]],
    sequences: Path,
    cache: Path,
    out: Path,
    progress: Callable[[str], None] = log.info,
) -> list[TrainResult]:
    """Train (or resume, or reuse) each run in its :func:`run_folder` under ``cache`` and
    publish it under ``out/runs/<run>/``. ``inputs_of(config)`` gives the feature files the
    run reads and the data versions that identify them."""
    results = []
    for index, config in enumerate(configs, start=1):
        progress(f"run {index}/{len(configs)}: {config.name}")
        features, versions = inputs_of(config)
        work = run_folder(cache, config, versions)
        twin = None if work.is_dir() else finished_twin(work, features)
        if twin is not None:
            progress(f"{config.name}: the same config and inputs as the finished run in {twin.name}; its files are reused")
            link_folder(twin, work)
        results.append(train_model(sequences, features, config, work))
        target = out / RUNS_DIR / slug(config.name)
        target.mkdir(parents=True)
        for name in KEPT_FILES:
            if (work / name).is_file():
                shutil.copy2(work / name, target / name)
    return results


def run_summary(result: TrainResult) -> dict:
    """Test MRR per domain and protocol at the best checkpoint, and how the run ended."""
    metrics = result.metrics
    best = metrics["best_checkpoint"]
    return {
        "best_epoch": best["epoch"],
        "epochs_run": metrics["epochs_run"],
        "stopped_early": metrics["stopped_early"],
        "train_user_domains": metrics["data"]["train_user_domains"],
        "test_mrr": {
            domain: {protocol: round(values["mrr"], 5) for protocol, values in by_protocol.items()}
            for domain, by_protocol in best["test"].items()
        },
        "notes": metrics["notes"],
    }


def plottable(result: TrainResult) -> dict[str, float | int]:
    """Numbers to plot over materializations: test and validation MRR at the best
    checkpoint per domain and protocol, the best epoch, epochs run, training seconds."""
    metrics = result.metrics
    best, names = metrics["best_checkpoint"], metrics["domain_names"]
    values: dict[str, float | int] = {}
    for split in ("valid", "test"):
        for domain, by_protocol in best[split].items():
            for protocol, row in by_protocol.items():
                values[f"{split} MRR {names.get(domain, domain)} ({protocol})"] = round(float(row["mrr"]), 6)
    values["best epoch"] = int(best["epoch"])
    values["epochs run"] = int(metrics["epochs_run"])
    values["training seconds"] = round(float(metrics["timing"]["total_seconds"]), 1)
    return values


def runs_problems(runs: list[Path]) -> list[str]:
    """Runs without an evaluated epoch or with non-finite metrics."""
    problems = [] if runs else ["no run folder"]
    for run in runs:
        epochs = pl.read_parquet(run / EPOCHS_FILE)
        metrics = epochs.select(pl.col("^(valid|test)_.*$"))
        if metrics.height == 0 or metrics.width == 0:
            problems.append(f"{run.name}: no evaluated epoch recorded")
        elif any(metrics[c].is_nan().any() or metrics[c].is_infinite().any() for c in metrics.columns):
            problems.append(f"{run.name}: non-finite validation/test metrics")
    return problems
