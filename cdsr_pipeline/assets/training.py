"""Stage 4: one asset per trained model or ablation table, and the evaluation report.

Each model asset depends only on what its runs read: SASRec, GRU4Rec and popularity on
``cdsr_sequences`` alone, LLM-EMF on the text (and image, and augmented-text)
embeddings, TEMA-LLM on those plus the tag matrix. So a baseline trains before any
LLM stage has run, and the title-only LLM-EMF before the augmentation exists. Files
are read through :class:`~._stage.DeclaredInputs`, which refuses an asset that is not
among the asset's ``deps``: what a run reads is what it is fingerprinted by.

Each run trains in its own folder under ``storage/cache/training/`` named after what
determines it (its config and the data versions of the inputs it reads), so a crashed
run resumes from its last epoch and a run whose inputs did not change is not trained
again. Finished runs are copied into the asset's artifact (without the optimizer
state) under ``runs/<run>/``; the report collects the runs of every model asset that
has been materialized and lists the ones that have not.
"""

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from ..model import FeatureInputs, ModelConfig, TrainConfig, TrainResult, train_model, write_report
from ..model.config import ABLATIONS, PRESETS
from ..model.runs import RunSpec, plan_runs
from ..model.trainer import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    EPOCHS_FILE,
    METRICS_FILE,
    TEST_RANKS_FILE,
    run_identity,
    run_precision,
)
from ..resources import StorageResource
from ..storage import ArtifactStore, MissingArtifactError, stable_hash
from ._stage import HEAVY_TAG, DeclaredInputs, run_stage
from .artifacts import EMBEDDINGS_FILE, STATS_FILE, VOCABULARY_FILE, matrix_file

RUNS_DIR = "runs"
KEPT_FILES = (CONFIG_FILE, EPOCHS_FILE, METRICS_FILE, BEST_CHECKPOINT, TEST_RANKS_FILE)  # what a run folder publishes
FEATURE_ASSETS = {
    "img": "item_image_embeddings",
    "tex": "item_text_embeddings",
    "llm": "item_llm_text_embeddings",
}
SINGLE_DOMAIN_SUFFIX = " + single-domain users"


