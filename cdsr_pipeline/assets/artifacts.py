"""The artifact contract: the files each asset writes into its folder of the store, their
schemas, and the typed readers through which a stage opens another stage's files, in one
place. The readers take a :class:`AssetFiles` (``_stage.DeclaredInputs``), which opens only
the files of the stage's declared dependencies, so what a stage reads is what its
fingerprint covers; no stage names another's file by a literal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.ingest import INTERACTIONS_FILE, ITEMS_FILE, QUARANTINE_FILE
from ..data.schema import AUGMENTED_TEXT, DOMAIN_TAGS, ITEM_TAG_SCORES, ITEMS, TAG_VOCABULARY
from ..data.sequences import DOMAINS_FILE, ITEMS_OUT, STATS_FILE
from ..features.tag_matrix import STATIC_VARIANT
from ..model import FeatureInputs
from ..model.runs import RunSpec
from ..storage import Manifest

__all__ = [
    "AUGMENTED_FILE",
    "DOMAIN_TAGS_FILE",
    "DOMAINS_FILE",
    "EMBEDDINGS_FILE",
    "FEATURE_ASSETS",
    "INTERACTIONS_FILE",
    "ISSUES_FILE",
    "ITEMS_FILE",
    "ITEMS_OUT",
    "QUARANTINE_FILE",
    "SCORES_FILE",
    "STATS_FILE",
    "VOCABULARY_FILE",
    "ArtifactContractError",
    "AssetFiles",
    "embeddings_path",
    "matrix_file",
    "read_augmented_text",
    "read_domain_tags",
    "read_items",
    "read_sequence_stats",
    "read_tag_scores",
    "read_tag_vocabulary",
    "run_feature_inputs",
    "tag_matrix_path",
    "tag_vocabulary_path",
]

# raw_interactions: INTERACTIONS_FILE, ITEMS_FILE, QUARANTINE_FILE (data.ingest)
# cdsr_sequences: ITEMS_OUT, DOMAINS_FILE, STATS_FILE and the splits (data.sequences)

EMBEDDINGS_FILE = "embeddings.parquet"
"""item_text_embeddings, item_image_embeddings, item_llm_text_embeddings: one vector per item."""
ISSUES_FILE = "image_issues.parquet"
"""item_image_embeddings: the images that could not be fetched or decoded, with why."""
AUGMENTED_FILE = "augmented_text.parquet"
"""llm_augmented_text: the LLM's text per item (status ok / failed / no_title)."""
DOMAIN_TAGS_FILE = "domain_tags.parquet"
"""domain_tag_vocabularies: the voted tags of each domain."""
VOCABULARY_FILE = "tag_vocabulary.parquet"
"""domain_tag_vocabularies: tag id -> tag, over both domains."""
SCORES_FILE = "scores.parquet"
"""item_tag_scores: relevance 1..100 of (item, tag)."""


def matrix_file(variant: str) -> str:
    """item_tag_matrix: the matrix of ``default``, ``static`` or ``<selection>-<representation>``."""
    return f"matrix-{variant}.parquet"


class AssetFiles(Protocol):
    """Where a stage finds its inputs' files (``_stage.DeclaredInputs``: declared deps only)."""

    def path(self, asset: str, name: str) -> Path: ...

    def paths(self, asset: str, name: str) -> list[Path]: ...

    def manifest(self, asset: str) -> Manifest: ...


class ArtifactContractError(RuntimeError):
    """An artifact file lacks a column its contract names (written by other code, or edited)."""


def _read(files: AssetFiles, asset: str, name: str, schema: pa.Schema) -> pa.Table:
    """The file ``name`` of ``asset``; of a sharded asset, its shards' files together."""
    tables = []
    for path in files.paths(asset, name):
        table = pq.read_table(path)
        missing = [field.name for field in schema if field.name not in table.schema.names]
        if missing:
            raise ArtifactContractError(f"{path}: no column(s) {', '.join(missing)}, which the artifact contract of {asset} names")
        tables.append(table)
    if len(tables) == 1:
        return tables[0]
    # shards hold items: their union in item order (a stable sort keeps each item's rows
    # in their order) is the file one unsharded stage writes
    return pa.concat_tables(tables).sort_by("item_id")


def read_items(files: AssetFiles) -> pa.Table:
    """cdsr_sequences: the kept items (``data.schema.ITEMS``), in id order."""
    return _read(files, "cdsr_sequences", ITEMS_OUT, ITEMS)


