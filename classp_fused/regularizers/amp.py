"""The factor a GradScaler's gradients carry at the moment: where a penalty gradient joins them.

GradScaler keeps, per optimizer (keyed by ``id(optimizer)``), the stage of the current
iteration: READY (gradients still multiplied by the scale), UNSCALED (after
``unscale_(optimizer)``) or STEPPED (after ``step(optimizer)`` until ``update()``); torch's
own ``unscale_`` and ``step`` read that record, and so does this module.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState


def current_grad_scale(scaler, optimizer) -> Optional[Union[Tensor, float]]:
    """The scale the gradients of ``optimizer`` carry under ``scaler`` now, None for none.

    None for no or a disabled scaler and after ``scaler.unscale_(optimizer)``; the scale
    (a tensor, or the initial scale as a float before the scaler's first ``scale``) before.
    Raises between ``scaler.step(optimizer)`` and ``scaler.update()``, where the gradients
    have already been used.
    """
    if scaler is None:
        if optimizer is not None:
            raise ValueError("optimizer is only used with scaler: the optimizer the scaler steps")
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("with a scaler, optimizer must be the torch.optim.Optimizer it steps "
                        f"(to know whether unscale_ ran), got {type(optimizer).__name__}")
    if not scaler.is_enabled():
        return None
    stage = scaler._per_optimizer_states.get(id(optimizer), {}).get("stage", OptState.READY)
    if stage is OptState.UNSCALED:
        return None
    if stage is OptState.STEPPED:
        raise RuntimeError("the penalty gradient must be added before scaler.step(optimizer): "
                           "this iteration's gradients have already been used")
    scale = scaler._get_scale_async()
    return scaler.get_scale() if scale is None else scale
