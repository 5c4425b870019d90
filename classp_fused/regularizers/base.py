"""The regularizer interface shared by MAS and EWC.

A regularizer keeps, per regularized parameter (``requires_grad=True``), an importance Omega
and an anchor m; its penalty is ``scale * (sum Omega * (theta - m)^2 + residual)``
(``state``). The importance passes live in ``importance``, the penalty, its gradient and the
proximal step in ``penalty``, the stability bound of the explicit step in ``stability``.

Two ways to apply the penalty while training a new task:

- explicit (the papers'): ``add_penalty_grad_()`` after backward, before the optimizer step.
  It diverges once step size * 2 * scale * Omega passes 2; ``stability_bounds`` and
  ``max_stable_lr`` give the bound, and ``consolidate(data, optimizer=...)`` warns
  (``StiffnessWarning``) when the next explicit step would be unstable.
- proximal: ``proximal_step_(optimizer)`` after ``optimizer.step()``, before ``zero_grad``;
  stable for every lambda (past the same bound it pulls each element most of the way back to
  its anchor at every step: the element stops learning; the warning then says so).

``state_dtype="param"|"bf16"|"8bit"`` sets how the importance is stored (``state``): in the
parameter's dtype, as bfloat16 (float32 parameters) or as 8-bit codes with a float32 scale per
256 elements (``classp_fused.state_formats``); the anchor stays in the parameter's dtype.

``normalize="mean"|"max"`` divides each task's importance by its mean (max) over all
regularized elements before it enters the state, so that lam means the same across models
and data (a departure from the papers, whose lam multiplies the raw importance).

``attach(optimizer)`` applies the penalty in the form the regularizer is set to
(``penalty="explicit"|"proximal"``) at every ``optimizer.step()`` instead: inside CLASSP's step
kernel (one pass), through step hooks elsewhere (``attach``).

Under FSDP2 the parameters are DTensors: ``add_penalty_grad_``, ``proximal_step_`` and
``penalty`` work on each rank's local shard (``penalty`` is then this rank's share), and
``consolidate`` runs on the sharded model at any task boundary, each rank on its part of the
data, keeping only its shards (``sharded``). State consolidated before ``fully_shard`` becomes
DTensors laid out like the parameters (same mesh and placements) the first time it is used or
``state_dict`` is called, so the state can be saved and loaded with
torch.distributed.checkpoint; 8-bit codes then take the scales of the local shard's blocks,
and ``state_dict`` gives them per-element exponents in their place (``state``).
"""
from __future__ import annotations

import abc
import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..state_formats import importance_values
from ..caller_warnings import warn_at_caller
from . import penalty as penalty_ops
from . import stability
from .amp import current_grad_scale
from .attach import Attachment
from .batches import Forward, Labels, check_forward_and_labels, default_forward
from .checks import check_choice, check_number
from .importance import ImportancePasses, PassTrace
from .shards import DTensor, local, max_over_mesh, sum_over_mesh, wrap_like
from .state import TaskState, check_state_dtype


NORMALIZATIONS = ("none", "mean", "max")


class StiffnessWarning(UserWarning):
    """The explicit penalty step would diverge at the optimizer's step size (in the proximal
    form: the penalty would all but freeze the stiffest elements)."""


