"""A param's CLASSP state from a saved (checked) state-dict entry: new tensors in the
optimizer's format on the param's device, laid out like it (``CLASSP.load_state_dict``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import compressed_state, sharded_codes
from .compressed_state import COMPRESSED_ACC_DTYPES
from .reference import compute_dtype
from .validation import EXPONENTS_KEY, local_part


def loaded_entry(entry: dict, p: Tensor, state_dtype: str, state_seed: int) -> dict:
    """The state of ``p`` from its checked saved ``entry``, as new tensors in the format of
    ``state_dtype`` (rounded with ``state_seed``) on ``p``'s device."""
    step = step_counter(entry["step"], p.device)
    acc, scales = entry["accumulator"], entry.get("accumulator_scales")
    exponents = entry.get(EXPONENTS_KEY)
    local = local_part(acc)
    if acc.dtype == torch.uint8 and (exponents is not None or local is not acc
                                     or local_part(p) is not p):
        acc, scales = _loaded_codes(acc, scales, exponents, step, p, state_dtype, state_seed)
    elif local_part(p) is p:  # a plain param (a DTensor accumulator is gathered)
        acc, scales = compressed_state.converted(sharded_codes.like_param(acc, p), scales,
                                                 step, p, state_dtype, state_seed)
    else:  # laid out like p (a whole tensor, or shards of another layout): its local
        # shard converted, placed as p's
        acc = sharded_codes.like_param(acc, p)
        local = local_part(acc)
        rounded = (compressed_state.accumulator_dtype(p, state_dtype)
                   in COMPRESSED_ACC_DTYPES)
        local, scales = compressed_state.converted(
            local, None, step, p, state_dtype, state_seed,
            compressed_state.index_offset(acc) if rounded else 0)
        acc = type(acc).from_local(local, acc.device_mesh, acc.placements, run_check=False,
                                   shape=acc.shape, stride=_contiguous_strides(acc.shape))
    loaded = {"step": step, "accumulator": acc}
    if scales is not None:
        loaded["accumulator_scales"] = scales
    if "grad_sq_mean" in entry:
        loaded["grad_sq_mean"] = grad_sq_mean(entry["grad_sq_mean"], p)
    return loaded

def _loaded_codes(codes: Tensor, scales: Optional[Tensor], exponents: Optional[Tensor],
                  step: Tensor, p: Tensor, state_dtype: str,
                  state_seed: int) -> tuple[Tensor, Optional[Tensor]]:
    """Checked 8-bit ``codes`` of a DTensor (or for one) with their per-element
    ``exponents`` or their local blocks' ``scales``, as ``p``'s accumulator and its scales
    (None but for 8-bit) in the format of ``state_dtype``: laid out like ``p``, 8-bit blocks
    rebuilt (``sharded_codes.restored``: bit for bit in the layout they were saved from,
    else re-rounded where blocks mix scales), other formats from the exact values."""
    if exponents is None:
        exponents = sharded_codes.exponents_of(codes, scales)
    target = compressed_state.accumulator_dtype(p, state_dtype)
    if target == torch.uint8:
        local, scales = sharded_codes.restored(codes, exponents, p)
    else:
        values = sharded_codes.decoded(codes, exponents, p)
        offset = compressed_state.index_offset(p) if target == torch.bfloat16 else 0
        local, scales = compressed_state.converted(values, None, step, p, state_dtype,
                                                   state_seed, offset)
    if local_part(p) is p:
        return local, scales
    return sharded_codes.DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
        stride=_contiguous_strides(p.shape)), scales


def _contiguous_strides(shape: torch.Size) -> tuple:
    """The strides of a contiguous tensor of ``shape``."""
    strides, inner = [], 1
    for size in reversed(shape):
        strides.append(inner)
        inner *= size
    return tuple(reversed(strides))


def step_counter(step, device: torch.device) -> Tensor:
    """A step count (a number or a one-element tensor, checked) as a new 0-dim fp32 tensor on
    ``device``."""
    step = local_part(step) if isinstance(step, Tensor) else step
    return torch.as_tensor(step).to(device=device, dtype=torch.float32, copy=True).reshape(())


def grad_sq_mean(mean: Tensor, p: Tensor) -> Tensor:
    """A gradient mean S (a one-element floating tensor, checked) as a new 0-dim tensor of
    ``p``'s accumulator dtype on ``p``'s device."""
    return local_part(mean).to(device=p.device, dtype=compute_dtype(p), copy=True).reshape(())
