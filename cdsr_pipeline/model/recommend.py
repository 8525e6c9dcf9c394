"""Recommendations from a trained run, with what explains them.

:func:`load_run` rebuilds a run's model from its folder (``runs/<run>/`` of a model
asset: ``config.json`` names the sequences and feature tables it was trained on; the
best checkpoint is loaded with ``weights_only=True``). :func:`recommend` scores every
item of the target domain for one history, exactly as evaluation does
(``full_sort_predict``), and explains each of the top-k items by the share of its score
that each tower (id, text, image, tag) contributed and, for runs with a tag tower, by
the tags it shares with the history's items: weight = its own tag weight times the
summed weights of that tag over the history.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from ..data.schema import DOMAINS
from ..data.sequences import ITEMS_OUT
from ..errors import UserInputError
from .config import train_config_from_dict
from .data import Domains, FeatureInputs, SequenceArrays, make_batch
from .trainer import CONFIG_FILE, load_model

MAX_HISTORY = 1000
"""Longest history accepted (the model reads its last ``max_len`` items)."""


class RecommendError(UserInputError):
    """A request that cannot be answered: unknown items or domain, empty history, k out of range."""


@dataclass(frozen=True)
class Recommendation:
    item_id: int
    source_id: str
    title: str | None
    score: float
    towers: dict[str, float]  # tower -> its part of ``score``
    tags: list[tuple[str, float]] = field(default_factory=list)  # shared with the history, strongest first

    @property
    def top_tower(self) -> str:
        return max(self.towers, key=self.towers.get)

    def to_dict(self) -> dict:
        return {
            "item_id": self.item_id,
            "source_id": self.source_id,
            "title": self.title,
            "score": self.score,
            "towers": self.towers,
            "top_tower": self.top_tower,
            "tags": [{"tag": tag, "weight": weight} for tag, weight in self.tags],
        }


@dataclass
class LoadedRun:
    """A run's model and what it needs to answer requests."""

    name: str
    folder: Path
    sequences: Path  # the cdsr_sequences folder it was trained on (its splits)
    features: FeatureInputs  # the feature tables it was trained on
    model: torch.nn.Module
    domains: Domains
    items: pl.DataFrame  # item_id, domain, source_id, title
    max_len: int
    views: tuple[str, ...]
    tag_rows: dict[int, dict[int, float]] | None  # item -> {tag_id: weight}; None without a tag tower
    tag_names: dict[int, str]

    def __post_init__(self) -> None:
        ids = self.items["item_id"].to_list()
        self.titles = dict(zip(ids, self.items["title"].to_list(), strict=True))
        self.source_ids = dict(zip(ids, self.items["source_id"].to_list(), strict=True))
        self.by_source = {source: item for item, source in self.source_ids.items()}
        # the weights never change while the run is loaded: the towers' candidate
        # matrices are computed here once (scoring each request is then one small product
        # per tower and view instead of a pass over every item)
        self._fixed = contextlib.ExitStack()
        with torch.no_grad():
            self._fixed.enter_context(self.model.fixed_weights())
            round_scores(self, [[self.domains.first_id(0)], [self.domains.first_id(1)]], [0, 1])

    def item_ids(self, history: Sequence[int | str]) -> list[int]:
        """Global ids of a history given as global ids or source ids (ASINs); unknown ones listed in the error."""
        ids, unknown = [], []
        for entry in history:
            text = str(entry).strip()
            if text.lstrip("-").isdigit() and 0 <= int(text) < self.domains.num_items:
                ids.append(int(text))
            elif text in self.by_source:
                ids.append(self.by_source[text])
            else:
                unknown.append(text)
        if unknown:
            raise RecommendError(f"unknown item ids: {', '.join(unknown[:20])}" + (" ..." if len(unknown) > 20 else ""))
        return ids

    def domain_index(self, domain: str | int) -> int:
        text = str(domain).strip()
        for index, (key, name) in enumerate(zip(DOMAINS, self.domains.names, strict=True)):
            if text in (key, str(index), name) or text.lower() == name.lower():
                return index
        raise RecommendError(f"unknown domain {text!r}; use A, B, {self.domains.names[0]!r} or {self.domains.names[1]!r}")


