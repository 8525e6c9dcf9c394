"""Sequences and item features as arrays and tensors; vectorised all-position batches.

Inputs are the ``cdsr_sequences`` folder (:mod:`cdsr_pipeline.data.sequences`) and the
feature tables of :mod:`cdsr_pipeline.data.schema` (``embeddings_schema`` per dense
modality, ``ITEM_TAG_MATRIX`` + ``TAG_VOCABULARY`` for tags).

**Examples.** A training sequence ``s`` (merged X+Y, chronological) is cut to its last
``max_len`` input positions: inputs ``s[:-1][-max_len:]``, targets ``s[1:][-max_len:]``;
every input position is a next-item example whose target domain is the domain of its
target. An evaluation sequence gives one example: the history ``s[:-1][-max_len:]``
and the target ``s[-1]`` at the last history position. Both are stored the same way
(:class:`SequenceArrays`), so one batch builder serves training and evaluation.

**Views.** For merged position t the S^X prefix is the X items of the sequence up to
and including t, i.e. the X-only sequence up to index ``(number of X items <= t) - 1``
(likewise S^Y). Each view's sequence is compacted (its items in order, right-padded)
and encoded once; an example reads the encoder output at that index. A prefix with
no item of the view (no X item yet) has no representation: the model predicts the
uniform distribution over the target domain for it (a constant in loss and score).

**Query de-duplication.** Consecutive merged positions whose item is from Y share
the same S^X prefix; when they also share the target domain they share the whole
softmax over that domain. The batch lists each distinct (sequence, view position,
target domain) once (``DomainExamples.query_rows/positions``) and maps examples onto
them (``example_query``): on LLMCDSR Food-Kitchen this removes a quarter of the
scoring work, which dominates training.

Padding: right padding (items first), so a causal encoder never lets a real
position see a pad; the tensor padding index is ``num_items`` (an extra zero row).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from ..data.sequences import DOMAINS_FILE, STATS_FILE, split_file

log = logging.getLogger(__name__)

VIEWS = ("X", "Y", "XY")
"""S^X (domain A items), S^Y (domain B items), S^{X+Y} (merged)."""

DENSE_MODALITIES = ("img", "tex", "llm")
LENGTH_BUCKET_BATCHES = 64
"""Training batches are formed from shuffled chunks of this many batches, sorted by
length inside a chunk, so a batch pads to a similar length (sequences are 5..156
long on LLMCDSR; random batches would pad ~4x)."""


@dataclass(frozen=True)
class Domains:
    """The two domains of a dataset: global ids are A = 0..n_A-1, then B."""

    dataset: str
    names: tuple[str, str]
    sizes: tuple[int, int]

    @property
    def num_items(self) -> int:
        return self.sizes[0] + self.sizes[1]

    def first_id(self, domain: int) -> int:
        return 0 if domain == 0 else self.sizes[0]

    def item_range(self, domain: int) -> tuple[int, int]:
        start = self.first_id(domain)
        return start, start + self.sizes[domain]

    @classmethod
    def load(cls, sequences_dir: Path) -> Domains:
        info = json.loads((Path(sequences_dir) / DOMAINS_FILE).read_text())
        return cls(
            dataset=info["dataset"],
            names=(info["A"]["name"], info["B"]["name"]),
            sizes=(int(info["A"]["num_items"]), int(info["B"]["num_items"])),
        )


def load_split_statistics(sequences_dir: Path) -> dict:
    """``stats.json`` of the sequences folder (the papers' Table 1)."""
    return json.loads((Path(sequences_dir) / STATS_FILE).read_text())


# -- item features -----------------------------------------------------------------


@dataclass(frozen=True)
class FeatureInputs:
    """Where the item feature tables are; None = no such feature for this dataset.

    Attributes:
        img, tex, llm: ``embeddings_schema`` parquet files (CLIP image, title text,
            LLM-augmented text embeddings), one row per item.
        tags: ``ITEM_TAG_MATRIX`` parquet (item_id, tag_id, weight): which tag
            matrix (LLM-matched / static keywords, one-hot / multi-hot, top-R /
            threshold / hybrid) is the ablation of TEMA Tables IV-VI.
        tag_vocabulary: ``TAG_VOCABULARY`` parquet; sets the number of tags (else
            the largest tag_id + 1 of ``tags``).
        provenance: modality -> what the table is (shown in the report), e.g.
            ``{"tex": "MiniLM title embedding (stand-in for CLIP)"}``.
    """

    img: Path | None = None
    tex: Path | None = None
    llm: Path | None = None
    tags: Path | None = None
    tag_vocabulary: Path | None = None
    provenance: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        names = (*DENSE_MODALITIES, "tags", "tag_vocabulary")
        paths = {name: (str(getattr(self, name)) if getattr(self, name) else None) for name in names}
        return {**paths, "provenance": dict(self.provenance)}


@dataclass
class DenseFeature:
    """Frozen per-item vectors; rows of absent items are zero and ``present`` false."""

    matrix: torch.Tensor  # float32 [num_items, dim]
    present: torch.Tensor  # bool [num_items]


@dataclass
class TagFeature:
    """Weighted multi-hot tag vectors w_v in CSR form (rows = items)."""

    offsets: torch.Tensor  # int64 [num_items + 1]
    tag_ids: torch.Tensor  # int64 [nnz]
    weights: torch.Tensor  # float32 [nnz]
    num_tags: int

    @property
    def present(self) -> torch.Tensor:
        return self.offsets[1:] > self.offsets[:-1]


@dataclass
class ItemFeatures:
    dense: dict[str, DenseFeature] = field(default_factory=dict)
    tags: TagFeature | None = None
    notes: list[str] = field(default_factory=list)

    def available(self) -> set[str]:
        """Modalities with at least one present item (``id`` always)."""
        names = {"id"} | {name for name, feature in self.dense.items() if bool(feature.present.any())}
        if self.tags is not None and bool(self.tags.present.any()):
            names.add("tag")
        return names


def load_item_features(inputs: FeatureInputs, num_items: int, wanted: set[str]) -> ItemFeatures:
    """Load the tables of the ``wanted`` modalities; absent ones become notes."""
    features = ItemFeatures()
    for name in DENSE_MODALITIES:
        if name not in wanted:
            continue
        path = getattr(inputs, name)
        if path is None:
            features.notes.append(f"{name}: no feature table for this dataset; modality left out")
            continue
        dense = _load_dense(Path(path), num_items)
        covered = int(dense.present.sum())
        if covered == 0:
            features.notes.append(f"{name}: no item has this feature; modality left out")
            continue
        features.dense[name] = dense
        if covered < num_items:
            features.notes.append(f"{name}: {covered:,} of {num_items:,} items present (absent items score cosine 0)")
    if "tag" in wanted:
        if inputs.tags is None:
            features.notes.append("tag: no item-tag matrix for this dataset; modality left out")
        else:
            tags = _load_tags(Path(inputs.tags), inputs.tag_vocabulary, num_items)
            covered = int(tags.present.sum())
            if covered == 0:
                features.notes.append("tag: no item has a tag; modality left out")
            else:
                features.tags = tags
                if covered < num_items:
                    features.notes.append(
                        f"tag: {covered:,} of {num_items:,} items have tags (the others a zero tag embedding)"
                    )
    for note in features.notes:
        log.info("features: %s", note)
    return features


def _load_dense(path: Path, num_items: int) -> DenseFeature:
    frame = pl.read_parquet(path, columns=["item_id", "embedding", "present"])
    ids = frame["item_id"].to_numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= num_items):
        raise ValueError(f"{path}: item_id outside 0..{num_items - 1}")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{path}: duplicate item_id rows")
    vectors = frame["embedding"].to_numpy().astype(np.float32, copy=False)
    present = frame["present"].to_numpy().astype(bool)
    missing = np.isnan(vectors).any(axis=1)
    if (present & missing).any():
        raise ValueError(f"{path}: {int((present & missing).sum())} rows are present but have no (or a NaN) embedding")
    matrix = np.zeros((num_items, vectors.shape[1]), dtype=np.float32)
    mask = np.zeros(num_items, dtype=bool)
    matrix[ids[present]] = vectors[present]
    mask[ids[present]] = True
    return DenseFeature(matrix=torch.from_numpy(matrix), present=torch.from_numpy(mask))