class TrainingSettings(dg.Config):
    """How a model asset trains its runs (SPEC "Model"; the papers' settings by default,
    taken from ``ModelConfig`` and ``TrainConfig``). Every model asset has its own copy,
    so a baseline can be tuned on validation like the others."""

    epochs: int = Field(default=TrainConfig.epochs, description="Maximum epochs.")
    patience: int = Field(default=TrainConfig.patience, description="Epochs without a better validation MRR before stopping.")
    batch_size: int = Field(default=TrainConfig.batch_size, description="Sequences per step (every position is an example).")
    learning_rate: float = Field(default=TrainConfig.learning_rate, description="Adam.")
    weight_decay: float = Field(default=TrainConfig.weight_decay, description="Adam.")
    max_len: int = Field(default=TrainConfig.max_len, description="Sequences are cut to their last max_len positions.")
    train_user_domains: list[str] = Field(
        default=list(TrainConfig.train_user_domains), description="Training sequences by users' domains: both (cross-domain), A, B."
    )
    also_with_single_domain_users: bool = Field(
        default=False,
        description="Also train each run on the cross-domain AND single-domain users (train_user_domains both, A, B), "
        f"as a separate run named '<run>{SINGLE_DOMAIN_SUFFIX}'.",
    )
    hidden_dim: int = Field(default=ModelConfig.hidden_dim, description="ID embedding, encoder width and tag embedding size.")
    temperature: float = Field(default=ModelConfig.temperature, description="τ of the cosine scores.")
    alpha: list[float] = Field(default=list(ModelConfig.alpha), description="Fusion weights of id, img, text; tag gets the rest.")
    lambda1: float = Field(default=ModelConfig.lambda1, description="Weight of the other domain's sequence.")
    lambda2: float = Field(default=ModelConfig.lambda2, description="Weight of the merged sequence.")
    sequence_weighting: str = Field(default=ModelConfig.sequence_weighting, description="target_relative | as_written.")
    dropout: float = Field(default=ModelConfig.dropout)
    loss_negatives: int | None = Field(default=ModelConfig.loss_negatives, description="Empty: full softmax; K: sampled-softmax speed-up.")
    num_negatives: int = Field(default=TrainConfig.num_negatives, description="Negatives per row of the sampled evaluation protocol.")
    negatives_seed: int = Field(default=TrainConfig.negatives_seed, description="Seed of the evaluation negatives (same for every model).")
    seed: int = Field(default=TrainConfig.seed, description="Initialisation, batch order and dropout.")
    extra_seeds: list[int] = Field(
        default=[],
        description="Train each run again with each of these seeds, as runs named '<run> (seed N)': the report "
        "then gives the mean and spread over the seeds (what one run's number is worth).",
    )
    device: str = Field(default=TrainConfig.device, description="auto (CUDA when present), cpu or cuda.")
    num_threads: int | None = Field(default=TrainConfig.num_threads, description="torch CPU threads; empty: torch's default.")
    precision: str = Field(
        default=TrainConfig.precision,
        description="auto (bf16 where the device multiplies bf16 natively, else fp32), fp32 or bf16: the training step's matrix products.",
    )
    processes: int = Field(
        default=TrainConfig.processes,
        description="Data-parallel processes (torchrun, DistributedDataParallel; gloo on CPU, nccl on CUDA), each with a share of every batch.",
    )

    def train_config(self, spec: RunSpec, train_user_domains: tuple[str, ...] | None = None) -> TrainConfig:
        model = spec.model
        if model.architecture == "sequential":
            model = dataclasses.replace(
                model,
                hidden_dim=self.hidden_dim,
                temperature=self.temperature,
                alpha=tuple(self.alpha),
                lambda1=self.lambda1,
                lambda2=self.lambda2,
                sequence_weighting=self.sequence_weighting,
                dropout=self.dropout,
                loss_negatives=self.loss_negatives,
            )
        return TrainConfig(
            model=model,
            name=spec.name,
            ablation_group=spec.ablation_group,
            max_len=self.max_len,
            train_user_domains=train_user_domains or tuple(self.train_user_domains),
            batch_size=self.batch_size,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            patience=self.patience,
            num_negatives=self.num_negatives,
            negatives_seed=self.negatives_seed,
            seed=self.seed,
            device=self.device,
            num_threads=self.num_threads,
            precision=self.precision,
            processes=self.processes,
        )

    def run_configs(self, specs: list[RunSpec]) -> list[TrainConfig]:
        """The runs to train: each spec, and each again with single-domain users when asked."""
        configs = [self.train_config(spec) for spec in specs]
        if self.also_with_single_domain_users:
            for spec in specs:
                extended = dataclasses.replace(spec, name=spec.name + SINGLE_DOMAIN_SUFFIX)
                configs.append(self.train_config(extended, train_user_domains=("both", "A", "B")))
        seeded = [
            dataclasses.replace(config, seed=seed, name=seeded_name(config.label, seed))
            for config in configs
            for seed in dict.fromkeys(self.extra_seeds)
            if seed != config.seed
        ]
        return configs + seeded


def seeded_name(name: str, seed: int) -> str:
    """The name of a run trained again with another seed (the report groups them by :func:`seed_group`)."""
    return f"{name} (seed {seed})"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def input_assets(models: list[ModelConfig], tags: bool) -> list[str]:
    """The assets whose files runs of ``models`` read (their ``deps``)."""
    needed = ["cdsr_sequences"]
    for model in models:
        if model.architecture != "sequential":
            continue
        needed += [asset for modality, asset in FEATURE_ASSETS.items() if modality in model.modalities]
        if "llm" in model.modalities:
            needed.append("llm_augmented_text")  # which LLM wrote the text: the report's provenance
    if tags:
        needed += ["item_tag_matrix", "domain_tag_vocabularies"]
    return list(dict.fromkeys(needed))


