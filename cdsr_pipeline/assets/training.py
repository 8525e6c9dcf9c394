"""Stage 4: trained models (LLM-EMF, TEMA-LLM, baselines, ablations) and the evaluation report.

Each run trains in its own folder under ``storage/cache/training/`` named after what
determines it (its config and the data versions of the inputs it reads), so a crashed
run resumes from its last epoch and a run whose inputs did not change is not trained
again even when another run of the same request did change. Finished runs are copied
into the ``trained_model`` artifact (without the optimizer state).
"""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from ..model import FeatureInputs, ModelConfig, TrainConfig, TrainResult, train_model, write_report
from ..model.runs import ABLATION_GROUPS, MODELS, RunSpec, plan_runs
from ..resources import StorageResource
from ..storage import ArtifactStore, stable_hash
from ._stage import run_stage
from .features import EMBEDDINGS_FILE
from .llm import VOCABULARY_FILE, matrix_file

RUNS_DIR = "runs"
KEPT_FILES = ("config.json", "epochs.parquet", "metrics.json", "best.pt")
FEATURE_ASSETS = {
    "img": "item_image_embeddings",
    "tex": "item_text_embeddings",
    "llm": "item_llm_text_embeddings",
}


class TrainingSettings(dg.Config):
    """Which runs to train and how (SPEC "Model"; the papers' settings by default,
    taken from ``ModelConfig`` and ``TrainConfig``)."""

    models: list[str] = Field(
        default=["tema_llm", "llm_emf", "sasrec", "gru4rec", "popularity"], description=f"Any of {', '.join(MODELS)}."
    )
    ablations: list[str] = Field(default=[], description=f"Ablation tables to run: {', '.join(ABLATION_GROUPS)}.")
    epochs: int = Field(default=TrainConfig.epochs, description="Maximum epochs.")
    patience: int = Field(default=TrainConfig.patience, description="Epochs without a better validation MRR before stopping.")
    batch_size: int = Field(default=TrainConfig.batch_size, description="Sequences per step (every position is an example).")
    learning_rate: float = Field(default=TrainConfig.learning_rate, description="Adam.")
    weight_decay: float = Field(default=TrainConfig.weight_decay, description="Adam.")
    max_len: int = Field(default=TrainConfig.max_len, description="Sequences are cut to their last max_len positions.")
    train_user_domains: list[str] = Field(
        default=list(TrainConfig.train_user_domains), description="Training sequences by users' domains: both (cross-domain), A, B."
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
    device: str = Field(default=TrainConfig.device, description="auto (CUDA when present), cpu or cuda.")
    num_threads: int | None = Field(default=TrainConfig.num_threads, description="torch CPU threads; empty: torch's default.")

    def train_config(self, spec: RunSpec) -> TrainConfig:
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
            train_user_domains=tuple(self.train_user_domains),
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
        )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _feature_inputs(store: ArtifactStore, spec: RunSpec) -> tuple[FeatureInputs, dict[str, str]]:
    """The feature tables a run reads, and the data versions that identify them."""
    versions = {"cdsr_sequences": store.require("cdsr_sequences").data_version}
    paths, provenance = {}, {}
    for modality, asset in FEATURE_ASSETS.items():
        if modality not in spec.model.modalities or spec.model.architecture != "sequential":
            continue
        manifest = store.require(asset)
        if not manifest.metadata.get("present"):
            continue  # no item has this feature (e.g. no images): the model leaves it out
        paths[modality] = store.path(asset, EMBEDDINGS_FILE)
        versions[asset] = manifest.data_version
        encoder = manifest.metadata.get("encoder", {})
        provenance[modality] = f"{encoder.get('backend', '?')} {encoder.get('model', '?')}"
    tags = vocabulary = None
    if spec.tags is not None:
        matrix = store.require("item_tag_matrix")
        vocab = store.require("domain_tag_vocabularies")
        tags, vocabulary = store.path("item_tag_matrix", matrix_file(spec.tags)), store.path("domain_tag_vocabularies", VOCABULARY_FILE)
        versions["item_tag_matrix"] = matrix.data_version
        versions["domain_tag_vocabularies"] = vocab.data_version
        llm = vocab.metadata.get("llm", {})
        provenance["tag"] = f"tag matrix '{spec.tags}' (vocabulary and scores by {llm.get('backend', '?')} {llm.get('model', '?')})"
    if "llm" in provenance:
        augmenter = store.require("llm_augmented_text").metadata.get("llm", {})
        provenance["llm"] += f" of text by {augmenter.get('backend', '?')} {augmenter.get('model', '?')}"
    inputs = FeatureInputs(
        img=paths.get("img"), tex=paths.get("tex"), llm=paths.get("llm"), tags=tags, tag_vocabulary=vocabulary,
        provenance=provenance,
    )
    return inputs, versions


