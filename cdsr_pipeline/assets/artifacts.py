"""The artifact contract: the files each asset writes into its folder of the store, in
one place. A stage reads another stage's files through these names (and only the files
of its declared dependencies: see ``_stage.DeclaredInputs``), never by a literal."""

from __future__ import annotations

from ..data.ingest import INTERACTIONS_FILE, ITEMS_FILE, QUARANTINE_FILE
from ..data.sequences import DOMAINS_FILE, ITEMS_OUT, STATS_FILE

__all__ = [
    "AUGMENTED_FILE",
    "DOMAIN_TAGS_FILE",
    "DOMAINS_FILE",
    "EMBEDDINGS_FILE",
    "INTERACTIONS_FILE",
    "ISSUES_FILE",
    "ITEMS_FILE",
    "ITEMS_OUT",
    "QUARANTINE_FILE",
    "SCORES_FILE",
    "STATS_FILE",
    "VOCABULARY_FILE",
    "matrix_file",
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
