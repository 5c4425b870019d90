"""A param group's validated step inputs, reused while the group is unchanged (host time)."""
from __future__ import annotations

from copy import deepcopy
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._extension import steppable_as_is
from .state_formats import num_blocks
from .backends.step_spec import CompressedState
from .validation import foreign_keys

_get_grads = attrgetter("grad")
_get_accumulator = itemgetter("accumulator")
_get_step = itemgetter("step")
_get_grad_sq_mean = itemgetter("grad_sq_mean")
_get_dtype = attrgetter("dtype")


class GroupPlan:
    """A param group's stepped tensors as the last validated step found them, to step again
    without the explaining per-tensor checks while the group is as it was.

    It holds while the group has the same keys, with the same values for keys of other
    optimizers (``validation.FOREIGN_KEYS``: one set later is checked again), lists the same
    param objects, the same params have a grad, the optimizer's state dict, each param's state
    entry and the accumulator and step counter in it (and the relative threshold's gradient
    mean, when the plan's step had one) are the same objects, and every (param, grad,
    accumulator) is still dense, dtype- and shape-consistent and on the plan's device (one C++
    pass over the metadata, ``_extension.steppable_as_is``: a ``p.data = other`` swap or a new
    grad is seen there). With compressed accumulators the plan also keeps their 8-bit block
    scales (the same objects, of the same form) and index offsets, and their dtypes hold.
    Grads are taken from the params at every step and not held (the memory of grads set to
    None is freed). Plain tensors only (DTensors are checked at every step), and only where
    the extension is built.

    It also keeps an attached regularizer's penalty terms (importances and anchors) for its
    params, read again when the regularizer or its state changed (``penalty_state_token``, a
    new object whenever consolidate or load_state_dict replaced the state).
    """

    __slots__ = ("group", "keys", "foreign", "state", "all_params", "has_grad", "params",
                 "entries", "accs", "counters", "grad_sq_means", "device", "steps", "numels",
                 "scales", "offsets", "acc_dtypes", "penalty_source", "penalty_token", "terms")

    @classmethod
    def build(cls, group: dict, state, params: list, base: Optional[Tensor],
              grad_sq_means: Optional[list], compressed: Optional[CompressedState] = None):
        """The plan of a group just stepped through ``params`` (its stepped params) with step
        counters viewing ``base``, gradient means ``grad_sq_means`` (None: none) and compressed
        accumulators' ``compressed`` state (None: none); None where the group cannot be
        planned."""
        all_params = list(group["params"])
        stepped = [p for p in all_params if p.grad is not None]
        if (base is None or steppable_as_is is None or len(stepped) != len(params)
                or not all(map(is_, stepped, params))  # DTensors step on their local shards
                or any(type(p) is not nn.Parameter and type(p) is not Tensor for p in params)):
            return None
        plan = cls()
        plan.group, plan.state, plan.all_params = group, state, all_params
        plan.keys = frozenset(group)
        plan.foreign = [(key, deepcopy(group[key])) for key in foreign_keys(group)]
        plan.has_grad = [p.grad is not None for p in all_params]
        plan.params = params
        plan.entries = [state[p] for p in params]
        plan.accs = list(map(_get_accumulator, plan.entries))
        plan.counters = list(map(_get_step, plan.entries))
        plan.grad_sq_means = grad_sq_means
        plan.device = params[0].device
        plan.steps = base
        plan.numels = [p.numel() for p in params]
        plan.scales = plan.offsets = plan.acc_dtypes = None
        if compressed is not None:
            plan.scales, plan.offsets = list(compressed.scales), list(compressed.offsets)
            plan.acc_dtypes = list(map(_get_dtype, plan.accs))
        plan.keep_penalty_terms(None, None)
        return plan

    def keep_penalty_terms(self, source, terms: Optional[tuple]) -> None:
        """Keep ``terms``, the checked ``(importances, anchors)`` of ``source`` for the plan's
        params (None: no penalty), read from its current state; ``source`` None keeps none."""
        self.penalty_source = source
        self.penalty_token = None if source is None else source.penalty_state_token
        self.terms = terms

    def penalty_terms(self, source, read: Callable[[list], Optional[tuple]]) -> Optional[tuple]:
        """The penalty terms of ``source`` for the plan's params: those kept while ``source``
        and its state are the ones they were read from, else ``read(params)``, then kept."""
        if self.penalty_source is not source or (
                self.penalty_token is not source.penalty_state_token):
            self.keep_penalty_terms(source, read(self.params))
        return self.terms

    def current_grads(self, group: dict, state) -> Optional[list]:
        """The grads of the plan's params if the group's tensors are still those of the plan
        and steppable as they are, else None."""
        all_params = group["params"]
        if (group is not self.group or state is not self.state or group.keys() != self.keys
                or len(all_params) != len(self.all_params)
                or not all(map(is_, all_params, self.all_params))):
            return None
        for key, value in self.foreign:
            if group[key] != value:
                return None
        grads = list(map(_get_grads, all_params))
        if any(map(is_, grads, repeat(None))):
            if [g is not None for g in grads] != self.has_grad:
                return None
            grads = [g for g in grads if g is not None]
        elif not all(self.has_grad):
            return None
        params, entries = self.params, self.entries
        try:
            if (not all(map(is_, map(state.get, params), entries))
                    or not all(map(is_, map(_get_accumulator, entries), self.accs))
                    or not all(map(is_, map(_get_step, entries), self.counters))
                    or self.grad_sq_means is not None
                    and not all(map(is_, map(_get_grad_sq_mean, entries), self.grad_sq_means))):
                return None
        except KeyError:  # an entry emptied
            return None
        if self.scales is not None and not self._compressed_as_planned():
            return None
        if (not steppable_as_is(params, grads, self.accs, self.scales is not None)
                or params[0].device != self.device):
            return None
        return grads

    def _compressed_as_planned(self) -> bool:
        """Whether the accumulators have their planned dtypes and the 8-bit ones their planned
        scales, still contiguous float32 tensors of their size on the plan's device."""
        if list(map(_get_dtype, self.accs)) != self.acc_dtypes:
            return False
        for entry, scales, numel in zip(self.entries, self.scales, self.numels):
            if scales is None:
                if "accumulator_scales" in entry:
                    return False
            elif (entry.get("accumulator_scales") is not scales
                  or scales.dtype is not torch.float32 or scales.device != self.device
                  or scales.shape != (num_blocks(numel),) or not scales.is_contiguous()):
                return False
        return True
