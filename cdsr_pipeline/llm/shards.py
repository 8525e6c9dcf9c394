"""Item shards of the per-item LLM stages, for runs too large for one process.

With ``CDSR_LLM_SHARDS=N`` (N > 1) the stages that ask the LLM once per item
(augmentation, tag scores) are partitioned into N shards: hash buckets of each item's
domain and source id, so an item keeps its shard when other items come or go. Each
shard is its own artifact (``<asset>.shard-K-of-N``), fingerprinted by the items it
holds, and writes its own call log file, so shards run side by side (several
processes, hosts or Dagster runs); the assets downstream read every shard. A rerun
with an unchanged shard reuses it and asks nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import pyarrow as pa

from cdsr_pipeline.errors import UserInputError
from cdsr_pipeline.storage import stable_hash

SHARDS_ENV = "CDSR_LLM_SHARDS"
SHARDED_STAGES = ("llm_augmented_text", "item_tag_scores")
"""The assets that are partitioned into shards when ``CDSR_LLM_SHARDS`` is above 1."""
MAX_SHARDS = 4096


class ShardConfigError(UserInputError):
    """``CDSR_LLM_SHARDS`` is not a whole number from 1 to :data:`MAX_SHARDS`."""


def configured_shards() -> int:
    """The shard count of this process: ``CDSR_LLM_SHARDS``, 1 (no shards) when unset."""
    text = os.environ.get(SHARDS_ENV, "").strip()
    if not text:
        return 1
    try:
        shards = int(text)
    except ValueError:
        shards = 0
    if not 1 <= shards <= MAX_SHARDS:
        raise ShardConfigError(f"{SHARDS_ENV}={text!r}: give a whole number of shards from 1 to {MAX_SHARDS}")
    return shards


def item_shard(domain: str, source_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) of the item ``source_id`` of ``domain``: a stable hash,
    the same on every machine and Python (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{domain}\x1f{source_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def items_of_shard(items: pa.Table, shard: int, shards: int) -> pa.Table:
    """The rows of ``items`` (columns ``domain``, ``source_id``) in ``shard`` of ``shards``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    if shards == 1:
        return items
    mask = [
        item_shard(domain, source_id, shards) == shard
        for domain, source_id in zip(items["domain"].to_pylist(), items["source_id"].to_pylist())
    ]
    return items.filter(pa.array(mask, type=pa.bool_()))


def shard_artifact(asset: str, shard: int, shards: int) -> str:
    """The artifact (store folder) of one shard of ``asset``: ``<asset>.shard-K-of-N``."""
    return f"{asset}.shard-{shard}-of-{shards}"


def artifact_names(asset: str, shards: int) -> list[str]:
    """The artifacts that hold ``asset``: itself, or each of its shards when it is sharded."""
    if shards == 1 or asset not in SHARDED_STAGES:
        return [asset]
    return [shard_artifact(asset, shard, shards) for shard in range(shards)]


def shard_items_input(shard: int, shards: int) -> str:
    """The input of a shard's fingerprint that stands for the items it asks about."""
    return f"cdsr_sequences items of shard {shard} of {shards}"


def items_digest(items: pa.Table) -> str:
    """The content of a shard's items, as its fingerprint records it."""
    return stable_hash(items.to_pydict())


def stale_shards(recorded: Sequence[str | None], items: pa.Table) -> list[int]:
    """The shards whose recorded items digest (``recorded[K]``, from shard K's manifest) is
    not that of their items in ``items`` now."""
    shards = len(recorded)
    return [shard for shard, digest in enumerate(recorded) if digest != items_digest(items_of_shard(items, shard, shards))]