def _load_tags(path: Path, vocabulary: Path | None, num_items: int) -> TagFeature:
    frame = pl.read_parquet(path, columns=["item_id", "tag_id", "weight"]).sort(["item_id", "tag_id"])
    items = frame["item_id"].to_numpy()
    tags = frame["tag_id"].to_numpy().astype(np.int64)
    if items.size and (items.min() < 0 or items.max() >= num_items):
        raise ValueError(f"{path}: item_id outside 0..{num_items - 1}")
    if tags.size and tags.min() < 0:
        raise ValueError(f"{path}: negative tag_id")
    if vocabulary is not None:
        num_tags = int(pq.read_table(vocabulary, columns=["tag_id"])["tag_id"].to_numpy().max()) + 1
        if tags.size and tags.max() >= num_tags:
            raise ValueError(f"{path}: tag_id {tags.max()} not in the vocabulary {vocabulary}")
    else:
        num_tags = int(tags.max()) + 1 if tags.size else 0
    offsets = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(items, minlength=num_items), out=offsets[1:])
    return TagFeature(
        offsets=torch.from_numpy(offsets),
        tag_ids=torch.from_numpy(tags),
        weights=torch.from_numpy(frame["weight"].to_numpy().astype(np.float32)),
        num_tags=num_tags,
    )


