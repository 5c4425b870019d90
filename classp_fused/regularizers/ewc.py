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
    - ``mode="separate"``: one (F, theta*) pair per task. ``mode="online"``: one pair,
      F* = gamma * F*_prev + F_new and theta* the latest parameters.
    """

    _statistic = staticmethod(torch.square)

    def __init__(self, model: nn.Module, lam: float, mode: str = "separate", gamma: float = 1.0,
                 fisher: str = "empirical", per_sample: bool = False, process_group=None):
        super().__init__(model, lam, per_sample, process_group)
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

    def _combine(self, new, anchor):
        if self.mode == "separate":
            self.tasks.append((new, anchor))
            return
        if self.tasks:
            old = self.tasks[0][0]
            new = {name: t + self.gamma * old[name] if name in old else t
                   for name, t in new.items()}
        self.tasks = [(new, anchor)]

    def _check_task_count(self, n: int) -> None:
        if self.mode == "online":
            super()._check_task_count(n)

    def _importance_sums(self, batches, params):
        add = {("empirical", False): self._add_empirical_batch,
               ("empirical", True): self._add_per_sample,
               ("exact", False): self._add_exact_batch,
               ("exact", True): self._add_per_sample}[self.fisher, self.per_sample]
        sums = {name: self._accumulator(p) for name, p in params.items()}
        count = 0
        for x, y in batches:
            if self.fisher == "empirical" and y is None:
                raise ValueError("data must yield (input, label) batches for fisher='empirical'")
            add(x, y, params, sums)
            count += batch_size(x, y)
        return sums, count

    def _add_empirical_batch(self, x, y, params, sums) -> None:
        loss = F.cross_entropy(self._logits(x), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                sums[name] += batch_size(x, y) * g.pow(2)

    def _add_exact_batch(self, x, y, params, sums) -> None:
        log_p = F.log_softmax(self._logits(x), dim=-1)
        sqrt_p = log_p.detach().mul(0.5).exp()
        for c in range(log_p.shape[-1]):
            grads = torch.autograd.grad((sqrt_p[:, c] * log_p[:, c]).mean(),
                                        list(params.values()), retain_graph=True,
                                        allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    sums[name] += batch_size(x, y) * g.pow(2)
