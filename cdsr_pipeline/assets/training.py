"""Stage 4: one asset per trained model or ablation table, and the evaluation report.

Each model asset depends only on what its runs read: SASRec, GRU4Rec and popularity on
``cdsr_sequences`` alone, LLM-EMF on the text (and image, and augmented-text)
embeddings, TEMA-LLM on those plus the tag matrix. So a baseline trains before any
LLM stage has run, and the title-only LLM-EMF before the augmentation exists. Files
are read through :class:`~._stage.DeclaredInputs`, which refuses an asset that is not
among the asset's ``deps``: what a run reads is what it is fingerprinted by.

Runs train in ``storage/cache/training/`` and are published into the asset's artifact
under ``runs/<run>/`` by :func:`cdsr_pipeline.model.runs.train_runs` (resumed after a
crash, reused when nothing they read changed); the report collects the runs of every
model asset that has been materialized and lists the ones that have not.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from ..model import ModelConfig, TrainConfig
from ..model.config import ABLATIONS, PRESETS
from ..model.runs import (
    RUNS_DIR,
    SINGLE_DOMAIN_SUFFIX,
    RunSpec,
    plan_runs,
    plottable,
    run_summary,
    runs_problems,
    spec_of,
    train_runs,
    with_extra_runs,
)
from ..report import write_report
from ..resources import StorageResource
from ..storage import ArtifactStore, MissingArtifactError
from ._config import dagster_config, dagster_fields
from ._stage import HEAVY_TAG, DeclaredInputs, run_stage
from .artifacts import FEATURE_ASSETS, read_sequence_stats, run_feature_inputs

MODEL_SETTINGS = ("hidden_dim", "temperature", "alpha", "lambda1", "lambda2", "sequence_weighting", "dropout", "loss_negatives")
"""The ``ModelConfig`` fields a model asset's config sets (the rest is the preset's: the model's definition)."""
RUN_FIELDS_FROM_SPEC = ("model", "name", "ablation_group")  # the run's, not the asset config's
FIXED_TRAIN_FIELDS = ("selection_protocol", "eval_batch_size", "progress")  # the library's defaults, not settings


class _TrainingSettingsBase(dg.Config):
    """The settings of a model asset that are not a ``TrainConfig`` or ``ModelConfig``
    field, and how the settings become the runs' ``TrainConfig``s."""

    also_with_single_domain_users: bool = Field(
        default=False,
        description="Also train each run on the cross-domain AND single-domain users (train_user_domains both, A, B), "
        f"as a separate run named '<run>{SINGLE_DOMAIN_SUFFIX}'.",
    )
    single_domain_users_patience: int | None = Field(
        default=None,
        ge=1,
        description="Patience of the single-domain-users runs (empty: patience). Their epochs hold several times "
        "the updates of a cross-domain epoch (the LLMCDSR release: 200 batches against 30), so the same patience "
        "in epochs waits several times as many updates.",
    )
    extra_seeds: list[int] = Field(
        default=[],
        description="Train each run again with each of these seeds, as runs named '<run> (seed N)': the report "
        "then gives the mean and spread over the seeds (what one run's number is worth).",
    )

    def train_config(self, spec: RunSpec) -> TrainConfig:
        """The run of ``spec`` under these settings (the model settings apply to sequential models only)."""
        values = {name: tuple(value) if isinstance(value, list) else value for name, value in self.model_dump().items()}
        model = spec.model
        if model.architecture == "sequential":
            model = dataclasses.replace(model, **{name: values[name] for name in MODEL_SETTINGS})
        train = {name: values[name] for name in _TRAIN_SETTINGS}
        return TrainConfig(model=model, name=spec.name, ablation_group=spec.ablation_group, **train)

    def run_configs(self, specs: list[RunSpec]) -> list[TrainConfig]:
        """The runs to train: each spec, with single-domain users and extra seeds when asked."""
        return with_extra_runs(
            [self.train_config(spec) for spec in specs],
            single_domain_users=self.also_with_single_domain_users,
            extra_seeds=self.extra_seeds,
            single_domain_patience=self.single_domain_users_patience,
        )


_TRAIN_SETTINGS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_FIELDS_FROM_SPEC + FIXED_TRAIN_FIELDS
)
TrainingSettings = dagster_config(
    TrainConfig,
    "TrainingSettings",
    """How a model asset trains its runs (docs/SPEC.md "Model"; the papers' settings by default):
    the fields of ``TrainConfig`` and the ``ModelConfig`` fields in ``MODEL_SETTINGS``, declared
    once in those dataclasses. Every model asset has its own copy, so a baseline can be tuned
    on validation like the others.""",
    base=_TrainingSettingsBase,
    fields=dagster_fields(TrainConfig, include=_TRAIN_SETTINGS) | dagster_fields(ModelConfig, include=MODEL_SETTINGS),
)


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


def train_asset_runs(
    context: dg.AssetExecutionContext, inputs: DeclaredInputs, config: TrainingSettings, specs: list[RunSpec], folder: Path
) -> dict:
    """Train (or resume, or reuse) the asset's runs into ``folder/runs/``; metadata of the asset."""
    configs = config.run_configs(specs)
    results = train_runs(
        configs,
        lambda run: run_feature_inputs(inputs, spec_of(run, specs)),
        inputs.asset_dir("cdsr_sequences"),
        inputs.store.cache_dir("training"),
        folder,
        context.log.info,
    )
    summary, values = {}, {}
    for result in results:
        summary[result.config.name] = run_summary(result)
        prefix = "" if len(results) == 1 else f"{result.config.name} / "
        values.update({prefix + k: v for k, v in plottable(result).items()})
    return {"runs": summary, "device": config.device, "patience": config.patience, "max_epochs": config.epochs} | values


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
        deps = self.deps()
        absent = frozenset(
            modality
            for modality, asset in FEATURE_ASSETS.items()
            if asset in deps and not inputs.manifest(asset).metadata.get("present")
        )
        return plan_runs(
            self.plan,
            (self.ablation,) if self.ablation else (),
            selection=selection or "hybrid",
            representation=representation or "weighted",
            absent=absent,
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
            context, store, build=lambda folder: train_asset_runs(context, inputs, config, specs, folder), config=config.model_dump()
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


training_checks = [_runs_finished(spec.name) for spec in TRAINING_ASSETS]


def _manifest_if_complete(store: ArtifactStore, asset: str):
    try:
        return store.require(asset)
    except MissingArtifactError:
        return None


@dg.asset(
    deps=[spec.name for spec in TRAINING_ASSETS] + ["cdsr_sequences"],
    group_name="training",
    code_version="3",  # 3: ablation rows in the paper's order, rows that are one run marked
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
        declared = DeclaredInputs.of(context, store)
        stats = read_sequence_stats(declared)
        runs = [run for name in inputs if name != "cdsr_sequences" for run in run_dirs(store, name)]
        paths = write_report(runs, folder, stats, missing=missing, sequences_dir=declared.asset_dir("cdsr_sequences"))
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
