"""8-bit codes of DTensor (sharded) params in checkpoints: the per-element exponent form.

Live 8-bit state (CLASSP's accumulators, MAS/EWC importances) of a DTensor param is its local
uint8 codes, a DTensor laid out like the param, and a plain float32 tensor of scales, one per
block of ``state_formats.BLOCK`` elements of the local shard's storage. Those scales are no
global tensor (they belong to one rank's shard, and its blocks change with the layout), so
torch.distributed.checkpoint could neither save nor reshard them. A state dict holds instead,
beside the codes, an int8 tensor of the same layout with the exponent of each element's block
scale (``state_formats.element_exponents``): one more byte per element while it exists.

Loading lays codes and exponents out like the param and rebuilds the blocks of its local
shard (``state_formats.blocks_from_exponents``). In the layout they were saved from every
block carries one exponent and comes back bit for bit; in another (a checkpoint resharded, a
whole tensor loaded into shards or shards into a whole) a block mixing elements of blocks of
different scales is encoded again from its exact values, rounded to nearest. A CLASSP step
and the regularizers' passes read decoded values only (a step encodes a block it updates
again from values), so a state whose values come back exactly continues bit for bit, and a
changed layout re-rounds the mixed blocks once.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import state_formats

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor, distribute_tensor = (), None


def like_param(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (full-shaped, plain or DTensor) laid out like ``p``: on p's mesh and placements
    when ``p`` is a DTensor, else a plain tensor on p's device."""
    if isinstance(p, DTensor):
        if isinstance(t, DTensor):
            return t.redistribute(p.device_mesh, p.placements)
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return (t.full_tensor() if isinstance(t, DTensor) else t).to(p.device)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def exponents_of(codes: Tensor, scales: Tensor) -> Tensor:
    """The int8 exponents, per element, of 8-bit ``codes`` (plain or a DTensor) whose local
    blocks have ``scales``, laid out like ``codes``."""
    local = _local(codes)
    exponents = state_formats.element_exponents(scales, local.numel()).view(local.shape)
    if not isinstance(codes, DTensor):
        return exponents
    return DTensor.from_local(exponents, codes.device_mesh, codes.placements, run_check=False,
                              shape=codes.shape, stride=codes.stride())


def check_exponents(exponents, codes: Tensor, where: str) -> None:
    """Raise unless ``exponents`` are per-element exponents of 8-bit ``codes``: a dense int8
    tensor of their shape, a DTensor where they are one, each in [-115, 127] or -128 (a zero
    block). A DTensor's values are counted over its mesh, so every rank refuses together."""
    if (not isinstance(exponents, Tensor) or exponents.dtype != torch.int8
            or exponents.layout != torch.strided or exponents.shape != codes.shape
            or isinstance(exponents, DTensor) != isinstance(codes, DTensor)):
        kind = (f"a {'DTensor ' if isinstance(exponents, DTensor) else ''}{exponents.dtype} "
                f"tensor of shape {tuple(exponents.shape)}" if isinstance(exponents, Tensor)
                else type(exponents).__name__)
        expected = "DTensor" if isinstance(codes, DTensor) else "tensor"
        raise TypeError(f"{where} must be a dense int8 {expected} of the codes' shape "
                        f"{tuple(codes.shape)} (the exponent of each element's block scale), "
                        f"got {kind}")
    values = _local(exponents)
    if values.device.type == "meta" or is_fake(values):
        return
    bad = ((exponents < state_formats.MIN_EXPONENT)
           & (exponents != state_formats.ZERO_EXPONENT)).sum()
    count = int(bad.full_tensor() if isinstance(bad, DTensor) else bad)
    if count:
        raise ValueError(f"{where} has {count} of its {exponents.numel()} elements outside "
                         f"[{state_formats.MIN_EXPONENT}, {state_formats.MAX_EXPONENT}] and "
                         f"not {state_formats.ZERO_EXPONENT} (a zero block): not exponents of "
                         f"8-bit block scales")


def restored(codes: Tensor, exponents: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit ``codes`` with their checked per-element ``exponents`` as new local codes of
    ``param``'s layout and the scales of their blocks (``blocks_from_exponents``), on its
    device."""
    local_codes = _local(like_param(codes, param))
    local_exponents = _local(like_param(exponents, param))
    device = _local(param).device
    new_codes, scales = state_formats.blocks_from_exponents(
        local_codes.reshape(-1), local_exponents.reshape(-1).to(local_codes.device))
    return new_codes.view(local_codes.shape).to(device), scales.to(device)


def decoded(codes: Tensor, exponents: Tensor, param: Tensor) -> Tensor:
    """The exact float32 values of 8-bit ``codes`` with their checked per-element
    ``exponents``, the local part of ``param``'s layout, on its device."""
    local_codes = _local(like_param(codes, param))
    local_exponents = _local(like_param(exponents, param))
    values = state_formats.decode_elements(local_codes.reshape(-1),
                                           local_exponents.reshape(-1).to(local_codes.device))
    return values.view(local_codes.shape).to(_local(param).device)