@dg.asset(
    deps=["cdsr_sequences", *FEATURE_ASSETS.values(), "domain_tag_vocabularies", "item_tag_matrix"],
    group_name="training",
    code_version="1",
    kinds={"pytorch"},
    description="Trained runs (TEMA-LLM, LLM-EMF, baselines, ablations): best checkpoint, config, per-epoch "
    "metrics and test metrics under both protocols. CUDA when present.",
)
def trained_model(context: dg.AssetExecutionContext, config: TrainingSettings, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    tag_config = store.require("item_tag_matrix").config
    specs = plan_runs(
        config.models,
        config.ablations,
        selection=tag_config.get("selection", "hybrid"),
        representation=tag_config.get("representation", "weighted"),
    )

    def build(folder: Path):
        sequences = store.asset_dir("cdsr_sequences")
        summary = {}
        for index, spec in enumerate(specs, start=1):
            context.log.info(f"run {index}/{len(specs)}: {spec.name}")
            features, versions = _feature_inputs(store, spec)
            train_config = config.train_config(spec)
            key = stable_hash({"config": train_config.identity_hash(), "inputs": versions})[:16]
            work = store.cache_dir("training") / f"{_slug(spec.name)}-{key}"
            result = train_model(sequences, features, train_config, work)
            target = folder / RUNS_DIR / _slug(spec.name)
            target.mkdir(parents=True)
            for name in KEPT_FILES:
                if (work / name).is_file():
                    shutil.copy2(work / name, target / name)
            summary[spec.name] = _run_summary(result)
        return {"runs": summary, "device": config.device, "patience": config.patience, "max_epochs": config.epochs}

    return run_stage(context, store, build=build, config=config.model_dump())


def _run_summary(result: TrainResult) -> dict:
    """Test MRR per domain and protocol at the best checkpoint, and how the run ended."""
    metrics = result.metrics
    best = metrics["best_checkpoint"]
    return {
        "best_epoch": best["epoch"],
        "epochs_run": metrics["epochs_run"],
        "stopped_early": metrics["stopped_early"],
        "test_mrr": {
            domain: {protocol: round(values["mrr"], 5) for protocol, values in by_protocol.items()}
            for domain, by_protocol in best["test"].items()
        },
        "notes": metrics["notes"],
    }


def run_dirs(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in (store.asset_dir("trained_model") / RUNS_DIR).iterdir() if p.is_dir())


@dg.asset_check(asset=trained_model, description="Every requested run finished with finite validation and test metrics.")
def runs_finished(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.store()
    problems = []
    for run in run_dirs(store):
        epochs = pl.read_parquet(run / "epochs.parquet")
        metrics = epochs.select(pl.col("^(valid|test)_.*$"))
        if metrics.height == 0 or metrics.width == 0:
            problems.append(f"{run.name}: no evaluated epoch recorded")
        elif any(metrics[c].is_nan().any() or metrics[c].is_infinite().any() for c in metrics.columns):
            problems.append(f"{run.name}: non-finite validation/test metrics")
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})


@dg.asset(
    deps=[trained_model],
    group_name="training",
    code_version="1",
    kinds={"html"},
    description="Markdown and HTML report: results per domain and protocol, the papers' numbers labelled "
    "with their dataset and protocol, learning curves, ablation tables.",
)
def evaluation_report(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()

    def build(folder: Path):
        stats = json.loads(store.path("cdsr_sequences", "stats.json").read_text())
        paths = write_report(run_dirs(store), folder, stats)
        return {
            "report_md": str(store.path("evaluation_report", paths.markdown.name)),
            "report_html": str(store.path("evaluation_report", paths.html.name)),
            "figures": [p.name for p in paths.figures],
        }

    return run_stage(
        context, store, build=build, markdown=lambda meta: store.path("evaluation_report", "report.md").read_text()
    )
