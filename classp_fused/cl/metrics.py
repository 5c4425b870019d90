"""Continual-learning metrics from an accuracy matrix, and their mean and spread over seeds.

R[i][j] is the accuracy on task j after training task i (0-based, T tasks):

- average accuracy: mean_j R[T-1][j], the last row.
- backward transfer (Lopez-Paz & Ranzato 2017): mean over j < T-1 of R[T-1][j] - R[j][j]
  (the last task's own term is zero by definition and left out). Negative means forgetting.
- forgetting (Chaudhry et al. 2018): mean over j < T-1 of max_{j <= i < T-1} R[i][j] -
  R[T-1][j], the drop from the best accuracy task j had after it was learned.
- own-task accuracy: mean_j R[j][j], each task's accuracy just after it was learned (the
  diagonal): how well a method learns, apart from how well it remembers.

BWT and forgetting are undefined (NaN) for a single task.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _square(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    r = np.asarray(matrix, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {r.shape}")
    return r


def average_accuracy(matrix) -> float:
    """Mean accuracy over all tasks after the last task."""
    return float(_square(matrix)[-1].mean())


def backward_transfer(matrix) -> float:
    """Mean change of each earlier task's accuracy from just after learning it to the end."""
    r = _square(matrix)
    t = len(r)
    if t < 2:
        return math.nan
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(matrix) -> float:
    """Mean drop of each earlier task from its best accuracy (once learned) to the end."""
    r = _square(matrix)
    t = len(r)
    if t < 2:
        return math.nan
    return float(np.mean([r[j:t - 1, j].max() - r[-1, j] for j in range(t - 1)]))


def own_task_accuracy(matrix) -> float:
    """Mean of the diagonal: each task's accuracy right after training on it."""
    return float(np.diag(_square(matrix)).mean())


def sequence_metrics(matrix) -> dict[str, float]:
    """avg_acc, bwt, forgetting and own_acc of one accuracy matrix."""
    return {"avg_acc": average_accuracy(matrix), "bwt": backward_transfer(matrix),
            "forgetting": forgetting(matrix), "own_acc": own_task_accuracy(matrix)}


def mean_std(values) -> tuple:
    """Elementwise mean and sample standard deviation (ddof=1; 0 for one value) over axis 0.

    ``values`` holds one scalar, vector or matrix per seed; results are floats or nested lists.
    """
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        raise ValueError("mean_std needs at least one value")
    std = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros_like(a[0])
    return a.mean(axis=0).tolist(), np.asarray(std).tolist()
