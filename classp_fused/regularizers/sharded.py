"""Importance on an FSDP2-sharded model from FSDP2's own reduce-scatter.

Each unit of data (a batch, or one sample for ``per_sample=True``) runs forward and backward
through the sharded model as training would, with a tensor hook on every unsharded parameter
that replaces its gradient g by ``weight * stat(g)`` (|g| for MAS, g^2 for EWC). FSDP2 then
reduce-scatters those statistics instead of gradients: each rank receives, in its shard's
.grad, the sum over ranks (FSDP2 divides by the data-parallel size; multiplied back here) and,
accumulated over units, the importance sums of its own shard. No rank holds more than the
unsharded layers FSDP2 gathers anyway.

Ranks advance in lock-step: before each unit they exchange whether they still have data and
its shape; a rank without data runs the same passes on an empty batch whose gradients are
replaced by zeros, so every collective is joined. The sample counts are all-reduced.

Per-sample importance: when every regularized parameter belongs to a plain nn.Linear layer,
each layer's hook returns the exact per-sample statistic sum_k w_k stat(delta_k) stat(x_k)^T
(bias: sum_k w_k stat(delta_k)) from its input X and output gradient Delta, recorded during
the same forward and backward, so one pass per batch (and per class for the exact Fisher)
serves all its samples. The first batch checks that each such layer ran once on 2-D inputs and
its parameters had no other use; otherwise (and for other layers) it is the batch form on
batches of one sample (exact for MAS and both Fisher forms), one forward and backward per
sample.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .shards import DTensor, local


def units(batches: Iterable, split: Callable[[], bool]) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``batches``, each cut into batches of one sample while ``split()`` is true."""
    for x, y in batches:
        if split():
            yield from samples(x, y)
        else:
            yield x, y


def samples(x: Tensor, y: Tensor | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The samples of a batch, each a batch of one."""
    for k in range(x.shape[0]):
        yield x[k:k + 1], None if y is None else y[k:k + 1]


def lockstep(data: Iterator, group) -> Iterator[tuple[Tensor, Tensor | None, bool]]:
    """(x, y, is_stand_in) while any rank of ``group`` has a unit left; a rank that has
    none gets an empty batch shaped like another rank's."""
    while True:
        unit = next(data, None)
        shape = None if unit is None else _describe(unit)
        shapes = [None] * dist.get_world_size(group)
        dist.all_gather_object(shapes, shape, group=group)
        present = [s for s in shapes if s is not None]
        if not present:
            return
        if unit is not None:
            yield unit[0], unit[1], False
        else:
            yield (*_empty(present[0]), True)


def _describe(unit) -> tuple:
    x, y = unit
    return (tuple(x.shape[1:]), x.dtype, str(x.device),
            None if y is None else (tuple(y.shape[1:]), y.dtype))


def _empty(shape) -> tuple[Tensor, Tensor | None]:
    x_shape, x_dtype, device, y = shape
    x = torch.empty((0, *x_shape), dtype=x_dtype, device=device)
    return x, None if y is None else torch.empty((0, *y[0]), dtype=y[1], device=device)


@contextlib.contextmanager
def statistic_gradients(model: nn.Module, params: dict[str, Tensor],
                        transform: Callable[[str, Tensor], Tensor]
                        ) -> Iterator[dict[str, Tensor]]:
    """While active, each forward hooks the unsharded form of every parameter in ``params``
    so that backward accumulates ``transform(name, g)`` in place of its gradient g; yields
    the unsharded parameters seen, by name. The sharded params' .grad are cleared on entry
    and restored on exit."""
    saved = {name: p.grad for name, p in params.items()}
    owned = {}
    for prefix, module in model.named_modules():
        names = {n: f"{prefix}.{n}" if prefix else n
                 for n, _ in module.named_parameters(recurse=False)}
        names = {n: full for n, full in names.items() if full in params}
        if names:
            owned[module] = names
    hooked: dict[int, object] = {}
    unsharded_params: dict[str, Tensor] = {}

    def pre_forward(module, args):
        for name, full in owned[module].items():
            unsharded = module._parameters.get(name)
            if (unsharded is not None and not isinstance(unsharded, DTensor)
                    and unsharded.requires_grad and id(unsharded) not in hooked):
                hooked[id(unsharded)] = unsharded.register_hook(partial(transform, full))
                unsharded_params[full] = unsharded

    forward_hooks = [m.register_forward_pre_hook(pre_forward) for m in owned]
    for p in params.values():
        p.grad = None
    try:
        yield unsharded_params
    finally:
        for handle in [*forward_hooks, *hooked.values()]:
            handle.remove()
        for name, p in params.items():
            p.grad = saved[name]


class LinearRecord:
    """A plain nn.Linear layer's inputs in the current forward and its output gradient."""

    def __init__(self):
        self.inputs: list[Tensor] = []
        self.delta: Tensor | None = None


def linear_owners(model: nn.Module, params: dict[str, Tensor]
                  ) -> dict[str, tuple[nn.Module, str]] | None:
    """Each parameter name's plain nn.Linear layer and its role ("weight" or "bias"), or None
    when some parameter lies outside such layers."""
    owners = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            for role, _ in module.named_parameters(recurse=False):
                full = f"{prefix}.{role}" if prefix else role
                if full in params:
                    owners[full] = (module, role)
    return owners if owners.keys() == params.keys() else None


@contextlib.contextmanager
def linear_records(owners: dict[str, tuple[nn.Module, str]] | None
                   ) -> Iterator[dict[nn.Module, LinearRecord]]:
    """While active, each forward of the layers in ``owners`` records its input and, in
    backward, its output gradient; clear the records before each forward."""
    records: dict[nn.Module, LinearRecord] = {}

    def hook(module, inputs, output):
        record = records.setdefault(module, LinearRecord())
        record.inputs.append(inputs[0].detach() if inputs else None)
        if output.requires_grad:
            output.register_hook(lambda delta: setattr(record, "delta", delta))

    modules = {module for module, _ in (owners or {}).values()}
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def data_parallel_size(p: Tensor) -> int:
    """Ranks FSDP2 averages gradients over for the DTensor ``p``: its whole mesh."""
    return p.device_mesh.size()


def shard_sums(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The statistics FSDP2 reduce-scattered into each param's .grad, local shards, summed
    over ranks (zeros where no gradient arrived)."""
    sums = {}
    for name, p in params.items():
        g = p.grad
        dtype = torch.promote_types(p.dtype, torch.float32)
        if g is None:
            sums[name] = torch.zeros_like(local(p), dtype=dtype)
        else:
            sums[name] = local(g).to(dtype) * data_parallel_size(p)
    return sums
