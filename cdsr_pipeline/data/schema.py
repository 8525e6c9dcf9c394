"""The tables that pass between stages: names, columns and Arrow types.

One place defines them so that every stage, test and benchmark agrees. Item ids are
global and contiguous: domain A's items are ``0 .. n_A - 1``, domain B's follow.

Artifacts of ``cdsr_sequences`` (the filtered, split data):

- ``items.parquet`` (:data:`ITEMS`): one row per item, ordered by ``item_id``.
- ``train.parquet``, ``valid.parquet``, ``test.parquet`` (:data:`SEQUENCES`): one row
  per sequence; ``sequence`` holds global item ids in chronological order. For
  ``valid``/``test`` the LAST id is the target and ``target_domain`` its domain; for
  ``train`` every position is a next-item example and ``target_domain`` is null.
  ``user_domains`` is ``both`` for users active in both domains, ``A``/``B`` for
  single-domain users (only released splits such as LLMCDSR ship those).
- ``domains.json``: ``{"dataset": str, "A": {"name", "num_items", "first_id"}, "B": {...}}``.
- ``stats.json``: the split statistics in the shape of the papers' Table 1.

Feature artifacts (one row per item, aligned with ``item_id``; :data:`EMBEDDINGS`):
``embedding`` is null where the item has no such feature and ``present`` is false.
Never a fake vector.
"""

from __future__ import annotations

import pyarrow as pa

DOMAINS = ("A", "B")

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("domain_name", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("image_ref", pa.string()),
    ]
)

SEQUENCES = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),
        pa.field("sequence", pa.list_(pa.int64()), nullable=False),
        pa.field("timestamps", pa.list_(pa.int64())),
        pa.field("user_domains", pa.string(), nullable=False),
        pa.field("target_domain", pa.string()),
    ]
)

SPLITS = ("train", "valid", "test")

# Normalized source tables written by ``raw_interactions``.
INTERACTIONS = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64()),
        # Order inside a released sequence (releases without timestamps).
        pa.field("position", pa.int32()),
        # Split and sequence row of a released benchmark; null for raw dumps.
        pa.field("split", pa.string()),
        pa.field("row", pa.string()),
        pa.field("user_domains", pa.string()),
    ]
)

SOURCE_ITEMS = pa.schema(
    [
        pa.field("item", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("image_ref", pa.string()),
        # The release's own global id (kept exactly); null for raw dumps.
        pa.field("given_id", pa.int64()),
        # Public identifier (ASIN) when ``item`` is something else (a release's id).
        pa.field("source_id", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("line", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string()),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    """Per-item feature vectors: float32 fixed-size lists plus the presence mask."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("present", pa.bool_(), nullable=False),
        ]
    )


# LLM stage tables.
AUGMENTED_TEXT = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # ok | failed | no_title
        pa.field("error", pa.string()),
    ]
)

DOMAIN_TAGS = pa.schema(
    [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("tag", pa.string(), nullable=False),
        pa.field("votes", pa.int32(), nullable=False),
        pa.field("mean_score", pa.float32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
    ]
)

TAG_VOCABULARY = pa.schema(
    [
        pa.field("tag_id", pa.int32(), nullable=False),
        pa.field("tag", pa.string(), nullable=False),
    ]
)

ITEM_TAG_SCORES = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("tag_id", pa.int32(), nullable=False),
        pa.field("score", pa.int16(), nullable=False),  # 1..100
    ]
)

ITEM_TAG_MATRIX = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("tag_id", pa.int32(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
    ]
)
