"""TEMA §III-D and Tables V/VI: from item-tag scores to the sparse tag vectors w_v.

Selection (which scored tags an item keeps):

- ``top_r``: the R best (R = 5);
- ``threshold``: every tag with score >= θ (θ = 70); an item may keep none;
- ``hybrid``: the R best, plus any further tag with score >= θ, at most ``max_tags``
  (10) in all. The paper's best setting (Table VI), hence the default.

Ties are broken by tag id, so selection is deterministic.

Representation (the weights of the kept tags, rows summing to 1):

- ``weighted``: scores normalised to sum to 1 (weighted multi-hot, TEMA Eq. 3);
- ``unweighted``: 1/k for each of the k kept tags;
- ``one_hot``: the single best tag, weight 1 (selection does not matter).

Static tags (TEMA Table IV's keyword baseline, no LLM): a tag of the item's domain
matches when one of its words occurs in the title as a whole word, compared
case-insensitively after dropping one trailing "s" on both sides (so "cookie"
matches "Cookies"); words of fewer than 3 letters and the stop words in
:data:`STOP_WORDS` do not count. All matching tags get equal weights.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from cdsr_pipeline.data.schema import ITEM_TAG_MATRIX
from cdsr_pipeline.settings import setting

STOP_WORDS = frozenset({"and", "for", "the", "with", "from", "other", "all", "non"})
SELECTIONS = ("top_r", "threshold", "hybrid")
REPRESENTATIONS = ("one_hot", "unweighted", "weighted")
STATIC_VARIANT = "static"


def variant_name(selection: str, representation: str) -> str:
    """The name of a tag-matrix variant (the ablations of TEMA Tables V and VI)."""
    return f"{selection}-{representation}"
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class TagMatrixConfig:
    selection: Literal["top_r", "threshold", "hybrid"] = setting("hybrid", "top_r | threshold | hybrid.")
    top_r: int = setting(5, "R.")
    threshold: int = setting(70, "θ on the 1..100 scale.")
    max_tags: int = setting(10, "Hybrid's upper bound.")
    representation: Literal["weighted", "unweighted", "one_hot"] = setting("weighted", "weighted | unweighted | one_hot.")


def select_tags(scored: list[tuple[int, int]], config: TagMatrixConfig) -> list[tuple[int, int]]:
    """The kept (tag_id, score) pairs of one item, best first."""
    ranked = sorted(scored, key=lambda pair: (-pair[1], pair[0]))
    if config.representation == "one_hot":
        return ranked[:1]
    if config.selection == "top_r":
        return ranked[: config.top_r]
    if config.selection == "threshold":
        return [pair for pair in ranked if pair[1] >= config.threshold]
    if config.selection == "hybrid":
        head = ranked[: config.top_r]
        extra = [pair for pair in ranked[config.top_r :] if pair[1] >= config.threshold]
        return (head + extra)[: max(config.max_tags, config.top_r)]
    raise ValueError(f"unknown tag selection {config.selection!r}; use top_r, threshold or hybrid")


def tag_weights(kept: list[tuple[int, int]], representation: str) -> list[tuple[int, float]]:
    if not kept:
        return []
    if representation == "weighted":
        total = sum(score for _, score in kept)
        return [(tag_id, score / total) for tag_id, score in kept]
    if representation in ("unweighted", "one_hot"):
        return [(tag_id, 1.0 / len(kept)) for tag_id, _ in kept]
    raise ValueError(f"unknown tag representation {representation!r}; use weighted, unweighted or one_hot")


def build_tag_matrix(scores: pa.Table, config: TagMatrixConfig | None = None) -> tuple[pa.Table, dict[str, float]]:
    """ITEM_TAG_MATRIX rows from ITEM_TAG_SCORES, and counts for metadata."""
    config = config or TagMatrixConfig()
    by_item: dict[int, list[tuple[int, int]]] = {}
    for item_id, tag_id, score in zip(
        scores.column("item_id").to_pylist(),
        scores.column("tag_id").to_pylist(),
        scores.column("score").to_pylist(),
        strict=True,
    ):
        by_item.setdefault(item_id, []).append((tag_id, score))
    rows = []
    without = 0
    for item_id in sorted(by_item):
        weights = tag_weights(select_tags(by_item[item_id], config), config.representation)
        without += not weights
        rows.extend({"item_id": item_id, "tag_id": tag_id, "weight": w} for tag_id, w in sorted(weights))
    return pa.Table.from_pylist(rows, schema=ITEM_TAG_MATRIX), _counts(len(by_item), without, len(rows))


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def _words(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOP_WORDS}


def static_tag_matrix(
    items: pa.Table, domain_tags: pa.Table, vocabulary: pa.Table
) -> tuple[pa.Table, dict[str, float]]:
    """ITEM_TAG_MATRIX of the keyword baseline (rule in the module docstring)."""
    tag_ids = dict(zip(vocabulary.column("tag").to_pylist(), vocabulary.column("tag_id").to_pylist(), strict=True))
    tags_by_domain: dict[str, list[tuple[int, set[str]]]] = {}
    for row in domain_tags.to_pylist():
        tags_by_domain.setdefault(row["domain"], []).append((tag_ids[row["tag"]], _words(row["tag"])))
    rows = []
    items_seen = without = 0
    for item in items.select(["item_id", "domain", "title"]).to_pylist():
        items_seen += 1
        title_words = _words(item["title"] or "")
        matched = sorted(
            {tag_id for tag_id, words in tags_by_domain.get(item["domain"], []) if words & title_words}
        )
        without += not matched
        rows.extend({"item_id": item["item_id"], "tag_id": t, "weight": 1.0 / len(matched)} for t in matched)
    return pa.Table.from_pylist(rows, schema=ITEM_TAG_MATRIX), _counts(items_seen, without, len(rows))


def _counts(items: int, without: int, entries: int) -> dict[str, float]:
    return {
        "items": items,
        "items_without_tags": without,
        "entries": entries,
        "mean_tags_per_item": entries / items if items else 0.0,
    }


def tag_informativeness(matrix: pa.Table, items: pa.Table, vocabulary: pa.Table) -> dict[str, dict]:
    """How much a tag matrix tells items apart, per domain: the distribution of each
    item's strongest tag (its most common tag and that tag's share of the items, the
    number of distinct strongest tags, their entropy in bits) and the mean weight of
    the strongest tag. A matrix where one tag is almost every item's strongest (share
    near 1, entropy near 0) gives the tag tower almost nothing to learn from."""
    import math
    from collections import Counter

    names = dict(zip(vocabulary["tag_id"].to_pylist(), vocabulary["tag"].to_pylist(), strict=True))
    domain_of = dict(zip(items["item_id"].to_pylist(), items["domain_name"].to_pylist(), strict=True))
    strongest: dict[int, tuple[float, int]] = {}
    for item, tag, weight in zip(
        matrix["item_id"].to_pylist(), matrix["tag_id"].to_pylist(), matrix["weight"].to_pylist(), strict=True
    ):
        if item not in strongest or (weight, -tag) > (strongest[item][0], -strongest[item][1]):
            strongest[item] = (weight, tag)
    out = {}
    for domain in sorted(set(domain_of.values())):
        members = [item for item, d in domain_of.items() if d == domain]
        tagged = [strongest[item] for item in members if item in strongest]
        counts = Counter(tag for _, tag in tagged)
        total = sum(counts.values())
        top_tag, top_count = counts.most_common(1)[0] if counts else (None, 0)
        out[domain] = {
            "items": len(members),
            "items_with_tags": total,
            "distinct_strongest_tags": len(counts),
            "most_common_strongest_tag": names.get(top_tag) if top_tag is not None else None,
            "its_share": round(top_count / total, 4) if total else None,
            "entropy_bits": round(max(0.0, -sum(c / total * math.log2(c / total) for c in counts.values())), 3) if total else None,
            "mean_strongest_weight": round(sum(w for w, _ in tagged) / total, 4) if total else None,
        }
    return out


def all_tag_matrices(
    scores: pa.Table, items: pa.Table, domain_tags: pa.Table, vocabulary: pa.Table, config: TagMatrixConfig
) -> tuple[dict[str, pa.Table], dict]:
    """Every matrix of the ``item_tag_matrix`` asset by variant name: each selection x
    representation (the ablations of Tables V/VI), ``default`` (``config``) and
    :data:`STATIC_VARIANT` (Table IV's keyword baseline); with their metadata (counts per
    variant, the default's informativeness)."""
    matrices, variants = {}, {}
    for selection in SELECTIONS:
        for representation in REPRESENTATIONS:
            name = variant_name(selection, representation)
            variant = dataclasses.replace(config, selection=selection, representation=representation)
            matrices[name], variants[name] = build_tag_matrix(scores, variant)
    matrices["default"], counts = build_tag_matrix(scores, config)
    informativeness = tag_informativeness(matrices["default"], items, vocabulary)
    matrices[STATIC_VARIANT], variants[STATIC_VARIANT] = static_tag_matrix(items, domain_tags, vocabulary)
    metadata = {
        "num_tags": vocabulary.num_rows,
        "default": dataclasses.asdict(config),
        "default_counts": counts,
        "variants": variants,
        "default_informativeness": informativeness,
    }
    return matrices, metadata
