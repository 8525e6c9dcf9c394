"""Evaluation under both protocols of docs/SPEC.md "Evaluation", per target domain.

- ``sampled`` (the papers' tables, C2DSR reference code): the target against
  ``num_negatives`` (999) items drawn uniformly WITH replacement from the target's own
  domain, excluding only the target. The draw depends only on the split's rows and
  ``negatives_seed`` (:func:`sample_negatives`), so every model and training seed
  sees the same candidates; :func:`negatives_digest` identifies them in the outputs.
- ``full``: the target against every item of its domain.

Both use rank = 1 + number of candidates scoring strictly higher (see
:mod:`~cdsr_pipeline.model.metrics`) and come from one forward pass: the sampled
candidates are read from the full score row (the fused score is a sum of softmax
probabilities over the whole domain, so it needs the full row anyway).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..data.schema import DOMAINS
from .base import Recommender
from .data import Domains, SequenceArrays, evaluation_batches, make_batch
from .metrics import METRICS, summarize, target_ranks

PROTOCOLS = ("sampled", "full")
DOMAIN_KEYS = DOMAINS  # the one domain-key constant (data.schema)
_SPLIT_STREAMS = {"valid": 1, "test": 2}


def sample_negatives(targets: np.ndarray, domains: Domains, num_negatives: int, seed: int, split: str) -> np.ndarray:
    """[n, num_negatives] LOCAL item indices, uniform with replacement, never the target.

    Args:
        targets: global item ids of the evaluation targets, in row order.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    in_b = targets >= domains.sizes[0]
    size = np.where(in_b, domains.sizes[1], domains.sizes[0])
    local = targets - np.where(in_b, domains.sizes[0], 0)
    draws = rng.integers(0, size[:, None] - 1, size=(len(targets), num_negatives))
    return draws + (draws >= local[:, None])  # skip the target: 0..size-2 -> 0..size-1 minus local


def negatives_digest(negatives: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(negatives, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass
class EvaluationSplit:
    """One evaluation split with its fixed sampled negatives."""

    name: str
    arrays: SequenceArrays
    negatives: np.ndarray  # [n, K] local indices

    @classmethod
    def create(
        cls, name: str, arrays: SequenceArrays, domains: Domains, num_negatives: int, seed: int
    ) -> EvaluationSplit:
        return cls(name, arrays, sample_negatives(arrays.last_targets, domains, num_negatives, seed, name))


@torch.no_grad()
def split_ranks(
    model: Recommender,
    split: EvaluationSplit,
    domains: Domains,
    device: torch.device,
    batch_size: int,
    progress: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """The target's rank in every row, ``{"A"|"B": {"row": row indices, "sampled": ranks, "full": ranks}}``.

    Rows are indices into ``split.arrays`` (the split's order), so two runs' ranks on
    the same split pair up row by row (:func:`~cdsr_pipeline.model.metrics.paired_mrr_difference`).
    """
    model.eval()
    parts: dict[int, dict[str, list[np.ndarray]]] = {d: {"row": [], **{p: [] for p in PROTOCOLS}} for d in (0, 1)}
    batches = list(evaluation_batches(split.arrays, domains, batch_size))
    with model.fixed_weights():
        for domain, rows in tqdm(batches, desc=f"evaluate {split.name}", leave=False, disable=not progress):
            batch = make_batch(split.arrays, rows, domains, model.views).to(device)
            scores = model.full_sort_predict(batch).float()
            target_scores = scores.gather(1, batch.domains[domain].targets[:, None]).squeeze(1)
            candidates = torch.from_numpy(split.negatives[rows]).to(device)
            parts[domain]["row"].append(np.asarray(rows, dtype=np.int64))
            parts[domain]["full"].append(target_ranks(target_scores, scores).cpu().numpy())
            parts[domain]["sampled"].append(target_ranks(target_scores, scores.gather(1, candidates)).cpu().numpy())
    return {
        key: {name: np.concatenate(values) if values else np.empty(0, dtype=np.int64) for name, values in parts[domain].items()}
        for domain, key in enumerate(DOMAIN_KEYS)
    }


def summarize_ranks(ranks: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """``{"A"|"B": {"rows": n, "sampled": {metric: value}, "full": {...}}}`` from :func:`split_ranks`."""
    return {
        key: {"rows": int(ranks[key]["full"].size), **{p: summarize(ranks[key][p]) for p in PROTOCOLS}}
        for key in DOMAIN_KEYS
    }


def ranks_table(ranks: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """:func:`split_ranks` as one table: ``row``, ``domain``, ``rank_sampled``, ``rank_full``."""
    return pa.table(
        {
            "row": np.concatenate([ranks[k]["row"] for k in DOMAIN_KEYS]),
            "domain": [k for k in DOMAIN_KEYS for _ in range(ranks[k]["row"].size)],
            **{f"rank_{p}": np.concatenate([ranks[k][p] for k in DOMAIN_KEYS]).astype(np.int64) for p in PROTOCOLS},
        }
    )


def flatten_metrics(split: str, metrics: dict[str, dict]) -> dict[str, float]:
    """``{split}_{protocol}_{A|B}_{metric}`` columns, plus ``{split}_{protocol}_mean_mrr``
    (mean of the two domains' MRR: the early-stopping criterion on ``valid``)."""
    flat = {}
    for protocol in PROTOCOLS:
        for key in DOMAIN_KEYS:
            for metric in METRICS:
                flat[f"{split}_{protocol}_{key}_{metric}"] = metrics[key][protocol][metric]
        # mean over the domains that have rows (a split may lack one)
        mrrs = [metrics[k][protocol]["mrr"] for k in DOMAIN_KEYS if metrics[k]["rows"]]
        flat[f"{split}_{protocol}_mean_mrr"] = float(np.mean(mrrs)) if mrrs else float("nan")
    return flat


def metric_column(split: str, protocol: str, domain: str, metric: str) -> str:
    return f"{split}_{protocol}_{domain}_{metric}"
