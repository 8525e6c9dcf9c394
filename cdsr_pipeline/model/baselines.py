"""Baselines outside the sequential family. SASRec and GRU4Rec are configs of
:class:`~cdsr_pipeline.model.sequential.SequentialRecommender` (presets ``sasrec``,
``gru4rec``: one ID tower over the merged sequence, dot-product scores, full softmax
over the target domain's items)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Recommender
from .data import Batch, Domains


class PopularityRecommender(Recommender):
    """Scores every item of the target domain by its count in the training sequences.

    Ties are common (many items share a count); under the "strictly higher" rank
    rule a tie counts in the target's favour, which flatters this baseline.
    """

    def __init__(self, counts: np.ndarray, domains: Domains):
        super().__init__()
        self.domains = domains
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32), persistent=False)
        self.notes = ["popularity: training counts within the target domain; nothing to train"]
        self.summary = {"sources": [], "towers": {}, "views": [], "scoring": "training count"}
        self.views = ("XY",)  # batches need some view; the scores ignore it

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        raise TypeError("the popularity baseline has nothing to train")

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        start, stop = self.domains.item_range(batch.target_domain)
        rows = batch.domains[batch.target_domain].num_examples
        return self.counts[start:stop].expand(rows, -1)