def _feature_inputs(inputs: DeclaredInputs, spec: RunSpec) -> tuple[FeatureInputs, dict[str, str]]:
    """The feature tables a run reads, and the data versions that identify them."""
    versions = {"cdsr_sequences": inputs.manifest("cdsr_sequences").data_version}
    paths, provenance = {}, {}
    for modality, asset in FEATURE_ASSETS.items():
        if modality not in spec.model.modalities or spec.model.architecture != "sequential":
            continue
        manifest = inputs.manifest(asset)
        if not manifest.metadata.get("present"):
            continue  # no item has this feature (e.g. no images): the model leaves it out
        paths[modality] = inputs.path(asset, EMBEDDINGS_FILE)
        versions[asset] = manifest.data_version
        encoder = manifest.metadata.get("encoder", {})
        provenance[modality] = f"{encoder.get('backend', '?')} {encoder.get('model', '?')}"
    tags = vocabulary = None
    if spec.tags is not None:
        matrix = inputs.manifest("item_tag_matrix")
        vocab = inputs.manifest("domain_tag_vocabularies")
        tags = inputs.path("item_tag_matrix", matrix_file(spec.tags))
        vocabulary = inputs.path("domain_tag_vocabularies", VOCABULARY_FILE)
        versions["item_tag_matrix"] = matrix.data_version
        versions["domain_tag_vocabularies"] = vocab.data_version
        llm = vocab.metadata.get("llm", {})
        provenance["tag"] = f"tag matrix '{spec.tags}' (vocabulary and scores by {llm.get('backend', '?')} {llm.get('model', '?')})"
    if "llm" in provenance:
        augmenter = inputs.manifest("llm_augmented_text").metadata.get("llm", {})
        provenance["llm"] += f" of text by {augmenter.get('backend', '?')} {augmenter.get('model', '?')}"
    features = FeatureInputs(
        img=paths.get("img"), tex=paths.get("tex"), llm=paths.get("llm"), tags=tags, tag_vocabulary=vocabulary,
        provenance=provenance,
    )
    return features, versions


def train_runs(
    context: dg.AssetExecutionContext, inputs: DeclaredInputs, config: TrainingSettings, specs: list[RunSpec], folder: Path
) -> dict:
    """Train (or resume, or reuse) each run and copy it into ``folder/runs/``; metadata of the asset."""
    store = inputs.store
    sequences = inputs.asset_dir("cdsr_sequences")
    summary, values = {}, {}
    configs = config.run_configs(specs)
    by_name = {spec.name: spec for spec in specs}
    for index, train_config in enumerate(configs, start=1):
        spec = by_name.get(train_config.name) or by_name[train_config.name.removesuffix(SINGLE_DOMAIN_SUFFIX)]
        context.log.info(f"run {index}/{len(configs)}: {train_config.name}")
        features, versions = _feature_inputs(inputs, spec)
        work = _run_folder(store, train_config, versions)
        result = train_model(sequences, features, train_config, work)
        target = folder / RUNS_DIR / _slug(train_config.name)
        target.mkdir(parents=True)
        for name in KEPT_FILES:
            if (work / name).is_file():
                shutil.copy2(work / name, target / name)
        summary[train_config.name] = _run_summary(result)
        prefix = "" if len(configs) == 1 else f"{train_config.name} / "
        values.update({prefix + k: v for k, v in _plottable(result).items()})
    return {"runs": summary, "device": config.device, "patience": config.patience, "max_epochs": config.epochs} | values


def _run_folder(store: ArtifactStore, config: TrainConfig, versions: dict[str, str]) -> Path:
    """The run's folder in the training cache, named after its config and inputs (a
    folder of the same run from before patience left the identity is reused)."""
    def folder(identity: str) -> Path:
        return store.cache_dir("training") / f"{_slug(config.name)}-{stable_hash({'config': identity, 'inputs': versions})[:16]}"

    precision = run_precision(config)
    current = folder(run_identity(config, precision))
    if precision != "fp32":
        return current
    legacy = folder(config.legacy_identity_hash())
    return legacy if legacy.is_dir() and not current.is_dir() else current