def load_run(folder: str | Path) -> LoadedRun:
    """A run folder's best checkpoint as a model on CPU, with the items and tags it was trained with."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise RecommendError(f"{folder} is not a run folder (no {CONFIG_FILE})")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    config = train_config_from_dict(saved["train_config"])
    sequences = Path(saved["sequences_dir"])
    paths = {k: (Path(v) if v else None) for k, v in saved["features"].items() if k != "provenance"}
    features = FeatureInputs(**paths, provenance=saved["features"].get("provenance", {}))
    missing = [str(p) for p in [sequences, *paths.values()] if p is not None and not p.exists()]
    if missing:
        raise RecommendError(f"run {folder.name} was trained on files that are gone: {', '.join(missing)}")
    model = load_model(folder, sequences, features)
    items = pl.read_parquet(sequences / ITEMS_OUT, columns=["item_id", "domain", "source_id", "title"])
    tag_rows, tag_names = None, {}
    if features.tags is not None and "tag" in getattr(model, "towers", {}):
        matrix = pl.read_parquet(features.tags, columns=["item_id", "tag_id", "weight"])
        tag_rows = {}
        for item, tag, weight in matrix.iter_rows():
            tag_rows.setdefault(item, {})[tag] = float(weight)
        if features.tag_vocabulary is not None:
            vocabulary = pq.read_table(features.tag_vocabulary).to_pylist()
            tag_names = {row["tag_id"]: row["tag"] for row in vocabulary}
    return LoadedRun(
        name=config.label,
        folder=folder,
        sequences=sequences,
        features=features,
        model=model,
        domains=Domains.load(sequences),
        items=items,
        max_len=config.max_len,
        views=model.views,
        tag_rows=tag_rows,
        tag_names=tag_names,
    )


def round_scores(run: LoadedRun, histories: Sequence[Sequence[int]], domains: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Each tower's scores of every item of each target domain asked: target domain ->
    tower -> [rows, N_D], the rows of the histories whose target is that domain, in
    order (``domains[i]`` is the target of ``histories[i]``); the towers' sum is what
    :meth:`~cdsr_pipeline.model.base.Recommender.full_sort_predict` returns. Histories of
    both domains go through one forward pass where the model scores mixed batches."""
    width = min(run.max_len, max(len(h) for h in histories))
    inputs = np.full((len(histories), width), -1, dtype=np.int64)
    targets = np.full_like(inputs, -1)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, (history, domain) in enumerate(zip(histories, domains, strict=True)):
        kept = list(history)[-width:]
        inputs[row, : len(kept)] = kept
        lengths[row] = len(kept)
        targets[row, len(kept) - 1] = run.domains.first_id(domain)  # any item of D: selects the target domain
    arrays = SequenceArrays(inputs, targets, lengths)
    with torch.no_grad():
        if hasattr(run.model, "tower_scores_by_domain"):
            batch = make_batch(arrays, np.arange(len(histories)), run.domains, run.views)
            return {d: {name: s.float() for name, s in shares.items()} for d, shares in run.model.tower_scores_by_domain(batch).items()}
        out = {}  # a model without towers scores one target domain a batch (popularity)
        for domain in sorted(set(domains)):
            rows = np.array([i for i, d in enumerate(domains) if d == domain])
            out[domain] = {"popularity": run.model.full_sort_predict(make_batch(arrays, rows, run.domains, run.views)).float()}
        return out


@dataclass(frozen=True)
class Query:
    """A validated request: global ids, target domain index, k, whether to leave out seen items."""

    ids: tuple[int, ...]
    domain: int
    k: int
    exclude_seen: bool = False


def make_query(
    run: LoadedRun, history: Sequence[int | str], domain: str | int, k: int = 10, *, exclude_seen: bool = False
) -> Query:
    """Check a request against the run (raises :class:`RecommendError` naming the problem)."""
    if not history:
        raise RecommendError("the history is empty: give at least one item")
    if len(history) > MAX_HISTORY:
        raise RecommendError(f"the history has {len(history)} items; at most {MAX_HISTORY}")
    target = run.domain_index(domain)
    size = run.domains.sizes[target]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise RecommendError(f"k must be an integer between 1 and {size} (the items of {run.domains.names[target]})")
    return Query(tuple(run.item_ids(history)), target, k, bool(exclude_seen))


