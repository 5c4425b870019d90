"""Elastic Weight Consolidation (Kirkpatrick 2017) and online EWC (Schwarz 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Regularizer
from .batches import batch_size
from .checks import check_choice, check_number


class EWC(Regularizer):
    """EWC: penalty ``(lam/2) * sum_tasks sum F_t * (theta - theta*_t)^2``, diagonal Fisher F.

    The model returns logits of shape (batch, classes); log-probabilities are their
    log_softmax.

    - ``fisher="empirical"``: squared gradients of the NLL of the true labels (batches must
      be (input, label)). ``fisher="exact"``: the expectation over the model's predicted
      classes, sum_c p_c (grad log p_c)^2 (labels are not needed).
    - ``per_sample=True``: the mean over samples of the per-sample quantity: for single-use
      Linear layers on 2-D inputs the exact form (w_c Delta_c^2)^T @ X^2 from one backward
      per batch (and class, for the exact Fisher), for other parameters per-sample gradients
      via torch.func.
      ``per_sample=False``: per batch, the square of the batch-mean gradient (for the exact
      Fisher, of the batch mean of sqrt(p_c) grad log p_c, one backward per class), weighted
      by the batch size and divided by N. This approximation never exceeds the per-sample
      Fisher and equals it for batches of one sample.
    - ``mode="separate"``: the penalty of every task, sum_t F_t (theta - theta*_t)^2, held
      exactly in constant memory: ``importance`` = sum_t F_t, ``anchor`` = sum_t F_t
      theta*_t / sum_t F_t, and one float64 residual scalar per parameter, so state_bytes()
      does not grow with the task count and the penalty gradient is one pass.
      ``keep_task_importances=True`` also keeps each task's F_t (``task_importances``; they
      count in state_bytes() and are saved in state_dict()).
      ``mode="online"``: F* = gamma * F*_prev + F_new and theta* the latest parameters.
    - ``penalty``: the form an attached optimizer applies (``attach``): ``"explicit"`` or
      ``"proximal"``.
    - ``normalize``: ``"none"`` (the papers' raw Fisher), ``"mean"`` or ``"max"``: each task's
      F_t divided by its mean (max) over all regularized elements (``Regularizer``).
    - ``state_dtype``: how F (``importance``, the sum over tasks in separate mode) is stored:
      ``"param"`` (the parameter's dtype), ``"bf16"`` (float32 parameters) or ``"8bit"``
      (codes plus a scale per 256 elements), rounded to nearest once per task
      (``TaskState``); anchors and residuals keep their dtypes, ``task_importances`` the
      parameter's.
    """

    _statistic = staticmethod(torch.square)

    def __init__(self, model: nn.Module, lam: float, mode: str = "separate", gamma: float = 1.0,
                 fisher: str = "empirical", per_sample: bool = False, process_group=None,
                 keep_task_importances: bool = False, penalty: str = "explicit",
                 normalize: str = "none", state_dtype: str = "param"):
        super().__init__(model, lam, per_sample, process_group, keep_task_importances, penalty,
                         normalize, state_dtype)
        check_choice("mode", mode, ("separate", "online"))
        check_choice("fisher", fisher, ("empirical", "exact"))
        self.mode = mode
        self.fisher = fisher
        self.gamma = check_number("gamma", gamma, 0.0, 1.0, low_open=True)

    @property
    def _scale(self) -> float:
        return self.lam / 2

    def _sample_losses(self, output, y):
        if self.fisher == "exact":
            return F.log_softmax(output, dim=-1)
        return F.cross_entropy(output, y, reduction="none")[:, None]

    def _sample_weights(self, losses):
        return losses.exp() if self.fisher == "exact" else None

    def _merge(self, old_imp, old_anchor, new_imp, new_anchor):
        if self.mode == "online":
            return self.gamma * old_imp + new_imp, new_anchor, None
        # F1 (x - m1)^2 + F2 (x - m2)^2 = F (x - m)^2 + F1 F2 / F (m1 - m2)^2, F = F1 + F2.
        total = old_imp + new_imp
        positive = total > 0
        safe = torch.where(positive, total, torch.ones_like(total))
        anchor = torch.where(positive, (old_imp * old_anchor + new_imp * new_anchor) / safe,
                             new_anchor)
        gap = (old_anchor - new_anchor).to(torch.float64)
        residual = (old_imp.to(torch.float64) * new_imp / safe * gap.square()).sum()
        return total, anchor, residual

    def _method_name(self) -> str:
        return f"EWC-{self.mode}"

    def _folds_tasks_exactly(self) -> bool:
        return self.mode == "separate"

    def _add_batch(self, x, y, params, sums):
        if self.fisher == "empirical" and y is None:
            raise ValueError("data must yield (input, label) batches for fisher='empirical'")
        add = self._add_per_sample if self.per_sample else self._add_batch_form
        add(x, y, params, sums)

    def _batch_losses(self, x, y, reforward):
        """Empirical: the batch-mean NLL of the labels. Exact: per class c, the batch mean of
        sqrt(p_c) log p_c. Each gradient statistic is weighted by the batch size."""
        if self.fisher == "empirical":
            if y is None:
                raise ValueError("data must yield (input, label) batches for fisher='empirical'")
            yield F.cross_entropy(self._logits(x), y), batch_size(x, y)
            return
        log_p = F.log_softmax(self._logits(x), dim=-1)
        for c in range(log_p.shape[-1]):
            if c and reforward:
                log_p = F.log_softmax(self._logits(x), dim=-1)
            sqrt_p = log_p.detach().mul(0.5).exp()
            yield (sqrt_p[:, c] * log_p[:, c]).mean(), batch_size(x, y)
