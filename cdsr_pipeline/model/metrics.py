"""Ranking metrics (pure functions), as in the C2DSR reference code.

rank = 1 + number of candidates scoring STRICTLY higher than the target (ties count
in the target's favour); MRR = mean(1/rank); NDCG@k = mean(1/log2(rank+1) if
rank <= k else 0) (one relevant item); HR@k = mean(rank <= k).
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("mrr", "ndcg_5", "ndcg_10", "hr_10")


def target_ranks(target_scores: torch.Tensor, candidate_scores: torch.Tensor) -> torch.Tensor:
    """1 + number of candidates scoring strictly higher than the target, per row.

    Args:
        target_scores: [n].
        candidate_scores: [n, C]; may include the target itself (it never counts).
    """
    return 1 + (candidate_scores > target_scores[:, None]).sum(dim=1)


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / ranks)) if len(ranks) else float("nan")


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    if not len(ranks):
        return float("nan")
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def hit_at(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks <= k)) if len(ranks) else float("nan")


def summarize(ranks: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one set of ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {"mrr": mrr(ranks), "ndcg_5": ndcg_at(ranks, 5), "ndcg_10": ndcg_at(ranks, 10), "hr_10": hit_at(ranks, 10)}


def paired_mrr_difference(
    ranks: np.ndarray, reference: np.ndarray, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """MRR(ranks) - MRR(reference) over the same rows, with a 95% paired bootstrap interval.

    Both arrays hold the target's rank in the same rows, in the same order. Pairing
    matters: two models ranked on the same test rows differ far less from sample to
    sample than either MRR does on its own, so the interval of the difference is the
    one that says whether a model beats another on this test set. Rows are resampled
    with replacement (seeded); the interval is the 2.5-97.5 percentile of the
    resampled mean differences.

    Returns:
        (difference, low, high).
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ranks.shape != reference.shape or ranks.ndim != 1 or not ranks.size:
        raise ValueError(f"paired ranks need two equal non-empty 1-d arrays, got {ranks.shape} and {reference.shape}")
    differences = 1.0 / ranks - 1.0 / reference
    rows = np.random.default_rng(seed).integers(0, differences.size, size=(resamples, differences.size))
    low, high = np.quantile(differences[rows].mean(axis=1), [0.025, 0.975])
    return float(differences.mean()), float(low), float(high)
