"""Step sizes an optimizer takes per element, and the stability bound of the explicit penalty.

The explicit form adds the penalty gradient k * (theta - m), k = 2 * scale * Omega, to the
loss gradient; a step of size eta multiplies theta - m by (1 - eta * k), which oscillates and
grows once eta * k > 2 (explicit Euler on a stiff quadratic). The stiffness of a parameter is
max over its elements of eta * k; the explicit step is stable while it stays below 2.

Step size eta per element:

- ``lr`` given (a float): eta = lr everywhere (plain SGD).
- ``optimizer`` given: each parameter's group lr, or with ``lr`` too that lr (a float for
  every group, or one per param group: e.g. the peak of a schedule whose lr has decayed to 0
  by the end of a task) in its place. For a CLASSP group (one with ``threshold``,
  ``eps``, ``power`` and ``apply_scaling``) with ``apply_scaling=True`` and an accumulator A
  in the optimizer state, eta = lr / (eps + A)^(1/p) from the current A. A only grows, so the
  next step's eta is at most this: the bound errs on the safe side. Before the first step
  (no accumulator yet) A is taken as 0. Other optimizers (momentum, Adam) are taken as plain
  steps of size lr.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .shards import local

CLASSP_KEYS = ("threshold", "eps", "power", "apply_scaling")


class StabilityBound(NamedTuple):
    """How close one parameter's explicit penalty step is to diverging."""

    param: str
    stiffness: float  # max over elements of eta * 2 * scale * Omega; unstable at >= 2
    max_lr: float     # the lr (or optimizer lr) must stay below this, at this lam
    max_lam: float    # lam must stay below this, at this lr


def group_index(optimizer, p: Tensor) -> int:
    """The index of the param group of ``optimizer`` that holds ``p``."""
    for index, group in enumerate(optimizer.param_groups):
        if any(q is p for q in group["params"]):
            return index
    raise ValueError("optimizer does not hold every regularized parameter of the model")


def group_of(optimizer, p: Tensor) -> dict:
    """The param group of ``optimizer`` that holds ``p``."""
    return optimizer.param_groups[group_index(optimizer, p)]


def step_size(optimizer, lr: float | None, p: Tensor, updated_only: bool) -> Tensor | float:
    """eta for the local elements of ``p``: a float, or a local tensor (CLASSP with scaling).

    Without ``optimizer``, eta = ``lr``; with one, ``lr`` replaces the group's lr (None: the
    group's own). ``updated_only`` zeroes eta where CLASSP's last step left the element
    alone, judged from the current ``p.grad`` (mask: finite and g^2 > threshold), so it must
    be called after the step and before the gradients are cleared. A CLASSP group with a
    relative threshold raises there: its mask also read the gradient means the step has since
    replaced.
    """
    if optimizer is None:
        return lr
    group = group_of(optimizer, p)
    eta = float(group["lr"]) if lr is None else lr
    if not all(key in group for key in CLASSP_KEYS):
        return eta
    accumulator = optimizer.state.get(p, {}).get("accumulator")
    if group["apply_scaling"]:
        a = local(accumulator) if accumulator is not None else torch.zeros_like(local(p),
                                                                               dtype=torch.float32)
        eta = (a + group["eps"]).pow(-1.0 / group["power"]).mul_(eta)
    if updated_only:
        if group.get("relative_threshold", 0) > 0:
            raise ValueError("proximal_step_ cannot tell which elements a CLASSP step with "
                             "relative_threshold > 0 updated; attach the regularizer to "
                             "it (regularizer.attach(optimizer)): CLASSP then takes the "
                             "proximal step inside its own step")
        g = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
        mask = torch.isfinite(g) & (g.float().square() > group["threshold"])
        eta = torch.where(mask, eta, 0.0)
    return eta


def check_step_source(optimizer, lr) -> float | None:
    """Validate that exactly one of ``optimizer`` and ``lr`` is given; return lr as a float."""
    if (optimizer is None) == (lr is None):
        raise ValueError("give exactly one of optimizer= and lr=")
    if lr is None:
        _check_optimizer(optimizer)
        return None
    return _check_lr("lr", lr)


def check_bound_source(optimizer, lr) -> float | list[float] | None:
    """Validate the step sizes a stability bound is taken at: ``optimizer``, ``lr`` or both.

    Returns ``lr`` as a float without an optimizer; with one, None (the groups' own lrs) or
    one lr per param group (``lr`` a float for all of them, or a sequence with one each).
    """
    if optimizer is None and lr is None:
        raise ValueError("give optimizer=, lr= or both")
    if optimizer is None:
        if not isinstance(lr, (int, float)):
            raise ValueError(f"lr must be a finite number >= 0 without optimizer=, got {lr!r}")
        return _check_lr("lr", lr)
    _check_optimizer(optimizer)
    if lr is None:
        return None
    count = len(optimizer.param_groups)
    if isinstance(lr, (list, tuple)):
        if len(lr) != count:
            raise ValueError(f"lr must hold one lr per param group ({count}), got {len(lr)}")
        return [_check_lr(f"lr[{i}]", value) for i, value in enumerate(lr)]
    return [_check_lr("lr", lr)] * count


def _check_optimizer(optimizer) -> None:
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}")


def _check_lr(name: str, lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {lr!r}")
    return float(lr)


def stiffness(importance: Tensor, eta: Tensor | float, curvature_factor: float) -> float:
    """max over the local elements of eta * curvature_factor * Omega (0 for no elements)."""
    if importance.numel() == 0:
        return 0.0
    k = importance.to(torch.promote_types(importance.dtype, torch.float32)) * curvature_factor
    return float((k * eta).amax()) if isinstance(eta, Tensor) else float(k.amax()) * eta


def bound(name: str, value: float, lr: float, lam: float) -> StabilityBound:
    """The StabilityBound of stiffness ``value`` at step scale ``lr`` and ``lam``."""
    if value <= 0:
        return StabilityBound(name, value, math.inf, math.inf)
    return StabilityBound(name, value, 2 * lr / value, 2 * lam / value)