class Regularizer(ImportancePasses, TaskState, Attachment, abc.ABC):
    """Base class: consolidate at task boundaries, the penalty in explicit or proximal form.

    Subclasses implement ``_add_batch(x, y, params, sums)`` (one batch's per-parameter sums
    over its samples) and ``_merge(old_imp, old_anchor, new_imp, new_anchor)`` (how a finished
    task enters the state), and set ``_scale`` (the penalty's factor in front of the sum).
    Those using ``_add_per_sample`` also define ``_sample_losses``, ``_sample_weights`` and
    ``_statistic``.

    ``normalize``: ``"none"`` (the papers': the raw importance), ``"mean"`` or ``"max"``: at
    each ``consolidate`` the task's new importance is divided by its mean (max) over all
    regularized elements (every rank's shards under FSDP2) before it is merged, so one task's
    importance has mean (max) 1 and lam is the penalty per element of average (largest)
    importance. An all-zero importance stays zero. Saved in ``state_dict``; a state is only
    loaded into a regularizer with the same setting.

    ``state_dtype``: how each importance is stored (``state``): ``"param"`` (the parameter's
    dtype), ``"bf16"`` or ``"8bit"``; saved in ``state_dict`` in that form.

    Every public state change is all or nothing: arguments, data and the resulting values
    are checked first, and a refusal (an error naming what and what was expected) leaves the
    regularizer, the model's parameters and their .grad exactly as they were.
    """

    _scale: float

    def __init__(self, model: nn.Module, lam: float, per_sample: bool, process_group=None,
                 keep_task_importances: bool = False, penalty: str = "explicit",
                 normalize: str = "none", state_dtype: str = "param"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"model ({type(model).__name__}) has no parameters to regularize")
        self.model = model
        self.lam = check_number("lam", lam, 0.0, math.inf)
        check_choice("normalize", normalize, NORMALIZATIONS)
        self.normalize = normalize
        self.state_dtype = check_state_dtype(state_dtype)
        self.per_sample = bool(per_sample)
        self.process_group = process_group
        self._reset_state(bool(keep_task_importances))
        self._init_attachment(penalty)

    def consolidate(self, data: Iterable, forward: Optional[Forward] = None,
                    labels: Labels = None, *, optimizer=None, lr: float | None = None) -> None:
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
        ends with the importance of all ranks' data; every rank must call it, also one with
        no data for this task. Give the regularizer the plain module (``ddp.module``), not a
        DistributedDataParallel wrapper. On an FSDP2-sharded model (``fully_shard`` per layer
        and root) each rank computes the importance of its own shards from FSDP2's
        reduce-scatter (``sharded``); ``MAS(local=True)`` is refused there.

        Refused with ValueError, the state left as it was: data without a single sample (on
        all ranks together); a batch after which an importance sum is not finite (a NaN or
        inf input, a non-finite parameter, an overflowing output or gradient): the pass stops
        there and the error names the batch's index in ``data`` (on every rank, when one rank
        finds one); a merged state that is not finite (an overflow of the parameter's dtype);
        a parameter whose shape, dtype or device no longer fits its state. With ``optimizer``,
        ``lr`` or both (as for ``stability_bounds``: ``lr`` with an optimizer replaces its
        groups' lrs, e.g. by the largest lr a decaying schedule used), one
        ``StiffnessWarning`` names the stiffest parameter when the next explicit step would
        be unstable; the optimizer must hold every regularized parameter. With
        ``normalize`` set, the new importance is divided by its mean or max (see the class).

        A parameter frozen now (``requires_grad=False``) that holds state from earlier tasks
        keeps its anchor, and its importance merges as for a task that did not touch it (zero
        new importance): unchanged for MAS "sum" and EWC separate, times alpha for MAS "ema",
        times gamma for online EWC. Unfrozen later, it is protected again.
        """
        check_forward_and_labels(forward, labels)
        if optimizer is not None or lr is not None:
            stability.check_bound_source(optimizer, lr)
        params = self._regularized_params()
        if optimizer is not None:
            for p in params.values():
                stability.group_of(optimizer, p)
        device = local(next(iter(params.values()))).device
        shards = [isinstance(p, DTensor) for p in params.values()]
        if any(shards) and not all(shards):
            raise TypeError("consolidate needs all regularized parameters sharded by FSDP2 "
                            "or none")
        if all(shards) and self._sharded_variant_error():
            raise ValueError(self._sharded_variant_error())
        self._check_fits(params)
        trace = PassTrace()
        with self._importance_pass(forward or default_forward):
            batches = self._batches(data, labels, forward is not None, trace)
            if all(shards):
                sums, count = self._sharded_importance_sums(_tensor_inputs(batches), params,
                                                            trace)
                count, refused = self._all_reduce_([], count, device, trace.refusal is not None)
            else:
                sums, count = self._importance_sums(batches, params, trace)
                count, refused = self._all_reduce_(list(sums.values()), count, device,
                                                   trace.refusal is not None)
        if refused:
            why = trace.refusal or "another rank's data gives a non-finite importance"
            raise ValueError(f"consolidate refused the data: {why}; the state is left as it was")
        if count == 0:
            raise ValueError("data is empty: consolidate saw no samples (an empty batch or a "
                             "loader that yields none); the importance is left as it was")
        means = {name: s / count for name, s in sums.items()}
        self._normalize_(means, params)
        new = {name: wrap_like(t, params[name]) for name, t in means.items()}
        anchor = {name: p.detach().clone() for name, p in params.items()}
        self._enter_task(new, anchor)
        if optimizer is not None or lr is not None:
            self._warn_if_stiff(optimizer, lr)

    def _normalize_(self, importance: dict[str, Tensor], params: dict[str, Tensor]) -> None:
        """Divide a task's local importances in place by their mean or max over every element
        of ``params`` (all shards under FSDP2), as ``normalize`` says; zero stays zero."""
        if self.normalize == "none" or not importance:
            return
        like = next(iter(params.values()))
        values = list(importance.values())
        zero = torch.zeros((), dtype=torch.float64, device=values[0].device)
        if self.normalize == "mean":
            total = sum((t.sum(dtype=torch.float64) for t in values), zero)
            count = sum(p.numel() for p in params.values())  # a DTensor's numel is global
            divisor = float(sum_over_mesh(total, like)) / count
        else:  # the importance is >= 0: the max over 0 and the local maxima is its max
            peak = torch.stack([zero, *(t.amax().double() for t in values if t.numel())]).amax()
            divisor = float(max_over_mesh(peak, like))
        if divisor > 0:
            for t in values:
                t.div_(divisor)

    def _regularized_params(self) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model has no parameters with requires_grad=True to regularize")
        return params

    def penalty(self) -> Tensor:
        """The scalar penalty, differentiable w.r.t. the model parameters (0 before consolidate)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        params, imps, scales, anchors, residuals = self._terms()
        return self._scale * penalty_ops.penalty_sum(params, imps, anchors, residuals, total,
                                                     importance_scales=scales)

    def add_penalty_grad_(self, scaler=None, optimizer=None) -> None:
        """Add the penalty's gradient ``2*scale*Omega*(theta - m)`` to each param's .grad.

        Call it once per optimizer step, after backward (or before it: gradients add up); a
        missing .grad is created. Under a ``torch.amp.GradScaler`` give ``scaler`` and the
        ``optimizer`` it steps: the gradient is then added at the gradients' current scale,
        times the scale before ``scaler.unscale_(optimizer)`` and as is after it, so either
        order takes the unscaled step. One pass with no temporary the size of the params (a
        C++ op on the CPU, multi-tensor ops over chunk views elsewhere), elementwise on local
        tensors, so it works where adding the penalty to the loss does not (FSDP2). A
        parameter whose shape, dtype or device changed since its state was consolidated or
        loaded is refused (ValueError naming it) before any .grad is created or changed; so do
        ``penalty``, ``proximal_step_`` and ``stability_bounds``.
        """
        grad_scale = current_grad_scale(scaler, optimizer)
        params, imps, scales, anchors, _ = self._terms()
        if params:
            penalty_ops.add_penalty_grad_(params, imps, anchors, 2 * self._scale, grad_scale,
                                          importance_scales=scales)

    def proximal_step_(self, optimizer=None, *, lr: float | None = None) -> None:
        """Apply the penalty in proximal form: call after ``optimizer.step()``, before
        ``zero_grad()``, instead of ``add_penalty_grad_``.

        Each element moves to the minimiser of the penalty plus (theta - theta')^2 / (2 eta)
        around where the optimizer put it: theta <- (theta' + c*m) / (1 + c), c = 2 * eta *
        scale * Omega (EWC: c = eta * lam * F). eta is the step size the optimizer used there
        (see ``stability``): its group lr, or for CLASSP with scaling lr / (eps + A)^(1/p);
        for CLASSP only where its last step updated the element (mask from the current
        .grad: finite and g^2 > threshold), elsewhere the element stays put. ``lr=`` instead
        of an optimizer takes eta = lr everywhere. It is a contraction toward m for any lam,
        never increases the penalty, and equals the explicit step to first order in c. The
        pull is one pass over local tensors (FSDP2 shards), as ``add_penalty_grad_`` (for
        CLASSP after its step sizes, tensors the size of the params). CLASSP's mask is judged
        from .grad as it stands: under a GradScaler that passes its scale to the step, .grad is
        still scaled, so unscale first (``scaler.unscale_(optimizer)``) or the mask is too wide.
        """
        lr = stability.check_step_source(optimizer, lr)
        params, imps, scales, anchors, _ = self._terms()
        steps = [stability.step_size(optimizer, lr, p, updated_only=True) for p in params]
        penalty_ops.proximal_step_(params, imps, anchors, steps, 2 * self._scale,
                                   importance_scales=scales)

    def stability_bounds(self, optimizer=None, *, lr=None) -> dict[str, stability.StabilityBound]:
        """A dict by parameter name (as ``model.named_parameters()`` names it), one entry per
        parameter that holds state and requires grad: the stiffness max(eta * 2 * scale *
        Omega) of its explicit step and the largest lr and lam that keep it below 2
        (``StabilityBound``); empty before consolidate.

        Give the optimizer (its step sizes, see ``stability``), a plain ``lr`` (SGD), or both:
        the optimizer's step sizes at ``lr`` (a float, or one per param group) in place of its
        groups' current lrs. Under FSDP2 or DDP the maxima are taken over all ranks (every
        rank must call it).
        """
        lrs = stability.check_bound_source(optimizer, lr)
        params, imps, imp_scales, _, _ = self._terms()
        names = {id(p): n for n, p in self.model.named_parameters()}
        values, scales = [], []
        for p, imp, imp_scale in zip(params, imps, imp_scales):
            if optimizer is None:
                scale = lrs
            else:
                index = stability.group_index(optimizer, p)
                scale = float(optimizer.param_groups[index]["lr"]) if lrs is None else lrs[index]
            eta = stability.step_size(optimizer, scale, p, updated_only=False)
            imp = importance_values(imp, imp_scale, torch.promote_types(p.dtype, torch.float32))
            values.append(stability.stiffness(imp, eta, 2 * self._scale))
            scales.append(scale)
        values = self._all_reduce_max(values, params)
        return {names[id(p)]: stability.bound(names[id(p)], v, s, self.lam)
                for p, v, s in zip(params, values, scales)}

    def max_stable_lr(self, optimizer=None, *, lr=None) -> float:
        """The largest step scale (``lr``, or every group's lr scaled alike) below which the
        explicit step is stable for all parameters; inf before consolidate. Arguments as for
        ``stability_bounds``."""
        bounds = self.stability_bounds(optimizer, lr=lr).values()
        return min((b.max_lr for b in bounds), default=math.inf)

    def _warn_if_stiff(self, optimizer, lr) -> None:
        bounds = self.stability_bounds(optimizer, lr=lr)
        unstable = [b for b in bounds.values() if b.stiffness >= 2]
        if not unstable:
            return
        worst = max(unstable, key=lambda b: b.stiffness)
        where = (f"{len(unstable)} parameter(s); worst {worst.param!r} with step size * 2 * "
                 f"scale * importance = {worst.stiffness:.3g} >= 2")
        limits = f"lr below {worst.max_lr:.3g} or lam below {worst.max_lam:.3g}"
        if self.penalty_form == "proximal":
            message = (f"{type(self).__name__}: the proximal penalty step stays stable, but "
                       f"pulls elements at least 2/3 of the way back to their anchor at every "
                       f"step for {where}: they all but stop learning. Keep {limits} for them "
                       f"to move (penalty='proximal' is in use: the explicit step, "
                       f"add_penalty_grad_(), would diverge there)")
        else:
            message = (f"{type(self).__name__}: the explicit penalty step is unstable for "
                       f"{where}. Keep {limits}, or apply the penalty in proximal form "
                       f"(penalty='proximal' for attach and the callbacks, or "
                       f"proximal_step_())")
        warn_at_caller(message, StiffnessWarning)

    def _all_reduce_max(self, values: list[float], params: list[Tensor]) -> list[float]:
        """Elementwise maxima of ``values`` over ranks when parameters are sharded."""
        if not values or not any(isinstance(p, DTensor) for p in params):
            return values
        t = torch.tensor(values, dtype=torch.float64, device=local(params[0]).device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return t.tolist()

    def _sharded_variant_error(self) -> str | None:
        """Why this configuration cannot consolidate an FSDP2-sharded model, or None."""
        return None

    @abc.abstractmethod
    def _add_batch(self, x, y: Tensor | None, params: dict[str, nn.Parameter], sums) -> None:
        """Add the importance sums of the samples of one batch to ``sums``."""

    def _merge(self, old_imp: Tensor, old_anchor: Tensor, new_imp: Tensor, new_anchor: Tensor
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(importance, anchor, residual increment or None) after a finished task, from
        local tensors of one dtype (``_merge_dtype``). Default: the new anchor, importance by
        ``_merge_importance``."""
        return self._merge_importance(old_imp, new_imp), new_anchor, None

    def _merge_importance(self, old: Tensor, new: Tensor) -> Tensor:
        """The importance after a task: the sum by default."""
        return old + new


def _tensor_inputs(batches):
    """``batches``, checked to hold tensor inputs: what the FSDP2 importance pass splits."""
    for x, y in batches:
        if not isinstance(x, Tensor):
            raise TypeError("consolidate on an FSDP2-sharded model takes tensor or "
                            "(input, label) batches without forward, got a model input of "
                            f"type {type(x).__name__}")
        yield x, y
