"""The regularizer interface shared by MAS and EWC.

A regularizer keeps importance Omega and anchor theta* per parameter name; its penalty is
``scale * sum Omega * (theta - theta*)^2``. Only parameters with ``requires_grad=True`` are
regularized. The importance passes live in ``importance``, the task state in ``state``, the
penalty and its gradient in ``penalty``.

Under FSDP2 the parameters are DTensors: ``add_penalty_grad_`` and ``penalty`` work on each
rank's local shard (``penalty`` is then this rank's share). Importance is computed by
``consolidate`` on the unsharded model (one copy per rank, each rank on its part of the
data); after ``fully_shard`` the state tensors become DTensors laid out like their parameters
(same mesh and placements) the first time they are used or ``state_dict`` is called, so the
state can be saved and loaded with torch.distributed.checkpoint.
"""
from __future__ import annotations

import abc
import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from . import penalty as penalty_ops
from .amp import current_grad_scale
from .batches import Forward, Labels, ModelCall, default_forward
from .checks import check_number
from .importance import ImportancePasses
from .shards import DTensor
from .state import Task, TaskState


class Regularizer(ImportancePasses, TaskState, abc.ABC):
    """Base class: consolidate at task boundaries, the penalty and its gradient, state.

    Subclasses implement ``_importance_sums(batches, params)`` (per-parameter sums over
    samples and the sample count) and ``_combine(new, anchor)`` (how a new task's importance
    enters ``self.tasks``), and set ``_scale`` (the penalty's factor in front of the sum).
    Those using ``_add_per_sample`` also define ``_sample_losses``, ``_sample_weights`` and
    ``_statistic``.
    """

    _scale: float

    def __init__(self, model: nn.Module, lam: float, per_sample: bool, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.lam = check_number("lam", lam, 0.0, math.inf)
        self.per_sample = bool(per_sample)
        self.process_group = process_group
        self.tasks: list[Task] = []

    def consolidate(self, data: Iterable, forward: Optional[Forward] = None,
                    labels: Labels = None) -> None:
        """Compute the importance on ``data`` at a task boundary and anchor the current params.

        ``data`` is an iterable of batches (a DataLoader, a list); a single tensor counts as
        one batch. ``forward(model, batch)`` returns the logits; without it a batch is an
        input tensor or an (input, label, ...) sequence (the model gets the input) or a
        mapping of keyword arguments (``model(**batch)`` without the labels entry, e.g. a
        transformers batch with its attention mask). A model output with ``.logits`` (a
        transformers ModelOutput) gives its logits. ``labels`` (EWC's empirical Fisher) is a
        key or index of the batch or a callable ``labels(batch)``; by default a sequence's
        second entry or a mapping's ``"labels"``. The pass runs
        in eval() mode with the model's training flags, requires_grad flags, buffers and
        existing .grad left exactly as found. When torch.distributed is initialized (or a
        process group was given) the sums and sample counts are all-reduced, so every rank
        ends with the importance of all ranks' data; every rank must call it. Give the
        regularizer the plain module (``ddp.module``), not a DistributedDataParallel wrapper.
        """
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable forward(model, batch) or None, "
                            f"got {type(forward).__name__}")
        if labels is not None and not (callable(labels) or isinstance(labels, (str, int))):
            raise TypeError("labels must be a batch key or index, a callable labels(batch) "
                            f"or None, got {type(labels).__name__}")
        params = self._regularized_params()
        if any(isinstance(p, DTensor) for p in params.values()):
            raise TypeError("consolidate needs the unsharded model: run it before fully_shard")
        self._call = ModelCall(self.model, forward or default_forward(labels))
        with self._importance_pass():
            sums, count = self._importance_sums(self._batches(data, labels), params)
        count = self._all_reduce_(list(sums.values()), count)
        new = {name: (s / count).to(params[name].dtype) for name, s in sums.items()}
        anchor = {name: p.detach().clone() for name, p in params.items()}
        self._combine(new, anchor)

    def _regularized_params(self) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model has no parameters with requires_grad=True to regularize")
        return params

    def penalty(self) -> Tensor:
        """The scalar penalty, differentiable w.r.t. the model parameters (0 before consolidate)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for task in self.tasks:
            total = penalty_ops.penalty_sum(*self._terms(task), total)
        return self._scale * total

    def add_penalty_grad_(self, scaler=None, optimizer=None) -> None:
        """Add the penalty's gradient ``2*scale*Omega*(theta - theta*)`` to each param's .grad.

        Call it once per optimizer step, after backward (or before it: gradients add up); a
        missing .grad is created. Under a ``torch.amp.GradScaler`` give ``scaler`` and the
        ``optimizer`` it steps: the gradient is then added at the gradients' current scale,
        times the scale before ``scaler.unscale_(optimizer)`` and as is after it, so either
        order takes the unscaled step. One multi-tensor pass per task, elementwise on local
        tensors, so it works where adding the penalty to the loss does not (FSDP2).
        """
        grad_scale = current_grad_scale(scaler, optimizer)
        for task in self.tasks:
            penalty_ops.add_penalty_grad_(*self._terms(task), 2 * self._scale, grad_scale)

    @abc.abstractmethod
    def _importance_sums(self, batches, params: dict[str, nn.Parameter]) -> tuple[dict, int]:
        """Per-parameter importance summed over the samples of ``batches``, and their count."""

    @abc.abstractmethod
    def _combine(self, new: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Enter a finished task's importance ``new`` and its ``anchor`` into ``self.tasks``."""
