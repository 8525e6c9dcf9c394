"""What each tower, and each sequence view, of a trained run contributes to its ranking.

A run with several towers (id, text, image, tag) scores an item by the sum of its towers'
parts (:meth:`~cdsr_pipeline.model.sequential.SequentialRecommender.tower_scores`: each
tower's softmax over the domain, weighted by its alpha and the sequences' weights). Two
figures per tower and target domain, over a split's rows:

- ``mrr_alone``: the full-ranking MRR when the domain's items are ranked by that tower's
  part alone: what the tower knows by itself. Ties are broken at random (the expected
  reciprocal rank), not in the target's favour as in evaluation: a tower can give
  thousands of items one score (the static tags' tower gives every untagged item the
  same vector), and the evaluation's rule (rank = 1 + items scoring strictly higher)
  would rank the target first among all of them;
- ``top10_share``: the tower's part of the summed score of the 10 items the whole run
  ranks first (mean over rows): how much it weighs in what is recommended.

A tower whose part is nearly uniform over the domain (``mrr_alone`` near random, share
near 0) changes almost nothing that is recommended, whatever it adds in training. The
row ``all`` is the run's own ranking (its full-ranking MRR of the evaluation). These are
read after selection, which uses validation MRR only. :func:`view_contributions` gives the
same two figures per sequence view (X: the history's items of domain A, Y: of domain B,
XY: both merged; each view's part is every tower's term of that view, weighted by the
sequence weights), the evidence on what the multi-attention's three sequences add.
:func:`sequence_weight_search` re-weights those three terms at inference over a grid and
ranks the weightings by validation MRR: how the trained sequences are best combined,
chosen on validation, with test read only at the chosen weights.

:func:`content_similarity` asks the features themselves, with no training: the MRR of
ranking the domain's items by the cosine between an item's frozen vector (title text,
LLM-augmented text, image, weighted tags) and the mean vector of the history's items. A
tower ranking far below its feature's own similarity has not learned what the feature
says; a feature at chance by itself says nothing a tower could learn about the next item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.schema import DOMAINS
from .base import Recommender
from .data import VIEWS, Domains, ItemFeatures, SequenceArrays, evaluation_batches, make_batch
from .metrics import target_ranks

ALL_TOWERS = "all"
TOP_K = 10


def random_mrr(num_items: int) -> float:
    """The expected MRR of a uniformly random ranking of ``num_items`` items (H_n / n):
    what a tower that knows nothing scores alone."""
    return float(np.sum(1.0 / np.arange(1, num_items + 1)) / num_items)


def expected_reciprocal_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, E[1 / rank] of the target (``targets`` [n, 1]) when its ties with other
    items are broken uniformly at random: with h items strictly higher and e items equal
    to it (itself included), the rank is uniform on h+1 .. h+e and the mean of 1 / rank is
    (H(h+e) - H(h)) / e, the H harmonic numbers (digamma(n + 1) + Euler's constant)."""
    target = scores.gather(1, targets)
    higher = (scores > target).sum(dim=1).double()
    equal = (scores == target).sum(dim=1).double()
    return (torch.digamma(higher + equal + 1) - torch.digamma(higher + 1)) / equal


def _batches(
    arrays: SequenceArrays, domains: Domains, batch_size: int, desc: str, progress: bool
) -> Iterable[tuple[int, np.ndarray]]:
    """The split's evaluation batches, behind a progress bar when asked (shown on a terminal only)."""
    return tqdm(list(evaluation_batches(arrays, domains, batch_size)), desc=desc, leave=False, disable=None if progress else True)


class NoTowersError(ValueError):
    """The run's model has no towers to tell apart (popularity)."""


@dataclass(frozen=True)
class Contribution:
    """One part of a run's scores on one target domain: a tower, a sequence view (X: the
    history's items of domain A, Y: of B, XY: both merged), or ALL_TOWERS (their sum)."""

    domain: str  # "A" or "B"
    part: str
    rows: int
    mrr_alone: float
    top10_share: float | None  # None for ALL_TOWERS

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def tower_contributions(
    model: Recommender, arrays: SequenceArrays, domains: Domains, batch_size: int = 256, progress: bool = False
) -> list[Contribution]:
    """Per target domain: each tower's ``mrr_alone`` and ``top10_share``, then the ``all`` row."""
    if not hasattr(model, "tower_scores"):
        raise NoTowersError(f"{type(model).__name__} has no towers to tell apart")
    return _contributions(model, model.tower_scores, arrays, domains, batch_size, "towers", progress)


