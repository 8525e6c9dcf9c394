"""Stage 3: LLM-augmented item text (LLM-EMF) and LLM tags (TEMA-LLM).

Every LLM call goes through the call log (``storage/cache/llm_calls.duckdb``): an asset
that reruns asks only what was never answered, and an interrupted run resumes. The
assets run one at a time (the definitions use the in-process executor): on a small
machine two LLM stages side by side only fight for the same cores. For a large
catalogue, ``CDSR_LLM_SHARDS=N`` partitions the per-item stages (augmentation, tag
scores) into N item shards that run side by side, each with its own call log
(``llm.shards``, ``llm.session``); the assets downstream read every shard.
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
from ..llm.shards import (
    artifact_names,
    configured_shards,
    items_digest,
    items_of_shard,
    shard_artifact,
    shard_items_input,
    stale_shards,
)
from ..resources import LLMResource, StorageResource, TextEncoderResource
from ..storage import ArtifactStore, write_parquet_atomic
from ._config import dagster_config
from ._stage import HEAVY_TAG, DeclaredInputs, run_stage, upstream_names, upstream_versions
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


SHARDS = configured_shards()
"""Item shards of the per-item LLM stages (``CDSR_LLM_SHARDS``, read when the definitions
load; ``llm.shards``): above 1, ``llm_augmented_text`` and ``item_tag_scores`` are
partitioned, one partition per shard."""
SHARD_PARTITIONS = dg.StaticPartitionsDefinition([str(k) for k in range(SHARDS)]) if SHARDS > 1 else None


def _shard(context: dg.AssetExecutionContext) -> int | None:
    """The shard this run of a per-item LLM stage builds (None: not sharded)."""
    return int(context.partition_key) if SHARDS > 1 else None


def _llm_session(store: ArtifactStore, llm: LLMResource, context: dg.AssetExecutionContext, shard: int | None = None):
    # an LLM stage of another run waits for this one (one writer per call log; a shard
    # writes its own, so shards run side by side)
    where = "" if shard is None else f" shard {shard} of {SHARDS}"
    holder = f"{context.asset_key.path[-1]}{where} in Dagster run {context.run_id}"
    return llm_session(store, llm.llm_config(store), holder, on_wait=context.log.warning, shard=shard)


def _stage_items(context: dg.AssetExecutionContext, store: ArtifactStore, inputs: DeclaredInputs, shard: int | None):
    """The items a per-item LLM stage asks about, its artifact and its upstream versions:
    every item, or one shard's items, fingerprinted by their content instead of the whole
    ``cdsr_sequences`` (so a shard whose items did not change is reused)."""
    items = read_items(inputs)
    if shard is None:
        return items, None, None
    items = items_of_shard(items, shard, SHARDS)
    versions = upstream_versions(store, [n for n in upstream_names(context) if n != "cdsr_sequences"], SHARDS)
    versions[shard_items_input(shard, SHARDS)] = items_digest(items)
    return items, shard_artifact(context.asset_key.path[-1], shard, SHARDS), versions


class StaleShardError(RuntimeError):
    """A shard was built from other items than ``cdsr_sequences`` holds now."""


def require_current_shards(inputs: DeclaredInputs, asset: str) -> None:
    """Refuse the shards of ``asset`` when one was built from other items than
    ``cdsr_sequences`` holds now: a run of the other stages (a scheduled rerun of
    cdsr_full_pipeline) does not rerun the shards, and their union would then leave
    new items out."""
    if inputs.shards == 1:
        return
    recorded = [
        inputs.store.require(name).inputs.get(shard_items_input(shard, inputs.shards))
        for shard, name in enumerate(artifact_names(asset, inputs.shards))
    ]
    stale = stale_shards(recorded, read_items(inputs))
    if stale:
        raise StaleShardError(
            f"shard(s) {', '.join(map(str, stale))} of {inputs.shards} of '{asset}' were built from other items than "
            f"cdsr_sequences holds now; rerun the shards first (CDSR_LLM_SHARDS={inputs.shards} cdsr run --select "
            f"{asset}, or a backfill of cdsr_llm_shards)"
        )


class LLMFailureLimit(dg.Config):
    max_share: float = Field(default=0.05, description="Fail when failed LLM answers / calls exceeds this.")


def _failure_check(store: ArtifactStore, asset: str, limit: float) -> dg.AssetCheckResult:
    # of a sharded asset: over the shards built so far
    manifests = [store.read_manifest(name) for name in artifact_names(asset, SHARDS)]
    metas = [manifest.metadata for manifest in manifests if manifest is not None] or [store.require(asset).metadata]
    failed, calls = sum(meta.get("failed", 0) for meta in metas), sum(meta.get("calls", 0) for meta in metas)
    share = failed / calls if calls else 0.0
    return dg.AssetCheckResult(
        passed=share <= limit,
        metadata={
            "failure_share": share,
            "limit": limit,
            "failed": failed,
            "calls": calls,
            "shards_built": f"{len(metas)} of {SHARDS}" if SHARDS > 1 else "-",
            "sample_failures": dg.MetadataValue.json([f for meta in metas for f in meta.get("failures", [])][:5]),
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
    partitions_def=SHARD_PARTITIONS,
    description="LLM-EMF: LLM-generated contextual text per item (status ok / failed / no_title).",
)
def llm_augmented_text(
    context: dg.AssetExecutionContext, config: AugmentationSettings, storage: StorageResource, llm: LLMResource
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)
    shard = _shard(context)
    items, artifact, versions = _stage_items(context, store, inputs, shard)

    def build(folder: Path):
        with _llm_session(store, llm, context, shard) as (backend, call_log):
            result = augment_items(items, backend, call_log, AugmentationConfig(**config.model_dump()))
        write_parquet_atomic(result.table, folder / AUGMENTED_FILE)
        return result.metadata() | {"llm": dict(backend.identity)}

    return run_stage(
        context, store, build=build, config=config.model_dump(), extra_inputs={"llm": llm.fingerprint(store)},
        inputs=versions, artifact=artifact,
    )


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
        require_current_shards(inputs, "llm_augmented_text")
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
    partitions_def=SHARD_PARTITIONS,
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
    shard = _shard(context)
    items, artifact, versions = _stage_items(context, store, inputs, shard)
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
        with _llm_session(store, llm, context, shard) as (backend, call_log):
            result = score_item_tags(
                items, domain_tags, vocabulary, backend, call_log, TagScoringConfig(**config.model_dump()), encoder
            )
        write_parquet_atomic(result.table, folder / SCORES_FILE)
        return result.metadata() | {"llm": dict(backend.identity)}

    return run_stage(context, store, build=build, config=config.model_dump(), extra_inputs=extra, inputs=versions, artifact=artifact)


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
        require_current_shards(inputs, "item_tag_scores")
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