def _run_summary(result: TrainResult) -> dict:
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


def _plottable(result: TrainResult) -> dict[str, float | int]:
    """Numbers Dagster plots over materializations: test and validation MRR at the best
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


@dataclass(frozen=True)
class TrainingAsset:
    """A model or ablation table materialized as its own asset."""

    name: str
    description: str
    plan: tuple[str, ...] = ()  # models of ``plan_runs``
    ablation: str | None = None  # or an ablation table of ``plan_runs``
    in_full_pipeline: bool = True  # part of the ``cdsr_full_pipeline`` job (``cdsr run`` with no --select)

    def models(self) -> list[ModelConfig]:
        if self.ablation in ("tema_table5", "tema_table6"):
            return [PRESETS["tema_llm"]]
        if self.ablation:
            return list(ABLATIONS[self.ablation].values())
        return [PRESETS[m] for m in self.plan]

    def uses_tags(self) -> bool:
        return any("tag" in m.modalities and m.architecture == "sequential" for m in self.models())

    def deps(self) -> list[str]:
        return input_assets(self.models(), self.uses_tags())

    def specs(self, inputs: DeclaredInputs) -> list[RunSpec]:
        selection = representation = None
        if self.uses_tags():
            tag_config = inputs.manifest("item_tag_matrix").config
            selection, representation = tag_config.get("selection"), tag_config.get("representation")
        return plan_runs(
            self.plan,
            (self.ablation,) if self.ablation else (),
            selection=selection or "hybrid",
            representation=representation or "weighted",
        )


TRAINING_ASSETS = (
    TrainingAsset("sasrec_model", "SASRec (ID-only self-attention, merged sequence, full softmax); reads cdsr_sequences only.", ("sasrec",)),
    TrainingAsset("gru4rec_model", "GRU4Rec (ID-only GRU, merged sequence, full softmax); reads cdsr_sequences only.", ("gru4rec",)),
    TrainingAsset("popularity_model", "Popularity within the target domain (training counts); no training.", ("popularity",)),
    TrainingAsset(
        "llm_emf_title_model",
        "LLM-EMF with title text only (Table 4 without the LLM-enhanced text): trainable before the augmentation exists.",
        ("llm_emf_title",),
    ),
    TrainingAsset("llm_emf_model", "LLM-EMF: id + image + title and LLM-augmented text, three sequences, no tags.", ("llm_emf",)),
    TrainingAsset("tema_llm_model", "TEMA-LLM: LLM-EMF plus the LLM-matched weighted multi-hot tag tower.", ("tema_llm",)),
    TrainingAsset(
        "tema_llm_title_model",
        "TEMA-LLM with title text only (llm_emf_title_model plus the tag tower): the tags' contribution, before the augmentation exists.",
        ("tema_llm_title",),
    ),
    TrainingAsset(
        "tema_llm_fused_model", "TEMA-LLM with TEMA Eq. 9 (one MLP-fused item embedding).", ("tema_llm_fused",), in_full_pipeline=False
    ),
    TrainingAsset("llm_emf_table4_runs", "Ablation: LLM-EMF Table 4 (modalities).", ablation="llm_emf_table4", in_full_pipeline=False),
    TrainingAsset("tema_table4_runs", "Ablation: TEMA Table IV (tags, LLM matching, multi-attention).", ablation="tema_table4", in_full_pipeline=False),
    TrainingAsset("tema_table5_runs", "Ablation: TEMA Table V (one-hot / unweighted / weighted tag matrices).", ablation="tema_table5", in_full_pipeline=False),
    TrainingAsset("tema_table6_runs", "Ablation: TEMA Table VI (top-R / threshold / hybrid tag selection).", ablation="tema_table6", in_full_pipeline=False),
)
OPTIONAL_TRAINING_ASSETS = tuple(t.name for t in TRAINING_ASSETS if not t.in_full_pipeline)


def _training_asset(spec: TrainingAsset) -> dg.AssetsDefinition:
    @dg.asset(
        name=spec.name,
        op_tags={HEAVY_TAG: "training"},
        deps=spec.deps(),
        group_name="ablations" if spec.ablation else "training",
        code_version="1",
        kinds={"pytorch"},
        description=spec.description + " Best checkpoint, config, per-epoch metrics and test metrics under both "
        "protocols. CUDA when present.",
    )
    def _asset(context: dg.AssetExecutionContext, config: TrainingSettings, storage: StorageResource) -> dg.MaterializeResult:
        store = storage.store()
        inputs = DeclaredInputs.of(context, store)
        specs = spec.specs(inputs)
        return run_stage(
            context, store, build=lambda folder: train_runs(context, inputs, config, specs, folder), config=config.model_dump()
        )

    return _asset


training_assets = [_training_asset(spec) for spec in TRAINING_ASSETS]


def all_run_dirs(store: ArtifactStore) -> list[Path]:
    """The run folders of every materialized model asset."""
    return [run for spec in TRAINING_ASSETS for run in run_dirs(store, spec.name)]


def run_dirs(store: ArtifactStore, asset: str) -> list[Path]:
    runs = store.asset_dir(asset) / RUNS_DIR
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def _runs_finished(asset: str):
    @dg.asset_check(
        asset=asset, name="runs_finished", description="Every run of the asset finished with finite validation and test metrics."
    )
    def _check(storage: StorageResource) -> dg.AssetCheckResult:
        problems = runs_problems(run_dirs(storage.store(), asset))
        return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})

    return _check


def runs_problems(runs: list[Path]) -> list[str]:
    """Runs without an evaluated epoch or with non-finite metrics."""
    problems = [] if runs else ["no run folder"]
    for run in runs:
        epochs = pl.read_parquet(run / "epochs.parquet")
        metrics = epochs.select(pl.col("^(valid|test)_.*$"))
        if metrics.height == 0 or metrics.width == 0:
            problems.append(f"{run.name}: no evaluated epoch recorded")
        elif any(metrics[c].is_nan().any() or metrics[c].is_infinite().any() for c in metrics.columns):
            problems.append(f"{run.name}: non-finite validation/test metrics")
    return problems


training_checks = [_runs_finished(spec.name) for spec in TRAINING_ASSETS]


def _manifest_if_complete(store: ArtifactStore, asset: str):
    try:
        return store.require(asset)
    except MissingArtifactError:
        return None


@dg.asset(
    deps=[spec.name for spec in TRAINING_ASSETS],
    group_name="training",
    code_version="2",
    kinds={"html"},
    description="Markdown and HTML report of every model asset that has been materialized (the others are listed "
    "as missing): results per domain and protocol, the papers' numbers labelled with their dataset and protocol, "
    "learning curves, ablation tables.",
)
def evaluation_report(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    present = {name: _manifest_if_complete(store, name) for name in (spec.name for spec in TRAINING_ASSETS)}
    missing = [name for name, manifest in present.items() if manifest is None]
    inputs = {name: manifest.data_version for name, manifest in present.items() if manifest is not None}
    if not inputs:
        raise dg.Failure(
            "no model asset is materialized yet: materialize one first, e.g. `cdsr run --select sasrec_model`"
        )
    inputs["cdsr_sequences"] = store.require("cdsr_sequences").data_version

    def build(folder: Path):
        stats = json.loads(store.path("cdsr_sequences", STATS_FILE).read_text())
        runs = [run for name in inputs if name != "cdsr_sequences" for run in run_dirs(store, name)]
        paths = write_report(runs, folder, stats, missing=missing)
        return {
            "report_md": str(store.path("evaluation_report", paths.markdown.name)),
            "report_html": str(store.path("evaluation_report", paths.html.name)),
            "figures": [p.name for p in paths.figures],
            "model_assets": sorted(name for name in inputs if name != "cdsr_sequences"),
            "missing_model_assets": missing,
        }

    return run_stage(
        context,
        store,
        build=build,
        inputs=inputs | {"missing": ",".join(missing)},
        markdown=lambda meta: store.path("evaluation_report", "report.md").read_text(),
    )