# -- sequences ---------------------------------------------------------------------


@dataclass
class SequenceArrays:
    """Right-padded input positions and next-item targets of one split (-1 = none).

    Training rows have a target at every input position; evaluation rows only at
    the last history position.
    """

    inputs: np.ndarray  # int64 [n, max_len]
    targets: np.ndarray  # int64 [n, max_len]
    lengths: np.ndarray  # int64 [n], input positions per row

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_examples(self) -> int:
        return int((self.targets >= 0).sum())

    @property
    def last_targets(self) -> np.ndarray:
        """Target of each row's last position (the evaluation target)."""
        return self.targets[np.arange(len(self)), self.lengths - 1]


def load_sequences(
    sequences_dir: Path,
    split: str,
    *,
    max_len: int,
    user_domains: tuple[str, ...] | None = None,
) -> SequenceArrays:
    """Read ``<split>.parquet`` into arrays (training: every position; else the last id).

    Sequences with fewer than two items have no example and are skipped (logged).
    """
    frame = pl.read_parquet(Path(sequences_dir) / split_file(split), columns=["sequence", "user_domains"])
    if user_domains is not None:
        frame = frame.filter(pl.col("user_domains").is_in(list(user_domains)))
    seq = pl.col("sequence")
    frame = frame.with_columns(seq.list.len().alias("n"))
    short = int((frame["n"] < 2).sum())
    if short:
        log.warning("%s: %d sequences with fewer than 2 items skipped (no example)", split, short)
    frame = frame.filter(pl.col("n") >= 2)
    inputs = frame.select(seq.list.head(pl.col("n") - 1).list.tail(max_len))["sequence"]
    inputs_arr = _pad_lists(inputs, max_len)
    lengths = inputs.list.len().to_numpy().astype(np.int64)
    if split == "train":
        targets_arr = _pad_lists(frame.select(seq.list.slice(1).list.tail(max_len))["sequence"], max_len)
    else:
        targets_arr = np.full_like(inputs_arr, -1)
        targets_arr[np.arange(len(lengths)), lengths - 1] = frame.select(seq.list.last())["sequence"].to_numpy()
    return SequenceArrays(inputs=inputs_arr, targets=targets_arr, lengths=lengths)


def _pad_lists(lists: pl.Series, width: int) -> np.ndarray:
    lengths = lists.list.len().to_numpy().astype(np.int64)
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    flat = lists.explode().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, np.arange(flat.size) - starts] = flat
    return out


def training_item_counts(sequences_dir: Path, num_items: int, user_domains: tuple[str, ...]) -> np.ndarray:
    """Occurrences of each item in the (untruncated) training sequences of those users."""
    frame = pl.read_parquet(Path(sequences_dir) / split_file("train"), columns=["sequence", "user_domains"])
    items = frame.filter(pl.col("user_domains").is_in(list(user_domains)))["sequence"].explode().drop_nulls()
    return np.bincount(items.to_numpy().astype(np.int64), minlength=num_items)


# -- batches -----------------------------------------------------------------------


