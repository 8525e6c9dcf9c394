"""Stage 3: LLM-augmented item text (LLM-EMF) and LLM tags (TEMA-LLM).

Every LLM call goes through the call log (``storage/cache/llm_calls.duckdb``): an asset
that reruns asks only what was never answered, and an interrupted run resumes. The
assets run one at a time (the definitions use the in-process executor): on a small
machine two LLM stages side by side only fight for the same cores.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from ..features.embeddings import CachedTextEncoder, encode_texts_by_item
from ..features.encoders import load_text_encoder
from ..features.tag_matrix import TagMatrixConfig, all_tag_matrices
from ..llm import (
    AugmentationConfig,
    TagScoringConfig,
    VocabularyConfig,
    augment_items,
    build_tag_vocabularies,
    domain_names,
    llm_session,
    score_item_tags,
)
from ..resources import LLMResource, StorageResource, TextEncoderResource
from ..storage import ArtifactStore, write_parquet_atomic
from ._config import dagster_config
from ._stage import HEAVY_TAG, DeclaredInputs, run_stage
from .artifacts import (
    AUGMENTED_FILE,
    DOMAIN_TAGS_FILE,
    EMBEDDINGS_FILE,
    SCORES_FILE,
    VOCABULARY_FILE,
    matrix_file,
    read_augmented_text,
    read_domain_tags,
    read_items,
    read_tag_scores,
    read_tag_vocabulary,
)


def _llm_session(store: ArtifactStore, llm: LLMResource, context: dg.AssetExecutionContext):
    # an LLM stage of another run waits for this one (one writer per call log)
    holder = f"{context.asset_key.path[-1]} in Dagster run {context.run_id}"
    return llm_session(store, llm.llm_config(store), holder, on_wait=context.log.warning)


class LLMFailureLimit(dg.Config):
    max_share: float = Field(default=0.05, description="Fail when failed LLM answers / calls exceeds this.")


def _failure_check(store: ArtifactStore, asset: str, limit: float) -> dg.AssetCheckResult:
    meta = store.require(asset).metadata
    share = meta.get("failure_share", 0.0)
    return dg.AssetCheckResult(
        passed=share <= limit,
        metadata={
            "failure_share": share,
            "limit": limit,
            "failed": meta.get("failed", 0),
            "calls": meta.get("calls", 0),
            "sample_failures": dg.MetadataValue.json(meta.get("failures", [])[:5]),
        },
    )


# -- LLM-EMF: augmented text ---------------------------------------------------------


AugmentationSettings = dagster_config(
    AugmentationConfig, "AugmentationSettings", "LLM-EMF §3.3: the SPEC's prompt per item; the answer is encoded like E_tex."
)


@dg.asset(
    op_tags={HEAVY_TAG: "llm"},
    deps=["cdsr_sequences"],
    group_name="llm",
    code_version="1",
    kinds={"ollama", "duckdb", "parquet"},
    description="LLM-EMF: LLM-generated contextual text per item (status ok / failed / no_title).",
)
def llm_augmented_text(
    context: dg.AssetExecutionContext, config: AugmentationSettings, storage: StorageResource, llm: LLMResource
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)

    def build(folder: Path):
        with _llm_session(store, llm, context) as (backend, call_log):
            result = augment_items(read_items(inputs), backend, call_log, AugmentationConfig(**config.model_dump()))
        write_parquet_atomic(result.table, folder / AUGMENTED_FILE)
        return result.metadata() | {"llm": dict(backend.identity)}

    return run_stage(context, store, build=build, config=config.model_dump(), extra_inputs={"llm": llm.fingerprint(store)})


@dg.asset_check(asset=llm_augmented_text, description="Share of failed augmentation answers stays under a limit.")
def augmentation_failures_within_limit(storage: StorageResource, config: LLMFailureLimit) -> dg.AssetCheckResult:
    return _failure_check(storage.store(), "llm_augmented_text", config.max_share)


@dg.asset(
    op_tags={HEAVY_TAG: "encoder"},
    deps=["llm_augmented_text", "cdsr_sequences"],
    group_name="llm",
    code_version="1",
    kinds={"pytorch", "parquet"},
    description="E_llm: the augmented text encoded with the text encoder of E_tex.",
)
def item_llm_text_embeddings(
    context: dg.AssetExecutionContext, storage: StorageResource, text_encoder: TextEncoderResource
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)

    def build(folder: Path):
        augmented = read_augmented_text(inputs)
        encoder = load_text_encoder(text_encoder.spec())
        table, stats = encode_texts_by_item(
            augmented["item_id"].to_pylist(),
            augmented["text"].to_pylist(),
            encoder,
            store.cache_dir("features"),
            feature="llm_text",
        )
        write_parquet_atomic(table, folder / EMBEDDINGS_FILE)
        return stats.as_metadata()

    return run_stage(context, store, build=build, extra_inputs={"text_encoder": text_encoder.fingerprint(store)})


# -- TEMA-LLM: tags ----------------------------------------------------------------


VocabularySettings = dagster_config(
    VocabularyConfig, "VocabularySettings", "TEMA Alg. 1: R queries per domain at temperature 0 (seed varies), frequency voting."
)


@dg.asset(
    op_tags={HEAVY_TAG: "llm"},
    deps=["cdsr_sequences"],
    group_name="llm",
    code_version="1",
    kinds={"ollama", "duckdb", "parquet"},
    description="TEMA Alg. 1: voted tag list per domain (domain_tags.parquet) and their union (tag_vocabulary.parquet).",
)
def domain_tag_vocabularies(
    context: dg.AssetExecutionContext, config: VocabularySettings, storage: StorageResource, llm: LLMResource
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)

    def build(folder: Path):
        with _llm_session(store, llm, context) as (backend, call_log):
            result = build_tag_vocabularies(
                domain_names(read_items(inputs)), backend, call_log, VocabularyConfig(**config.model_dump())
            )
        write_parquet_atomic(result.domain_tags, folder / DOMAIN_TAGS_FILE)
        write_parquet_atomic(result.vocabulary, folder / VOCABULARY_FILE)
        tags = result.domain_tags.to_pylist()
        return result.stats.as_metadata() | {
            "num_tags": result.vocabulary.num_rows,
            "tags_by_domain": {d: [t["tag"] for t in tags if t["domain"] == d] for d in sorted({t["domain"] for t in tags})},
            "llm": dict(backend.identity),
        }

    return run_stage(context, store, build=build, config=config.model_dump(), extra_inputs={"llm": llm.fingerprint(store)})


TagScoringSettings = dagster_config(
    TagScoringConfig, "TagScoringSettings", "TEMA §III-D: relevance 1..100 of (item, tag) pairs of the item's domain."
)


@dg.asset(
    op_tags={HEAVY_TAG: "llm"},
    deps=["cdsr_sequences", "domain_tag_vocabularies"],
    group_name="llm",
    code_version="1",
    kinds={"ollama", "duckdb", "parquet"},
    description="LLM relevance 1..100 of each item's candidate tags (tags of its own domain).",
)
def item_tag_scores(
    context: dg.AssetExecutionContext,
    config: TagScoringSettings,
    storage: StorageResource,
    llm: LLMResource,
    text_encoder: TextEncoderResource,
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)
    extra = {"llm": llm.fingerprint(store)}
    if config.candidates:
        extra["text_encoder"] = text_encoder.fingerprint(store)

    def build(folder: Path):
        domain_tags, vocabulary = read_domain_tags(inputs), read_tag_vocabulary(inputs)
        encoder = (
            CachedTextEncoder(load_text_encoder(text_encoder.spec()), store.cache_dir("features"))
            if config.candidates
            else None
        )
        with _llm_session(store, llm, context) as (backend, call_log):
            result = score_item_tags(
                read_items(inputs), domain_tags, vocabulary, backend, call_log, TagScoringConfig(**config.model_dump()), encoder
            )
        write_parquet_atomic(result.table, folder / SCORES_FILE)
        return result.metadata() | {"llm": dict(backend.identity)}

    return run_stage(context, store, build=build, config=config.model_dump(), extra_inputs=extra)


@dg.asset_check(asset=item_tag_scores, description="Share of failed scoring answers stays under a limit.")
def tag_scoring_failures_within_limit(storage: StorageResource, config: LLMFailureLimit) -> dg.AssetCheckResult:
    return _failure_check(storage.store(), "item_tag_scores", config.max_share)


TagMatrixSettings = dagster_config(
    TagMatrixConfig, "TagMatrixSettings", "Selection and representation of the default tag matrix (TEMA Tables V, VI)."
)


@dg.asset(
    deps=["item_tag_scores", "domain_tag_vocabularies", "cdsr_sequences"],
    group_name="llm",
    code_version="1",
    kinds={"parquet"},
    description="Sparse item-tag weights w_v (TEMA Eq. 3): the configured default, every selection x "
    "representation variant (ablations, Tables V/VI) and the static keyword baseline (Table IV).",
)
def item_tag_matrix(context: dg.AssetExecutionContext, config: TagMatrixSettings, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)

    def build(folder: Path):
        matrices, metadata = all_tag_matrices(
            read_tag_scores(inputs),
            read_items(inputs),
            read_domain_tags(inputs),
            read_tag_vocabulary(inputs),
            TagMatrixConfig(**config.model_dump()),
        )
        for name, table in matrices.items():
            write_parquet_atomic(table, folder / matrix_file(name))
        return metadata

    return run_stage(context, store, build=build, config=config.model_dump())