@torch.no_grad()
def view_contributions(
    model: Recommender, arrays: SequenceArrays, domains: Domains, batch_size: int = 256, progress: bool = False
) -> list[Contribution]:
    """:func:`tower_contributions` by sequence view instead of tower (every tower's part of
    the view summed): what the run learned from the history's items of each domain and
    from both merged, weighted by the sequence weights w_D."""
    if not hasattr(model, "view_scores"):
        raise NoTowersError(f"{type(model).__name__} has no sequence views to tell apart")
    return _contributions(model, model.view_scores, arrays, domains, batch_size, "sequences", progress)


def _contributions(
    model, parts_of, arrays: SequenceArrays, domains: Domains, batch_size: int, desc: str, progress: bool
) -> list[Contribution]:
    """Each part of the scores that ``parts_of(batch)`` splits ``full_sort_predict`` into,
    then their sum (``all``)."""
    model.eval()
    ranks: dict[tuple[int, str], list[np.ndarray]] = {}
    shares: dict[tuple[int, str], list[np.ndarray]] = {}
    with model.fixed_weights():
        for domain, rows in _batches(arrays, domains, batch_size, desc, progress):
            batch = make_batch(arrays, rows, domains, model.views)
            parts = {name: scores.float() for name, scores in parts_of(batch).items()}
            total = sum(parts.values())  # what evaluation ranks by (full_sort_predict)
            targets = batch.domains[domain].targets[:, None]
            top = total.topk(min(TOP_K, total.shape[1]), dim=1).indices
            top_total = total.gather(1, top).sum(dim=1)
            for name, scores in [*parts.items(), (ALL_TOWERS, total)]:
                ranks.setdefault((domain, name), []).append(expected_reciprocal_ranks(scores, targets).numpy())
                if name != ALL_TOWERS:
                    shares.setdefault((domain, name), []).append((scores.gather(1, top).sum(dim=1) / top_total).numpy())
    out = []
    for (domain, name), parts_ranks in ranks.items():
        found = np.concatenate(parts_ranks)
        share = float(np.mean(np.concatenate(shares[domain, name]))) if name != ALL_TOWERS else None
        out.append(Contribution(DOMAINS[domain], name, int(found.size), float(np.mean(found)), share))
    return out


FEATURE_NAMES = {"tex": "title text", "llm": "LLM-augmented text", "img": "image", "tag": "tags"}


@dataclass(frozen=True)
class ContentRanking:
    domain: str  # "A" or "B"
    feature: str  # a modality: tex, llm, img or tag
    rows: int
    mrr: float  # full ranking by the cosine to the history's mean vector; ties at random

    def to_dict(self) -> dict:
        return asdict(self)


def feature_vectors(features: ItemFeatures) -> dict[str, torch.Tensor]:
    """Each frozen feature as unit-length item rows ([num_items, dim]; zero for an item
    without it): dense vectors as loaded, tags as weighted multi-hot rows."""
    vectors = {name: feature.matrix.float() for name, feature in features.dense.items()}
    if features.tags is not None:
        tags = features.tags
        items = torch.repeat_interleave(torch.arange(tags.offsets.numel() - 1), tags.offsets.diff())
        multi_hot = torch.zeros(tags.offsets.numel() - 1, tags.num_tags)
        multi_hot.index_put_((items, tags.tag_ids), tags.weights.float(), accumulate=True)
        vectors["tag"] = multi_hot
    return {name: torch.nn.functional.normalize(matrix, dim=1) for name, matrix in vectors.items()}


@torch.no_grad()
def content_similarity(
    features: ItemFeatures, arrays: SequenceArrays, domains: Domains, batch_size: int = 256, progress: bool = False
) -> list[ContentRanking]:
    """Per target domain and feature: the full-ranking MRR (ties broken at random) of the
    domain's items ranked by cosine to the mean unit vector of the history's items (every
    item of the history, either domain; items without the feature add nothing)."""
    vectors = feature_vectors(features)
    found: dict[tuple[int, str], list[np.ndarray]] = {}
    for domain, rows in _batches(arrays, domains, batch_size, "features", progress):
        width = int(arrays.lengths[rows].max())
        history = torch.from_numpy(arrays.inputs[rows, :width])
        valid = (history >= 0).float()
        targets = torch.from_numpy(arrays.last_targets[rows] - domains.first_id(domain))[:, None]
        start, stop = domains.item_range(domain)
        for name, matrix in vectors.items():
            queries = (matrix[history.clamp(min=0)] * valid[..., None]).sum(dim=1)  # [E, dim]; the cosine ignores the mean's 1/n
            scores = queries @ matrix[start:stop].T
            found.setdefault((domain, name), []).append(expected_reciprocal_ranks(scores, targets).numpy())
    return [
        ContentRanking(DOMAINS[domain], name, int(np.concatenate(parts).size), float(np.mean(np.concatenate(parts))))
        for (domain, name), parts in found.items()
    ]


