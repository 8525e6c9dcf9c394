"""The model contract shared by every recommender of the harness (RecBole style)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from .data import Batch


class Recommender(nn.Module, ABC):
    """A next-item model over two domains.

    Scores are over the items of one target domain D, in local index order
    (``global id - first id of D``). Evaluation batches hold one target domain
    (:attr:`Batch.target_domain`); training batches hold both.

    Attributes:
        notes: human-readable decisions taken while building the model (modalities
            left out, renormalised weights); they go into the run's metrics and report.
        summary: the effective structure (towers, fusion weights, sequence weights).
        views: the sequence views its batches need (subset of ``data.VIEWS``).
    """

    notes: list[str]
    summary: dict
    views: tuple[str, ...]

    @property
    def trainable(self) -> bool:
        """False for models without parameters to learn (popularity)."""
        return any(p.requires_grad for p in self.parameters())

    @abstractmethod
    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        """Mean training loss over the batch's examples (a scalar)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        """The training loss: what the trainer (and DistributedDataParallel) calls."""
        return self.calculate_loss(batch)

    @abstractmethod
    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        """[E, N_D] scores of every item of the batch's target domain D (higher = better)."""

    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """A block in which the weights do not change (evaluation, serving): a model may
        compute what depends only on its weights once for the whole block."""
        yield

    def predict(self, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
        """[E, C] scores of the given candidates (local indices within D)."""
        return self.full_sort_predict(batch).gather(1, candidates)
