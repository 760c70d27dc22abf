"""Macula training: datasets, the training loop, evaluation and the ``python -m training`` CLI."""

from .config import TrainConfig
from .engine import evaluate, train_one_epoch

__all__ = ["TrainConfig", "evaluate", "train_one_epoch"]
