"""Per-item embedding tables, encoded incrementally through a persistent cache.

Each entry point returns a table with :func:`~cdsr_pipeline.data.schema.embeddings_schema`
(one row per item, ordered by ``item_id``; ``embedding`` null and ``present`` false
where the item has no usable text or image) and an :class:`EmbeddingStats`.

The cache (:class:`EmbeddingCache`) maps (encoder identity, sha256 of the exact
content encoded) to a vector. It lives under ``<cache_dir>/embeddings/<identity
hash>/`` as parquet parts, one written every ``chunk_size`` new vectors, so a crashed
run resumes where it stopped. An unchanged rerun encodes nothing; a changed title
re-encodes that item only; another encoder (model, weights, truncation) starts a
new folder and encodes everything. Items that share a content are encoded once.

Memory: texts are encoded batch by batch, images are decoded one encoder batch at
a time, and only the vectors of the requested items are read back from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from cdsr_pipeline.data.schema import embeddings_schema
from cdsr_pipeline.features.encoders import ImageEncoder, TextEncoder
from cdsr_pipeline.features.images import ImageFetcher
from cdsr_pipeline.storage import atomic_write_text, stable_hash, write_parquet_atomic

log = logging.getLogger(__name__)

Payload = TypeVar("Payload")

DEFAULT_CHUNK_SIZE = 1024
# Texts handed to a text encoder at once (at most a chunk): it groups a call's texts by
# token count into forward passes of ``batch_size``, so larger calls pad less; this
# many keeps the progress bar moving every few seconds on CPU.
TEXTS_PER_CALL = 256
# Parts beyond this count are merged into one at the end of a run.
MAX_CACHE_PARTS = 32

# Items that had an image (or other source) but no usable vector: one row per item.
FEATURE_ISSUES = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # rejected | failed
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def cache_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("content_sha256", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


@dataclass
class EmbeddingStats:
    """What one encoding call produced; :meth:`as_metadata` gives the asset metadata.

    ``encoded_items`` + ``cached_items`` = ``present``; ``encoded_contents`` counts
    distinct contents encoded in this run (items sharing a text are encoded once).
    ``missing`` counts items without a vector by reason; ``issues`` lists, per item,
    the sources that were there but unusable (:data:`FEATURE_ISSUES`).
    """

    feature: str
    rows: int
    present: int
    encoded_items: int
    cached_items: int
    encoded_contents: int
    missing: dict[str, int]
    encoder: dict[str, Any]
    encoder_hash: str
    seconds: float
    issues: pa.Table = field(default_factory=FEATURE_ISSUES.empty_table)

    @property
    def coverage(self) -> float:
        return self.present / self.rows if self.rows else 0.0

    def as_metadata(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "rows": self.rows,
            "present": self.present,
            "coverage": round(self.coverage, 4),
            "encoded_items": self.encoded_items,
            "cached_items": self.cached_items,
            "encoded_contents": self.encoded_contents,
            "missing": dict(sorted(self.missing.items())),
            "issues": self.issues.num_rows,
            "encoder": self.encoder,
            "encoder_hash": self.encoder_hash,
            "seconds": round(self.seconds, 2),
        }


class EmbeddingCache:
    """Vectors of one encoder, keyed by content sha256, as parquet parts in one folder."""

    def __init__(self, cache_dir: str | os.PathLike[str], identity: dict[str, Any]):
        self.dim = int(identity["dim"])
        self.schema = cache_schema(self.dim)
        self.folder = Path(cache_dir) / "embeddings" / stable_hash(identity)[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        identity_file = self.folder / "identity.json"
        if not identity_file.is_file():  # for people looking at the folder
            atomic_write_text(identity_file, json.dumps(identity, indent=2, sort_keys=True))

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def known(self) -> set[str]:
        """Content hashes that already have a vector."""
        known: set[str] = set()
        for part in self.parts():
            known.update(pq.read_table(part, columns=["content_sha256"]).column(0).to_pylist())
        return known

    def write(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Persist one part at once (atomically), so everything encoded so far survives a crash."""
        if not hashes:
            return
        table = pa.Table.from_arrays(
            [pa.array(hashes, pa.string()), _fixed_size_list(vectors, self.dim)], schema=self.schema
        )
        write_parquet_atomic(table, self.folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")

    def lookup(self, hashes: pa.Array) -> pa.Array:
        """The vector for each hash (a fixed-size list array); null for null or unknown hashes."""
        wanted = pc.unique(hashes.drop_null())
        found = [
            table.filter(pc.is_in(table["content_sha256"], value_set=wanted))
            for table in (pq.read_table(part, schema=self.schema) for part in self.parts())
        ]
        cached = pa.concat_tables(found) if found else self.schema.empty_table()
        positions = pc.index_in(hashes, value_set=cached["content_sha256"].combine_chunks())
        return cached["embedding"].combine_chunks().take(positions)

    def compact(self, max_parts: int = MAX_CACHE_PARTS) -> None:
        """Merge the parts into one when there are more than ``max_parts``.

        The merged part is written before the old ones are removed: a crash in
        between leaves duplicates, which lookups tolerate (the same content has the
        same vector).
        """
        parts = self.parts()
        if len(parts) <= max_parts:
            return
        merged = pa.concat_tables(pq.read_table(part, schema=self.schema) for part in parts)
        _, first = np.unique(merged["content_sha256"].to_numpy(zero_copy_only=False), return_index=True)
        merged = merged.take(np.sort(first))
        write_parquet_atomic(merged, self.folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
        for part in parts:
            part.unlink(missing_ok=True)
        log.info("embedding cache %s: %d parts merged into one", self.folder.name, len(parts))


def item_text(title: str | None, description: str | None) -> str | None:
    """The text encoded for an item: title, then description; ``None`` when both are blank.

    The title goes first because CLIP truncates at 77 tokens.
    """
    parts = [part.strip() for part in (title, description) if part and part.strip()]
    if not parts:
        return None
    if len(parts) == 2 and not parts[0].endswith((".", "!", "?")):
        return f"{parts[0]}. {parts[1]}"
    return " ".join(parts)


def encode_texts_by_item(
    item_ids: Sequence[int],
    texts: Sequence[str | None],
    encoder: TextEncoder,
    cache_dir: str | os.PathLike[str],
    *,
    feature: str = "text",
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> tuple[pa.Table, EmbeddingStats]:
    """Embed one text per item (``None`` or blank: no vector, ``present`` false).

    Used for the item texts and, by the LLM stage, for the LLM-augmented texts.
    Rows come out ordered by ``item_id``.
    """
    started = time.perf_counter()
    if len(item_ids) != len(texts):
        raise ValueError(f"{len(item_ids)} item ids but {len(texts)} texts")
    order = _id_order(item_ids)
    ids = np.asarray(item_ids, dtype=np.int64)[order]
    cleaned = [_clean_text(texts[i]) for i in order]
    hashes = [_text_sha256(text) if text is not None else None for text in cleaned]

    cache = EmbeddingCache(cache_dir, encoder.identity)
    known = cache.known()
    todo = {
        sha: text for sha, text in zip(hashes, cleaned, strict=True) if sha is not None and sha not in known
    }
    # Similar lengths in one call waste less on padding; the order is deterministic.
    ordered = sorted(todo.items(), key=lambda entry: (len(entry[1]), entry[0]))
    per_pass = batch_size or encoder.batch_size

    def encode_batch(batch: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
        return encoder.encode_texts(batch, batch_size=per_pass), {}

    _encode_into_cache(
        cache,
        ordered,
        encode_batch,
        batch_size=max(per_pass, min(TEXTS_PER_CALL, chunk_size)),
        chunk_size=chunk_size,
        desc=f"encode {feature}",
        progress=progress,
    )
    reasons: list[str | None] = ["no_text" if sha is None else None for sha in hashes]
    return _finish(feature, ids, hashes, reasons, known, len(todo), cache, encoder, started)


class CachedTextEncoder:
    """A text encoder whose vectors are kept in the embedding cache by content hash.

    For callers that encode plain text lists (the tag stage's candidate prefilter), so
    a rerun or a resumed run does not encode the same titles again. Texts not yet
    cached are passed to the encoder in their given order, so a first call returns
    exactly what the encoder alone would.
    """

    def __init__(self, encoder: TextEncoder, cache_dir: str | os.PathLike[str]):
        self.encoder = encoder
        self.identity, self.dim, self.batch_size = encoder.identity, encoder.dim, encoder.batch_size
        self.cache = EmbeddingCache(cache_dir, encoder.identity)

    @property
    def identity_hash(self) -> str:
        return self.encoder.identity_hash

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        hashes = [_text_sha256(text) for text in texts]
        known = self.cache.known()
        missing = [i for i, sha in enumerate(hashes) if sha not in known]
        if missing:
            vectors = self.encoder.encode_texts([texts[i] for i in missing], batch_size=batch_size)
            if len(missing) == len(texts):
                self.cache.write(hashes, vectors)
                return vectors
            self.cache.write([hashes[i] for i in missing], vectors)
        found = self.cache.lookup(pa.array(hashes, pa.string()))
        return found.flatten().to_numpy().reshape(len(texts), self.dim)


def encode_item_texts(
    items: pa.Table,
    encoder: TextEncoder,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> tuple[pa.Table, EmbeddingStats]:
    """E_tex: the title (and description, if any) of every item of an ``ITEMS`` table."""
    _require_columns(items, ("item_id", "title", "description"))
    texts = [
        item_text(title, description)
        for title, description in zip(
            items["title"].to_pylist(), items["description"].to_pylist(), strict=True
        )
    ]
    return encode_texts_by_item(
        items["item_id"].to_pylist(),
        texts,
        encoder,
        cache_dir,
        feature="text",
        batch_size=batch_size,
        chunk_size=chunk_size,
        progress=progress,
    )


def encode_item_images(
    items: pa.Table,
    encoder: ImageEncoder,
    fetcher: ImageFetcher,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> tuple[pa.Table, EmbeddingStats]:
    """E_img: the image (``image_ref``, a local path or URL) of every item of an ``ITEMS`` table.

    Items without a ref, or whose image was rejected or could not be fetched, get
    no vector; the latter are listed in ``stats.issues`` with the reason. Failed
    fetches are tried again on the next call; see :mod:`.images`.
    """
    started = time.perf_counter()
    _require_columns(items, ("item_id", "image_ref"))
    order = _id_order(items["item_id"].to_pylist())
    ids = np.asarray(items["item_id"].to_pylist(), dtype=np.int64)[order]
    all_refs = items["image_ref"].to_pylist()
    refs = [(all_refs[i] or "").strip() or None for i in order]
    sources = fetcher.resolve((ref for ref in refs if ref is not None), progress=progress)

    hashes: list[str | None] = []
    reasons: list[str | None] = []
    issues: list[dict[str, Any]] = []
    image_files: dict[str, Path] = {}  # content sha256 -> a file holding it
    for item_id, ref in zip(ids.tolist(), refs, strict=True):
        source = sources[ref] if ref is not None else None
        if source is None:
            hashes.append(None)
            reasons.append("no_image_ref")
        elif source.status == "ok":  # ok sources always carry sha256 and path
            hashes.append(source.sha256)
            reasons.append(None)
            image_files[source.sha256] = source.path
        else:
            hashes.append(None)
            reasons.append(f"{source.status}:{source.reason}")
            issues.append(
                {"item_id": item_id, "source": ref, "status": source.status, "reason": source.reason}
            )

    cache = EmbeddingCache(cache_dir, encoder.identity)
    known = cache.known()
    todo = {sha: path for sha, path in image_files.items() if sha not in known}

    def encode_batch(paths: Sequence[Path]) -> tuple[np.ndarray, dict[int, str]]:
        images: list[Image.Image] = []
        unreadable: dict[int, str] = {}
        for position, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, ValueError) as error:  # changed or damaged since it was checked
                log.warning("image unreadable at encoding time (%s): %s", error, path)
                unreadable[position] = "unreadable_image"
        if not images:
            return np.empty((0, encoder.dim), dtype=np.float32), unreadable
        return encoder.encode_images(images, batch_size=len(images)), unreadable

    unreadable = _encode_into_cache(
        cache,
        sorted(todo.items()),
        encode_batch,
        batch_size=batch_size or encoder.batch_size,
        chunk_size=chunk_size,
        desc="encode images",
        progress=progress,
    )
    for position, (item_id, ref, sha) in enumerate(zip(ids.tolist(), refs, hashes, strict=True)):
        if sha in unreadable:
            hashes[position] = None
            reasons[position] = f"failed:{unreadable[sha]}"
            issues.append({"item_id": item_id, "source": ref, "status": "failed", "reason": unreadable[sha]})
    stats_issues = pa.Table.from_pylist(sorted(issues, key=lambda row: row["item_id"]), schema=FEATURE_ISSUES)
    table, stats = _finish(
        "image", ids, hashes, reasons, known, len(todo) - len(unreadable), cache, encoder, started
    )
    stats.issues = stats_issues
    return table, stats


def absent_embeddings(item_ids: Sequence[int]) -> pa.Table:
    """A feature table for a dataset that has none of this feature: no vectors, ``present`` false.

    The vectors are zero-width, so nothing can mistake the table for real features.
    """
    ids = np.sort(np.asarray(item_ids, dtype=np.int64))
    return pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), pa.nulls(len(ids), pa.list_(pa.float32(), 0)), pa.array(np.zeros(len(ids), bool))],
        schema=embeddings_schema(0),
    )


# -- shared machinery ----------------------------------------------------------
def _encode_into_cache(
    cache: EmbeddingCache,
    todo: Sequence[tuple[str, Payload]],
    encode_batch: Callable[[Sequence[Payload]], tuple[np.ndarray, dict[int, str]]],
    *,
    batch_size: int,
    chunk_size: int,
    desc: str,
    progress: bool,
) -> dict[str, str]:
    """Encode ``(content sha256, payload)`` pairs batch by batch into the cache.

    A cache part is written at the first batch boundary after ``chunk_size`` new
    vectors, and one for the rest at the end. ``encode_batch`` returns the vectors
    of the payloads it could encode, in order, and ``{position in batch: reason}``
    for the others. Returns ``{sha256: reason}`` for every content that got no vector.
    """
    unusable: dict[str, str] = {}
    chunk_hashes: list[str] = []
    chunk_vectors: list[np.ndarray] = []
    with tqdm(total=len(todo), desc=desc, unit="item", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            vectors, failures = encode_batch([payload for _, payload in batch])
            unusable.update({batch[position][0]: reason for position, reason in failures.items()})
            chunk_hashes.extend(sha for position, (sha, _) in enumerate(batch) if position not in failures)
            chunk_vectors.append(vectors)
            if len(chunk_hashes) >= chunk_size:
                cache.write(chunk_hashes, np.concatenate(chunk_vectors))
                chunk_hashes, chunk_vectors = [], []
            bar.update(len(batch))
    cache.write(chunk_hashes, np.concatenate(chunk_vectors) if chunk_vectors else np.empty((0, cache.dim)))
    cache.compact()
    return unusable


def _finish(
    feature: str,
    ids: np.ndarray,
    hashes: list[str | None],
    reasons: list[str | None],
    known: set[str],
    encoded_contents: int,
    cache: EmbeddingCache,
    encoder: TextEncoder | ImageEncoder,
    started: float,
) -> tuple[pa.Table, EmbeddingStats]:
    """The embeddings table (vectors read back from the cache) and its stats."""
    vectors = cache.lookup(pa.array(hashes, pa.string()))
    present = vectors.is_valid()
    table = pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), vectors, present], schema=embeddings_schema(cache.dim)
    )
    n_present = int(pc.sum(present).as_py() or 0)
    cached_items = sum(1 for sha in hashes if sha is not None and sha in known)
    stats = EmbeddingStats(
        feature=feature,
        rows=len(ids),
        present=n_present,
        encoded_items=n_present - cached_items,
        cached_items=cached_items,
        encoded_contents=encoded_contents,
        missing=dict(Counter(reason for reason in reasons if reason is not None)),
        encoder=dict(encoder.identity),
        encoder_hash=encoder.identity_hash,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "%s embeddings: %d/%d items present, %d encoded now, %d from cache",
        feature,
        stats.present,
        stats.rows,
        stats.encoded_items,
        stats.cached_items,
    )
    return table, stats


