"""A param group's validated step inputs, reused while the group is unchanged (host time)."""
from __future__ import annotations

from copy import deepcopy
from operator import attrgetter, is_, itemgetter
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._extension import plan_grads
from .backends.step_spec import CompressedState
from .state_formats import num_blocks
from .validation import foreign_keys

_get_accumulator = itemgetter("accumulator")
_get_step = itemgetter("step")
_get_dtype = attrgetter("dtype")


class GroupPlan:
    """A param group's stepped tensors as the last validated step found them, to step again
    without the explaining per-tensor checks while the group is as it was.

    It holds while the group has the same keys, with the same values for keys of other
    optimizers (``validation.FOREIGN_KEYS``: one set later is checked again), lists the same
    param objects, the same params have a grad, the optimizer's state dict is the same object
    holding the same keys and entries in the same order (compared by identity as the dict
    iterates them, without hashing a param: an entry set, added or removed for any param makes
    a new plan), the accumulator and step counter in each param's entry (and the relative
    threshold's gradient mean, when the plan's step had one) are the same objects, and every
    (param, grad, accumulator) is still dense, dtype- and shape-consistent and on the plan's
    device: one C++ pass over identities and metadata (``_extension.plan_grads``: a ``p.data =
    other`` swap or a new grad is seen there). With compressed accumulators the plan also keeps
    their 8-bit block scales (the same objects, of the same form) and index offsets, and their
    dtypes hold. Grads are taken from the params at every step and not held (the memory of grads
    set to None is freed). Plain tensors only (DTensors are
    checked at every step), and only where the extension is built.

    It also keeps an attached regularizer's penalty terms (importances and anchors) for its
    params, read again when the regularizer or its state changed (``penalty_state_token``, a
    new object whenever consolidate or load_state_dict replaced the state).
    """

    __slots__ = ("group", "keys", "foreign", "state", "state_keys", "state_entries",
                 "all_params", "params", "entries", "accs", "counters", "grad_sq_means",
                 "device", "backend", "steps", "numels", "scales", "offsets", "acc_dtypes",
                 "penalty_source", "penalty_token", "terms")

    @classmethod
    def build(cls, group: dict, state, params: list, base: Optional[Tensor],
              grad_sq_means: Optional[list], backend: str,
              compressed: Optional[CompressedState] = None):
        """The plan of a group just stepped by ``backend`` through ``params`` (its stepped
        params) with step counters viewing ``base``, gradient means ``grad_sq_means`` (None:
        none) and compressed accumulators' ``compressed`` state (None: none); None where the
        group cannot be planned."""
        all_params = list(group["params"])
        stepped = [p for p in all_params if p.grad is not None]
        if (base is None or plan_grads is None or len(stepped) != len(params)
                or not all(map(is_, stepped, params))  # DTensors step on their local shards
                or any(type(p) is not nn.Parameter and type(p) is not Tensor for p in params)):
            return None
        plan = cls()
        plan.group, plan.state, plan.all_params = group, state, all_params
        plan.keys = frozenset(group)
        plan.foreign = [(key, deepcopy(group[key])) for key in foreign_keys(group)]
        plan.params = params
        plan.entries = [state[p] for p in params]
        plan.state_keys, plan.state_entries = list(state), list(state.values())
        plan.accs = list(map(_get_accumulator, plan.entries))
        plan.counters = list(map(_get_step, plan.entries))
        plan.grad_sq_means = grad_sq_means
        plan.device, plan.backend = params[0].device, backend
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
        if group is not self.group or state is not self.state or group.keys() != self.keys:
            return None
        for key, value in self.foreign:
            if group[key] != value:
                return None
        grads = plan_grads(group["params"], self.all_params, self.params, self.accs,
                           self.entries, self.counters, self.grad_sq_means, state,
                           self.state_keys, self.state_entries, self.scales is not None)
        if grads is None or self.params[0].device != self.device:
            return None
        if self.scales is not None and not self._compressed_as_planned():
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
