"""A param's accumulator in the optimizer's state under ``state_dtype`` (``"fp32"``, ``"bf16"``,
``"8bit"``; formats in ``classp_fused.state_formats``): its creation, the element index of a local
shard's first element, and the conversion of loaded state between formats.

Loaded state is converted to the optimizer's format: exact values into a compressed format are
rounded stochastically with the param's rounding key at its saved step (so a load is
deterministic), compressed values into an exact accumulator are decoded, and bf16 <-> 8-bit goes
through float32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import state_formats
from .reference import compute_dtype
from .sharded_codes import DTensor

COMPRESSED_ACC_DTYPES = (torch.bfloat16, torch.uint8)


def accumulator_dtype(param: Tensor, state_dtype: str) -> torch.dtype:
    """The dtype of ``param``'s accumulator under ``state_dtype``: bfloat16 or uint8 where it is
    compressed, else its compute dtype (float32, float64 for float64 params)."""
    return state_formats.compressed_dtype(param, state_dtype) or compute_dtype(param)


def new_state(param: Tensor, state_dtype: str) -> dict:
    """The zero ``"accumulator"`` of ``param`` (param-shaped, contiguous, a DTensor like a
    DTensor param) and, for 8-bit codes, its ``"accumulator_scales"`` (float32, one per block
    of the local tensor: a plain tensor also for a DTensor param)."""
    acc = torch.zeros_like(param, dtype=accumulator_dtype(param, state_dtype),
                           memory_format=torch.contiguous_format)
    if acc.dtype != torch.uint8:
        return {"accumulator": acc}
    local = acc.to_local() if isinstance(acc, DTensor) else acc
    scales = torch.zeros(state_formats.num_blocks(local.numel()), dtype=torch.float32,
                         device=local.device)
    return {"accumulator": acc, "accumulator_scales": scales}


def index_offset(param: Tensor) -> int:
    """The row-major index, within the whole parameter, of the first element of ``param``'s
    local tensor: 0 for a plain tensor; for a DTensor sharded so that its local shard is one run
    of consecutive elements of the whole (FSDP2's ``Shard(0)``), that run's start. Raises
    ValueError for a DTensor whose local shard is not such a run (sharded on a later dim, or a
    strided shard): its elements' random bits could not be drawn as the whole parameter's."""
    if type(param) in (Tensor, torch.nn.Parameter):
        return 0
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch built without distributed support
        return 0
    if not isinstance(param, DTensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(param.shape)
    if any(type(p) not in (Shard, Replicate) for p in param.placements):
        raise ValueError(f"compressed state of a DTensor param needs Shard or Replicate "
                         f"placements, got {param.placements}")
    local, offset = compute_local_shape_and_global_offset(shape, param.device_mesh,
                                                          param.placements)
    if math.prod(local) == 0:
        return 0
    cut = [d for d in range(len(shape)) if local[d] != shape[d]]  # the dims the shard cuts
    if cut and any(local[d] != 1 for d in range(cut[-1])):  # one index before the last cut
        raise ValueError(f"compressed state of a DTensor param needs local shards that are runs "
                         f"of consecutive elements of the whole param (sharded on its first "
                         f"dim of size > 1, as FSDP2 does), got placements {param.placements} "
                         f"of a param of shape {shape}")
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    return sum(o * s for o, s in zip(offset, strides))


def converted(acc: Tensor, scales: Optional[Tensor], step: Tensor, param: Tensor,
              state_dtype: str, seed: int, offset: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """A loaded accumulator ``acc`` (checked, a plain tensor: a DTensor's local shard, whose
    first element has index ``offset`` in the whole; 8-bit ``scales`` with uint8 codes, else
    None) as new tensors in ``param``'s format under ``state_dtype``, on its device:
    ``(acc, scales)``, scales None but for 8-bit codes. Rounding draws the bits of the key of
    ``seed`` at ``step`` (the saved step counter, a 0-dim tensor)."""
    target = accumulator_dtype(param, state_dtype)
    device = param.device
    acc = acc.to(device)
    if acc.dtype == target:
        copied = acc.to(memory_format=torch.contiguous_format, copy=True)
        return copied, None if scales is None else scales.to(device, torch.float32, copy=True)
    if acc.dtype == torch.uint8:
        value = state_formats.decode(acc.reshape(-1), scales.to(device, torch.float32))
    else:
        value = acc.reshape(-1).to(torch.float32 if target in COMPRESSED_ACC_DTYPES else target)
    if target not in COMPRESSED_ACC_DTYPES:
        return value.to(target).reshape(acc.shape), None
    index = torch.arange(offset, offset + value.numel(), dtype=torch.int64, device=device)
    bits = state_formats.element_bits(state_formats.tensor_key(seed, step.to(device)), index)
    if target == torch.bfloat16:
        return state_formats.round_bf16(value, bits).reshape(acc.shape), None
    codes, new_scales = state_formats.encode_blocks(value.clamp_max(state_formats.SATURATION),
                                                    bits)
    return codes.reshape(acc.shape), new_scales