OTHER_WEIGHTS = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0)
MERGED_WEIGHTS = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0)
TRAINED = "trained"


@dataclass(frozen=True)
class SequenceWeighting:
    """A run's MRR when its sequences are weighted at inference by (own 1, ``other``,
    ``merged``) for either target domain, or as trained (``label`` ``"trained"``)."""

    label: str
    other: float | None  # None for the trained weights (given per domain by the run)
    merged: float | None
    valid: dict[str, dict[str, float]]  # domain -> protocol -> MRR
    test: dict[str, dict[str, float]]

    def selection(self, protocol: str = "sampled") -> float:
        """The selection rule of training: the mean over the domains of the validation MRR."""
        return float(np.mean([by_protocol[protocol] for by_protocol in self.valid.values()]))

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sequence_weight_search(
    model: Recommender,
    splits: Sequence,  # EvaluationSplit: valid, then test
    domains: Domains,
    others: Sequence[float] = OTHER_WEIGHTS,
    merged: Sequence[float] = MERGED_WEIGHTS,
    selection_protocol: str = "sampled",
    batch_size: int = 256,
    progress: bool = False,
) -> list[SequenceWeighting]:
    """The run's MRR (both protocols, every split) with its three sequences re-weighted at
    inference: the own domain's sequence 1, the other domain's ``other``, the merged
    ``merged``, for each pair of the grid, plus the trained weights; best first by
    ``selection_protocol`` validation MRR (mean of the domains), so that any choice among
    them is made on validation. The encoders and towers stay as trained (each sequence's
    softmax is trained on its own; its weight only scales its term), so this measures
    how the trained sequences are best combined, not what training with those weights
    would give. The ranks follow evaluation (rank = 1 + candidates scoring strictly higher)."""
    views = getattr(model, "views", ())
    if tuple(views) != VIEWS:
        raise NoTowersError(f"{type(model).__name__} has no three sequences to weight (views {tuple(views)})")
    trained = model.view_weights
    if (trained == 0).any():
        raise ValueError("the run was trained with a sequence weight of 0: that sequence's scores cannot be re-weighted")
    grid: list[tuple[str, float | None, float | None]] = [(TRAINED, None, None)]
    grid += [(f"other {o:g}, merged {m:g}", float(o), float(m)) for o in dict.fromkeys(others) for m in dict.fromkeys(merged)]
    ranks: dict[tuple[int, str, int, str], list[torch.Tensor]] = {}
    model.eval()
    with model.fixed_weights():
        for split in splits:
            for domain, rows in _batches(split.arrays, domains, batch_size, f"sequence weights, {split.name}", progress):
                batch = make_batch(split.arrays, rows, domains, model.views)
                parts = model.view_scores(batch)
                unweighted = torch.stack([parts[v].float() / trained[domain][i] for i, v in enumerate(VIEWS)])  # [3, E, N]
                targets = batch.domains[domain].targets[:, None]
                negatives = torch.from_numpy(split.negatives[rows])
                for g, (_, other, merge) in enumerate(grid):
                    if other is None:
                        weights = trained[domain].float()
                    else:
                        weights = torch.tensor([1.0, other, merge] if domain == 0 else [other, 1.0, merge])
                    scores = torch.einsum("v,ven->en", weights, unweighted)
                    target = scores.gather(1, targets).squeeze(1)
                    ranks.setdefault((g, split.name, domain, "full"), []).append(target_ranks(target, scores))
                    ranks.setdefault((g, split.name, domain, "sampled"), []).append(target_ranks(target, scores.gather(1, negatives)))

    def mrrs(g: int, split: str) -> dict[str, dict[str, float]]:
        return {
            DOMAINS[d]: {p: float((1.0 / torch.cat(ranks[g, split, d, p]).double()).mean()) for p in ("sampled", "full")}
            for d in (0, 1)
            if (g, split, d, "full") in ranks
        }

    names = [split.name for split in splits]
    out = [SequenceWeighting(label, other, merge, mrrs(g, names[0]), mrrs(g, names[-1])) for g, (label, other, merge) in enumerate(grid)]
    return sorted(out, key=lambda row: -row.selection(selection_protocol))