def read_sequence_stats(files: AssetFiles) -> dict:
    """cdsr_sequences: the split's statistics (the papers' Table 1 and the filter's counts)."""
    return json.loads(files.path("cdsr_sequences", STATS_FILE).read_text())


def read_augmented_text(files: AssetFiles) -> pa.Table:
    """llm_augmented_text: the LLM's text per item (``data.schema.AUGMENTED_TEXT``)."""
    return _read(files, "llm_augmented_text", AUGMENTED_FILE, AUGMENTED_TEXT)


def read_domain_tags(files: AssetFiles) -> pa.Table:
    """domain_tag_vocabularies: the voted tags of each domain (``data.schema.DOMAIN_TAGS``)."""
    return _read(files, "domain_tag_vocabularies", DOMAIN_TAGS_FILE, DOMAIN_TAGS)


def read_tag_vocabulary(files: AssetFiles) -> pa.Table:
    """domain_tag_vocabularies: tag id -> tag over both domains (``data.schema.TAG_VOCABULARY``)."""
    return _read(files, "domain_tag_vocabularies", VOCABULARY_FILE, TAG_VOCABULARY)


def read_tag_scores(files: AssetFiles) -> pa.Table:
    """item_tag_scores: relevance of (item, tag) pairs (``data.schema.ITEM_TAG_SCORES``)."""
    return _read(files, "item_tag_scores", SCORES_FILE, ITEM_TAG_SCORES)


def embeddings_path(files: AssetFiles, asset: str) -> Path:
    """The embedding table of ``asset`` (item_text_embeddings, item_image_embeddings,
    item_llm_text_embeddings), which the models read in their own loader."""
    return files.path(asset, EMBEDDINGS_FILE)


def tag_matrix_path(files: AssetFiles, variant: str) -> Path:
    """item_tag_matrix: the matrix of ``variant`` (``default``, ``static``, ``<selection>-<representation>``)."""
    return files.path("item_tag_matrix", matrix_file(variant))


def tag_vocabulary_path(files: AssetFiles) -> Path:
    """domain_tag_vocabularies: the vocabulary file, for readers that open it themselves."""
    return files.path("domain_tag_vocabularies", VOCABULARY_FILE)


# -- what a model run reads ----------------------------------------------------------

# modality -> the asset of its embedding table
FEATURE_ASSETS = {
    "img": "item_image_embeddings",
    "tex": "item_text_embeddings",
    "llm": "item_llm_text_embeddings",
}


def run_feature_inputs(inputs: AssetFiles, spec: RunSpec) -> tuple[FeatureInputs, dict[str, str]]:
    """The feature tables a run of ``spec`` reads (only the modalities its model uses, and
    only those some item has), and the data versions that identify them."""
    versions = {"cdsr_sequences": inputs.manifest("cdsr_sequences").data_version}
    paths, provenance = {}, {}
    for modality, asset in FEATURE_ASSETS.items():
        if modality not in spec.model.modalities or spec.model.architecture != "sequential":
            continue
        manifest = inputs.manifest(asset)
        if not manifest.metadata.get("present"):
            continue  # no item has this feature (e.g. no images): the model leaves it out
        paths[modality] = embeddings_path(inputs, asset)
        versions[asset] = manifest.data_version
        encoder = manifest.metadata.get("encoder", {})
        provenance[modality] = f"{encoder.get('backend', '?')} {encoder.get('model', '?')}"
    tags = vocabulary = None
    if spec.tags is not None:
        matrix = inputs.manifest("item_tag_matrix")
        vocab = inputs.manifest("domain_tag_vocabularies")
        tags = tag_matrix_path(inputs, spec.tags)
        vocabulary = tag_vocabulary_path(inputs)
        versions["item_tag_matrix"] = matrix.data_version
        versions["domain_tag_vocabularies"] = vocab.data_version
        llm = vocab.metadata.get("llm", {})
        by = f"{llm.get('backend', '?')} {llm.get('model', '?')}"
        provenance["tag"] = (
            f"tag matrix '{spec.tags}' (keyword matches of the titles against the vocabulary by {by})"
            if spec.tags == STATIC_VARIANT
            else f"tag matrix '{spec.tags}' (vocabulary and scores by {by})"
        )
    if "llm" in provenance:
        augmenter = inputs.manifest("llm_augmented_text").metadata.get("llm", {})
        provenance["llm"] += f" of text by {augmenter.get('backend', '?')} {augmenter.get('model', '?')}"
    features = FeatureInputs(
        img=paths.get("img"), tex=paths.get("tex"), llm=paths.get("llm"), tags=tags, tag_vocabulary=vocabulary,
        provenance=provenance,
    )
    return features, versions
