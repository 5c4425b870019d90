"""Importance-weighted quadratic regularizers for continual learning: MAS and EWC."""
from .base import Regularizer, StiffnessWarning
from .ewc import EWC
from .mas import MAS
from .stability import StabilityBound

__all__ = ["EWC", "MAS", "Regularizer", "StabilityBound", "StiffnessWarning"]
