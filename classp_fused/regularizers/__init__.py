"""Importance-weighted quadratic regularizers for continual learning: MAS and EWC."""
from .base import Regularizer
from .ewc import EWC
from .mas import MAS

__all__ = ["EWC", "MAS", "Regularizer"]
