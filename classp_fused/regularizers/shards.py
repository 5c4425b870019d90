"""Plain tensors and FSDP2 DTensors side by side: local shards, layouts like a parameter."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..sharded_codes import like_param

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor, Shard = (), ()


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def match_shard(state: dict[str, Tensor], name: str, p: Tensor) -> Tensor:
    """``state[name]``, made (once, in place in ``state``) a DTensor like ``p`` if ``p`` is."""
    t = state[name]
    if isinstance(p, DTensor) and not isinstance(t, DTensor):
        t = state[name] = like_param(t, p)
    return t


def wrap_like(t: Tensor, like: Tensor) -> Tensor:
    """Local tensor ``t`` as a DTensor laid out like ``like`` when that is one, else ``t``."""
    if isinstance(like, DTensor):
        return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape,
                                  stride=like.stride())
    return t


def sum_over_mesh(t: Tensor, like: Tensor) -> Tensor:
    """``t`` summed in place over the mesh dims that shard ``like`` when it is a DTensor (the
    sum of every shard's part; replicas are not counted twice), else ``t``."""
    if isinstance(like, DTensor):
        for dim, placement in enumerate(like.placements):
            if isinstance(placement, Shard):
                dist.all_reduce(t, group=like.device_mesh.get_group(dim))
    return t


def max_over_mesh(t: Tensor, like: Tensor | None) -> Tensor:
    """``t`` maxed in place over every rank of the mesh of ``like`` when it is a DTensor, else
    ``t``."""
    if isinstance(like, DTensor):
        for dim in range(like.device_mesh.ndim):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=like.device_mesh.get_group(dim))
    return t


def any_over_mesh(flag: bool, like: Tensor | None) -> bool:
    """``flag`` or'ed over every rank of the mesh of ``like`` when it is a DTensor, else
    ``flag``: so that all ranks of the mesh refuse together or none does."""
    if not isinstance(like, DTensor):
        return flag
    return bool(max_over_mesh(torch.tensor(float(flag), device=local(like).device), like).item())
