"""Model construction from a :class:`~cdsr_pipeline.model.config.ModelConfig`."""

from __future__ import annotations

import numpy as np

from .base import Recommender
from .baselines import PopularityRecommender
from .config import ModelConfig
from .data import Domains, ItemFeatures
from .sequential import SequentialRecommender


def build_model(
    config: ModelConfig,
    domains: Domains,
    features: ItemFeatures,
    *,
    max_len: int,
    item_counts: np.ndarray,
) -> Recommender:
    """The recommender of ``config``; ``item_counts`` are the training counts (popularity)."""
    if config.architecture == "popularity":
        return PopularityRecommender(item_counts, domains)
    return SequentialRecommender(config, domains, features, max_len)