def _id_order(item_ids: Sequence[int]) -> np.ndarray:
    """Positions that sort the items by id; duplicate ids are an error."""
    ids = np.asarray(item_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if len(ids) > 1 and (np.diff(ids[order]) == 0).any():
        raise ValueError("duplicate item_id values: one row per item expected")
    return order


def _require_columns(items: pa.Table, columns: Sequence[str]) -> None:
    missing = [name for name in columns if name not in items.column_names]
    if missing:
        raise ValueError(f"items table lacks column(s) {missing}; expected the ITEMS schema")


def _clean_text(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fixed_size_list(vectors: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def embedding_table_problems(table: pa.Table, n_items: int) -> list[str]:
    """What is wrong with an embedding table of ``n_items`` items (empty: nothing): one
    row per item id 0..n-1 in order, a vector exactly where ``present``, unit norm."""
    ids = table["item_id"].to_numpy()
    present = table["present"].to_numpy(zero_copy_only=False)
    valid = table["embedding"].is_valid().to_numpy(zero_copy_only=False)
    problems = []
    if len(ids) != n_items or not np.array_equal(ids, np.arange(n_items)):
        problems.append(f"rows are not item ids 0..{n_items - 1}")
    if not np.array_equal(present, valid):
        problems.append(f"{int((present != valid).sum())} rows where present disagrees with the vector")
    if valid.any():
        vectors = np.stack(table.filter(table["present"])["embedding"].to_numpy(zero_copy_only=False))
        norms = np.linalg.norm(vectors, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            problems.append(f"{int((np.abs(norms - 1) > 1e-3).sum())} vectors are not unit norm")
    return problems
