"""Models, trainer and evaluator for LLM-EMF / TEMA-LLM and baselines (no Dagster).

Entry points for the assets:

- :func:`train_model` (sequences folder, :class:`FeatureInputs`, :class:`TrainConfig`,
  run folder) -> :class:`TrainResult`.

Configs: :class:`ModelConfig` (``PRESETS`` and ``ABLATIONS`` name the papers' models,
baselines and ablation rows) inside a :class:`TrainConfig`.
"""

from .config import ABLATIONS, MODALITIES, PRESETS, ModelConfig, TrainConfig
from .data import FeatureInputs
from .trainer import TrainResult, load_model, train_model

__all__ = [
    "ABLATIONS",
    "MODALITIES",
    "PRESETS",
    "FeatureInputs",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "load_model",
    "train_model",
]