def recommend(
    run: LoadedRun, history: Sequence[int | str], domain: str | int, k: int = 10, *, exclude_seen: bool = False
) -> list[Recommendation]:
    """The top-``k`` items of ``domain`` for ``history`` (global or source ids), explained."""
    return answer_queries(run, [make_query(run, history, domain, k, exclude_seen=exclude_seen)])[0]


def answer_queries(run: LoadedRun, queries: Sequence[Query]) -> list[list[Recommendation]]:
    """Answer several queries, of either target domain, with one forward pass (what a server
    batching concurrent requests does); the same answers as one query at a time."""
    answers: list[list[Recommendation] | None] = [None] * len(queries)
    scores = round_scores(run, [q.ids for q in queries], [q.domain for q in queries])
    for domain, shares in scores.items():
        members = [i for i, q in enumerate(queries) if q.domain == domain]
        totals = sum(shares.values())  # a new tensor: excluding seen items in it changes no share
        first, size = run.domains.first_id(domain), run.domains.sizes[domain]
        for row, index in enumerate(members):
            if queries[index].exclude_seen:
                totals[row, [i - first for i in queries[index].ids if first <= i < first + size]] = -torch.inf
        orders = top_k_rows(totals, max(queries[i].k for i in members))
        for row, index in enumerate(members):
            query = queries[index]
            answers[index] = _explained(run, query, orders[row][: query.k], totals[row], {n: s[row] for n, s in shares.items()})
    return answers  # type: ignore[return-value]


def top_k_rows(scores: torch.Tensor, k: int) -> list[list[int]]:
    """:func:`top_k_indices` of every row of a 2-d tensor, with one partial selection and
    two sorts for all rows; a row where a tie crosses the k-th place (or with fewer than
    ``k`` finite scores) takes the exact per-row path."""
    if k >= scores.shape[1]:
        return [top_k_indices(row, k) for row in scores]
    values, indices = torch.topk(scores, k, dim=1, sorted=False)
    kth = values.min(dim=1).values
    exact = (scores >= kth[:, None]).sum(dim=1) == k  # the k best are these k, whatever the ties
    by_index, position = indices.sort(dim=1)
    _, order = values.gather(1, position).sort(dim=1, descending=True, stable=True)  # ties: lower index first
    ranked = by_index.gather(1, order).tolist()
    return [ranked[row] if exact[row] else top_k_indices(scores[row], k) for row in range(scores.shape[0])]


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` best indices of a 1-d tensor, best first, ties to the lower index: what
    ``argsort(descending=True, stable=True)[:k]`` gives, without sorting every item
    (a partial selection, then a stable sort of the few that reach the k-th score)."""
    if k >= scores.numel():
        return torch.argsort(scores, descending=True, stable=True).tolist()
    kth = torch.topk(scores, k, sorted=False).values.min()
    reaching = torch.nonzero(scores >= kth).squeeze(1)
    return reaching[torch.argsort(scores[reaching], descending=True, stable=True)[:k]].tolist()


def _explained(
    run: LoadedRun, query: Query, order: list[int], total: torch.Tensor, shares: dict[str, torch.Tensor]
) -> list[Recommendation]:
    """The recommendations of the local indices ``order``, with their towers' shares and the tags they share with the history."""
    first = run.domains.first_id(query.domain)
    history_tags: dict[int, float] = {}
    if run.tag_rows is not None:
        for item in query.ids:
            for tag, weight in run.tag_rows.get(item, {}).items():
                history_tags[tag] = history_tags.get(tag, 0.0) + weight
    out = []
    for local in order:
        item = first + local
        tags = []
        if run.tag_rows is not None:
            shared = {t: w * history_tags[t] for t, w in run.tag_rows.get(item, {}).items() if t in history_tags}
            tags = [(run.tag_names.get(t, str(t)), round(w, 6)) for t, w in sorted(shared.items(), key=lambda e: -e[1])]
        out.append(
            Recommendation(
                item_id=item,
                source_id=run.source_ids[item],
                title=run.titles[item],
                score=float(total[local]),
                towers={name: float(s[local]) for name, s in shares.items()},
                tags=tags,
            )
        )
    return out