@dataclass
class DomainExamples:
    """The examples of a batch whose target is in one domain, and their queries.

    ``query_rows[v]``/``query_positions[v]`` address the distinct prefixes of view v
    (encoder output rows to read); ``example_query[j, e]`` is the index of example
    e's view-j query in the concatenation of all views' queries (views in
    ``Batch.views`` order), -1 where the prefix is empty.
    """

    targets: torch.Tensor  # int64 [E], local item index within the domain
    query_rows: dict[str, torch.Tensor]
    query_positions: dict[str, torch.Tensor]
    example_query: torch.Tensor  # int64 [num_views, E]

    @property
    def num_examples(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> DomainExamples:
        return DomainExamples(
            targets=self.targets.to(device, non_blocking=True),
            query_rows={k: v.to(device, non_blocking=True) for k, v in self.query_rows.items()},
            query_positions={k: v.to(device, non_blocking=True) for k, v in self.query_positions.items()},
            example_query=self.example_query.to(device, non_blocking=True),
        )


@dataclass
class Batch:
    """Item ids of each view (right-padded with ``num_items``) and per-domain examples."""

    views: tuple[str, ...]
    items: dict[str, torch.Tensor]  # view -> int64 [B, L_view]
    domains: tuple[DomainExamples, DomainExamples]

    @property
    def num_examples(self) -> int:
        return sum(d.num_examples for d in self.domains)

    @property
    def target_domain(self) -> int:
        """The single target domain of an evaluation batch."""
        present = [d for d in (0, 1) if self.domains[d].num_examples]
        if len(present) != 1:
            raise ValueError("this batch mixes target domains; evaluation batches hold one")
        return present[0]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            views=self.views,
            items={k: v.to(device, non_blocking=True) for k, v in self.items.items()},
            domains=(self.domains[0].to(device), self.domains[1].to(device)),
        )


def make_batch(arrays: SequenceArrays, rows: np.ndarray, domains: Domains, views: tuple[str, ...]) -> Batch:
    """Gather rows into a :class:`Batch` (numpy, no per-example loops)."""
    width = int(arrays.lengths[rows].max())
    inputs = arrays.inputs[rows, :width]
    targets = arrays.targets[rows, :width]
    valid = inputs >= 0
    ex_rows, ex_pos = np.nonzero(targets >= 0)
    ex_target = targets[ex_rows, ex_pos]
    ex_domain = (ex_target >= domains.sizes[0]).astype(np.int64)
    pad = domains.num_items

    items: dict[str, torch.Tensor] = {}
    example_pos: dict[str, np.ndarray] = {}
    for view in views:
        if view == "XY":
            view_items = inputs
            example_pos[view] = ex_pos
        else:
            member = valid & ((inputs < domains.sizes[0]) if view == "X" else (inputs >= domains.sizes[0]))
            order = np.argsort(~member, axis=1, kind="stable")
            counts = member.sum(axis=1)
            view_items = np.take_along_axis(inputs, order, axis=1)[:, : max(int(counts.max()), 1)]
            view_items = np.where(np.arange(view_items.shape[1])[None, :] < counts[:, None], view_items, -1)
            example_pos[view] = (np.cumsum(member, axis=1) - 1)[ex_rows, ex_pos]
        items[view] = torch.from_numpy(np.where(view_items >= 0, view_items, pad))

    per_domain = []
    for domain in (0, 1):
        selected = np.nonzero(ex_domain == domain)[0]
        sel_rows = ex_rows[selected]
        query_rows, query_positions = {}, {}
        example_query = np.full((len(views), selected.size), -1, dtype=np.int64)
        offset = 0
        for j, view in enumerate(views):
            pos = example_pos[view][selected]
            has_prefix = pos >= 0
            stride = items[view].shape[1]
            keys, inverse = np.unique(sel_rows[has_prefix] * stride + pos[has_prefix], return_inverse=True)
            query_rows[view] = torch.from_numpy(keys // stride)
            query_positions[view] = torch.from_numpy(keys % stride)
            example_query[j, has_prefix] = inverse.reshape(-1) + offset
            offset += keys.size
        per_domain.append(
            DomainExamples(
                targets=torch.from_numpy(ex_target[selected] - domains.first_id(domain)),
                query_rows=query_rows,
                query_positions=query_positions,
                example_query=torch.from_numpy(example_query),
            )
        )
    return Batch(views=views, items=items, domains=(per_domain[0], per_domain[1]))


def training_batches(num_rows: int, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled row batches of similar length (see :data:`LENGTH_BUCKET_BATCHES`)."""
    order = rng.permutation(num_rows)
    chunk = batch_size * LENGTH_BUCKET_BATCHES
    batches = []
    for start in range(0, num_rows, chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, part.size, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def evaluation_batches(arrays: SequenceArrays, domains: Domains, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(target domain, rows) batches holding one target domain each, rows by length."""
    target_domain = (arrays.last_targets >= domains.sizes[0]).astype(np.int64)
    for domain in (0, 1):
        rows = np.nonzero(target_domain == domain)[0]
        rows = rows[np.argsort(arrays.lengths[rows], kind="stable")]
        for i in range(0, rows.size, batch_size):
            yield domain, rows[i : i + batch_size]
