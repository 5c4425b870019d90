"""Consolidated state of a regularizer: importance, anchor and residual per parameter.

Every method keeps, per regularized parameter, an importance Omega and an anchor m such that
its penalty is ``scale * (sum Omega * (theta - m)^2 + residual)``; the residual is a float64
scalar per parameter, zero except for EWC in separate mode. That form holds any number of
tasks in constant memory: for quadratics, a*(x - p)^2 + b*(x - q)^2 =
(a + b) * (x - (a*p + b*q)/(a + b))^2 + a*b/(a + b) * (p - q)^2.

State only enters through ``_enter_task`` (a consolidated task) and ``load_state_dict``; both
check the values (finite; importance and residual >= 0) before anything changes, so the
per-step penalty, gradient and proximal step only check that each parameter still fits its
state (shape, dtype, device).

Importance formats (``state_dtype``, ``classp_fused.state_formats``): ``"param"`` keeps Omega
in the parameter's dtype; ``"bf16"`` as bfloat16 (float32 parameters); ``"8bit"`` as uint8
codes with a float32 power-of-two scale per block of 256 elements (``_importance_scales``).
Float64 parameters and tensors under 4096 elements keep the parameter's dtype in every format.
A task boundary decodes the old Omega to float32, merges it with the new task's in float32
(under ``"param"``: in the parameter's dtype, as stored), checks the result and rounds it to
nearest into the format, one parameter at a time. Every reader (penalty, its gradient and
proximal step, stability bounds, an attached CLASSP) reads the decoded values. The 8-bit codes
of a DTensor parameter (FSDP2) are a DTensor laid out like it, their block scales those of its
local shard; its state dict holds per-element exponents in their place
(``classp_fused.sharded_codes``).

``TaskState`` is mixed into ``Regularizer``; it uses ``self.model``, ``self.normalize`` and
the subclass's ``_merge``.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from ..sharded_codes import check_exponents, decoded, exponents_of, like_param, restored
from ..state_formats import (BLOCK, IMPORTANCE_FORMATS, encode_importance, importance_dtype,
                             importance_values, num_blocks)
from .checks import bad_values
from .shards import DTensor, any_over_mesh, local, match_shard, sum_over_mesh, wrap_like


def check_state_dtype(state_dtype) -> str:
    """``state_dtype``, checked to be an importance format."""
    if not isinstance(state_dtype, str) or state_dtype not in IMPORTANCE_FORMATS:
        raise ValueError(f"state_dtype must be one of {IMPORTANCE_FORMATS} (how the importance "
                         f"is stored; 'param': in each parameter's dtype), got {state_dtype!r}")
    return state_dtype


class TaskState:
    """The consolidated state and its (de)serialisation.

    Attributes: ``tasks_seen`` (task boundaries consolidated), ``task_importances`` (a list of
    per-task importance dicts, in the parameters' dtypes, when the method was asked to keep
    them, else None).
    """

    state_dtype: str

    def _reset_state(self, keep_task_importances: bool) -> None:
        self._importance: dict[str, Tensor] = {}
        self._importance_scales: dict[str, Tensor] = {}  # of the uint8 (8-bit) importances
        self._anchor: dict[str, Tensor] = {}
        self._residual: dict[str, Tensor] = {}
        self.tasks_seen = 0
        self.task_importances: list[dict[str, Tensor]] | None = (
            [] if keep_task_importances else None)

    @property
    def importance(self) -> dict[str, Tensor]:
        """Importance per parameter name (for EWC separate, the sum over tasks of F_t): its
        values in the parameter's dtype, decoded (a copy) where ``state_dtype`` stores it
        compressed; ``state_dict`` holds the stored form.

        Under FSDP2 an entry is a DTensor once the state has been laid out like its parameter.
        """
        return {name: wrap_like(importance_values(local(t), self._importance_scales.get(name),
                                                  self._anchor[name].dtype), t)
                for name, t in self._importance.items()}

    @property
    def anchor(self) -> dict[str, Tensor]:
        """Anchor per parameter name: theta* of the latest task, or for EWC separate the
        importance-weighted mean sum_t F_t theta*_t / sum_t F_t (theta*_latest where that sum
        is zero)."""
        return dict(self._anchor)

    def _terms(self) -> tuple[list, list, list, list, list]:
        """(params, local stored importances, their 8-bit block scales or None, local anchors,
        residuals) for params requiring grad.

        Raises ValueError naming the first parameter that no longer fits its state."""
        params, imps, scales, anchors, residuals = [], [], [], [], []
        for name, p in self.model.named_parameters():
            if name in self._importance and p.requires_grad:
                imps.append(self._fitting_importance(name, p))
                scales.append(self._importance_scales.get(name))
                anchors.append(self._fitting(self._anchor, name, p, "anchor", p.dtype))
                params.append(p)
                residuals.append(self._residual.get(name))
        return params, imps, scales, anchors, residuals

    def _check_fits(self, params: dict[str, Tensor]) -> None:
        """Raise ValueError naming the first of ``params`` that no longer fits its state."""
        for name, p in params.items():
            if name in self._importance:
                self._fitting_importance(name, p)
                self._fitting(self._anchor, name, p, "anchor", p.dtype)

    def _fitting_importance(self, name: str, p: Tensor) -> Tensor:
        """The local stored importance of ``name`` laid out like ``p`` (``_fitting``), in the
        dtype this regularizer's format gives ``p``."""
        self._laid_out_importance(name, p)
        return self._fitting(self._importance, name, p, "importance",
                             importance_dtype(p, self.state_dtype))

    def _laid_out_importance(self, name: str, p: Tensor) -> Tensor:
        """The stored importance of ``name``, made (once, in place) a DTensor like ``p`` if
        ``p`` is one of its shape (``match_shard``). 8-bit codes of the whole tensor
        (consolidated before FSDP2 sharded ``p``) become the codes of its local shard with the
        scales of the shard's blocks (``sharded_codes.restored``: re-rounded to nearest only
        where a local block mixes blocks of the whole with different scales)."""
        t = self._importance[name]
        if (t.dtype != torch.uint8 or not isinstance(p, DTensor) or isinstance(t, DTensor)
                or t.shape != p.shape):
            return match_shard(self._importance, name, p) if t.shape == p.shape else t
        codes, scales = restored(t, exponents_of(t, self._importance_scales[name]), p)
        self._importance[name] = wrap_like(codes, p)
        self._importance_scales[name] = scales
        return self._importance[name]

    @staticmethod
    def _fitting(state: dict[str, Tensor], name: str, p: Tensor, key: str,
                 dtype: torch.dtype) -> Tensor:
        """The local tensor of ``state[name]`` laid out like ``p`` (``match_shard``); a
        ValueError naming the parameter when its shape, device or ``dtype`` (the one it is
        kept in for ``p``) changed since."""
        t = state[name]
        if not isinstance(p, DTensor) and not isinstance(t, DTensor):  # plain: the per-step case
            if t.shape == p.shape and t.dtype == dtype and t.device == p.device:
                return t
        elif t.shape == p.shape and t.dtype == dtype:
            t = local(match_shard(state, name, p))
            if t.device == local(p).device and t.shape == local(p).shape:
                return t
        hint = ("load a state for this model or build a new regularizer" if t.shape != p.shape
                else "reg.load_state_dict(reg.state_dict()) moves the state to the parameter's "
                     "dtype (the importance to its format) and device")
        raise ValueError(
            f"parameter {name!r} ({_layout(p)}) no longer fits its {key} ({_layout(t)}): the "
            f"model changed after the state was consolidated or loaded; {hint}")

    def _enter_task(self, new: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Fold a finished task's importance ``new`` (values of any floating dtype; a
        consolidate gives float32 or float64) and anchor into the state, all or nothing.

        Tensors may be plain or DTensors (then the merge runs on local shards and residual
        increments are summed over the mesh). One parameter at a time, the old importance is
        decoded, merged with the new one in ``_merge_dtype``, checked and stored in this
        regularizer's format. A parameter with state but no entry in ``new``
        (frozen during the task: it had no gradient) keeps its anchor and residual, and its
        importance is the method's merge with a zero new importance (unchanged for MAS "sum"
        and EWC separate, times alpha for MAS "ema", times gamma for online EWC), exactly as
        for a parameter the task did not touch. The merged state is checked (finite,
        importance and residual >= 0) before it replaces the old one; ValueError naming the
        parameter if not.
        """
        importance, scales, anchors, increments, bad = {}, {}, {}, {}, None
        label = "importance of {!r} after this task"
        for name, imp in new.items():
            dtype = self._merge_dtype(anchor[name])
            merged = local(imp).to(dtype), local(anchor[name]).to(dtype), None
            if name in self._importance:
                old_imp = self._local_values(name, imp, dtype)
                old_anchor = local(match_shard(self._anchor, name, imp)).to(dtype)
                merged = self._merge(old_imp, old_anchor, *merged[:2])
                if merged[2] is not None:
                    increments[name] = merged[2]
            anchors[name] = wrap_like(merged[1].to(anchor[name].dtype), imp)
            found = self._store(importance, scales, name, merged[0], anchor[name], imp, label)
            bad = bad or found
        for name, old_imp in self._importance.items():
            if name not in new:
                kept_anchor = self._anchor[name]
                dtype = self._merge_dtype(kept_anchor)
                old, kept = self._local_values(name, old_imp, dtype), local(kept_anchor).to(dtype)
                carried = self._merge(old, kept, torch.zeros_like(old), kept)[0]
                anchors[name] = kept_anchor
                found = self._store(importance, scales, name, carried, kept_anchor, old_imp, label)
                bad = bad or found
        residual = dict(self._residual)
        if self._folds_tasks_exactly():  # a residual from the first task on: constant bytes
            for name in new:
                residual.setdefault(name, torch.zeros((), dtype=torch.float64))
        if increments:
            sums = torch.stack([increments[n].to(torch.float64) for n in increments])
            sums = sum_over_mesh(sums, next(iter(new.values())))
            for name, s in zip(increments, sums):
                residual[name] = residual[name] + s.cpu()
        entries = _value_entries({}, anchors, residual, "{} of {!r} after this task")
        _refuse_bad_values(entries, "consolidate: ", "; the state is left as it was", bad)
        self._importance, self._importance_scales = importance, scales
        self._anchor, self._residual = anchors, residual
        self.tasks_seen += 1
        if self.task_importances is not None:
            self.task_importances.append({name: t.to(anchor[name].dtype)
                                          for name, t in new.items()})

    def _merge_dtype(self, param: Tensor) -> torch.dtype:
        """The dtype a task boundary merges the importance of ``param`` (or its anchor) in:
        the param's own under ``"param"`` (as stored), else float32 (float64 for float64)."""
        if self.state_dtype == "param":
            return param.dtype
        return torch.promote_types(param.dtype, torch.float32)

    def _local_values(self, name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
        """The local values of the stored importance of ``name``, laid out like ``like``
        (``match_shard``), decoded to ``dtype``."""
        stored = local(self._laid_out_importance(name, like))
        return importance_values(stored, self._importance_scales.get(name), dtype)

    def _store(self, importance: dict, scales: dict, name: str, values: Tensor,
               param: Tensor, like: Tensor, label: str) -> tuple | None:
        """Store local importance ``values`` of ``param`` (or its anchor) in this regularizer's
        format into ``importance`` (laid out like ``like``) and ``scales``, rounded to nearest;
        the refusal ``(label, True, what is wrong)`` when the values are not finite and >= 0
        (checked before 8-bit encoding, which would cap them), else None."""
        dtype = importance_dtype(param, self.state_dtype)
        if dtype == torch.uint8:
            detail = bad_values(values, True)
            if detail is None:
                codes, scales[name] = encode_importance(values, dtype)
                importance[name] = wrap_like(codes, like)
        else:
            importance[name] = wrap_like(values.to(dtype), like)
            detail = bad_values(local(importance[name]), True)
        return None if detail is None else (label.format(name), True, detail)

    def state_bytes(self) -> int:
        """Bytes this rank keeps: importance (as stored, 8-bit block scales included), anchor
        and residual per parameter, plus the per-task importances when kept. Independent of
        the task count otherwise."""
        tensors = [*self._importance.values(), *self._importance_scales.values(),
                   *self._anchor.values(), *self._residual.values()]
        for task in self.task_importances or []:
            tensors.extend(task.values())
        return sum(local(t).numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict:
        """Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it.

        Importances are in their stored form (``state_dtype``): the parameter's dtype,
        bfloat16, or uint8 8-bit codes whose float32 block scales ``importance_scales`` holds
        (that entry is there under ``state_dtype="8bit"``).
        For a DTensor parameter (FSDP2) the importance and anchor entries are DTensors with its
        mesh and placements, as torch.distributed.checkpoint needs; the returned tensors are
        the state itself, so ``dcp.load`` into them loads in place. The block scales of a
        DTensor's 8-bit codes belong to its local shard: ``importance_exponents`` (there when
        some importance is such) holds in their place a new int8 DTensor laid out like the
        codes with the exponent of each element's block scale (``classp_fused.sharded_codes``;
        one more byte per element while the dict exists). Residuals are plain float64
        scalars, equal on every rank. Entries of frozen parameters are included: the state
        always loads back into this regularizer.
        """
        params = dict(self.model.named_parameters())
        for name in self._importance:
            p = params.get(name)
            if p is not None and p.shape == self._importance[name].shape:
                self._laid_out_importance(name, p)
                match_shard(self._anchor, name, p)
        importance = dict(self._importance)
        state = {"method": self._method_name(), "normalize": self.normalize,
                 "tasks_seen": self.tasks_seen, "importance": importance,
                 "anchor": dict(self._anchor), "residual": dict(self._residual)}
        if self.state_dtype == "8bit":
            sharded = [n for n in self._importance_scales if isinstance(importance[n], DTensor)]
            state["importance_scales"] = {n: t for n, t in self._importance_scales.items()
                                          if n not in sharded}
            if sharded:
                state["importance_exponents"] = {
                    n: exponents_of(importance[n], self._importance_scales[n]) for n in sharded}
        if self.task_importances is not None:
            state["task_importances"] = [dict(task) for task in self.task_importances]
        return state

    def empty_state_dict(self) -> dict:
        """A template shaped like ``state_dict()`` after a consolidate, zeros laid out like the
        parameters (DTensors under FSDP2): what ``torch.distributed.checkpoint.load`` loads
        into before ``load_state_dict``. It covers the parameters that require grad and those
        holding state; build it before freezing parameters that held state when it was saved.
        Per-task importances are not part of it."""
        params = {n: p for n, p in self.model.named_parameters()
                  if p.requires_grad or n in self._importance}
        codes = [n for n, p in params.items()
                 if importance_dtype(p, self.state_dtype) == torch.uint8]
        sharded = [n for n in codes if isinstance(params[n], DTensor)]
        with torch.no_grad():
            state = {"method": self._method_name(), "normalize": self.normalize,
                     "tasks_seen": 0,
                     "importance": {n: torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                                    if n in codes and n not in sharded
                                    else torch.zeros_like(
                                        p, dtype=importance_dtype(p, self.state_dtype))
                                    for n, p in params.items()},
                     "anchor": {n: torch.zeros_like(p) for n, p in params.items()},
                     "residual": {n: torch.zeros((), dtype=torch.float64) for n in params}
                     if self._folds_tasks_exactly() else {}}
            if self.state_dtype == "8bit":
                state["importance_scales"] = {
                    n: torch.zeros(num_blocks(params[n].numel()), dtype=torch.float32,
                                   device=params[n].device)
                    for n in codes if n not in sharded}
                if sharded:
                    state["importance_exponents"] = {
                        n: torch.zeros_like(params[n], dtype=torch.int8) for n in sharded}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()``; hyperparameters stay the constructor's.

        Entries are full-shaped plain tensors (a single-process ``torch.save``) or DTensors
        (torch.distributed.checkpoint); each is copied and re-laid out like its parameter
        (frozen or not). The per-task form of earlier versions (``{"tasks": [{"importance",
        "anchor"}, ...]}``) is folded task by task into the constant-memory form.

        Importances are converted to this regularizer's ``state_dtype``, whatever format they
        were saved in: 8-bit codes load as they are into an 8-bit state (bit for bit; laid out
        otherwise than saved, a block of the local shard that mixes elements of blocks with
        other scales is rounded again to nearest from its exact values,
        ``classp_fused.sharded_codes``) and are decoded into any other; values are rounded to
        nearest into bfloat16 or 8-bit codes.

        Everything is checked before anything changes; each refusal names the entry and what
        it expected: importance and anchor for the same parameters, of their parameter's
        shape, anchors floating-point, importances floating-point or uint8 codes with their
        ``importance_scales`` entry (float32, one per block of 256 elements, each 0 or a power
        of two in [2**-115, 2**127]; plain codes only) or their ``importance_exponents`` entry
        (int8, laid out like the codes, each in [-115, 127] or -128 for a zero block; scales
        and exponents only for uint8 importances); importances (also per
        task, decoded) and residuals finite and >= 0, anchors finite, in the parameter's
        dtype; residuals scalars, only for EWC-separate; ``tasks_seen`` an int >= 0;
        ``normalize`` (absent: ``"none"``, as states of earlier versions) this regularizer's,
        since it sets the importance's units. Under FSDP2 every rank refuses together.
        """
        if not isinstance(state, Mapping):
            raise TypeError("state must be a mapping as state_dict() returns, got "
                            f"{type(state).__name__}")
        normalize = state.get("normalize", "none")
        if normalize != self.normalize:
            raise ValueError(f"state was consolidated with normalize={normalize!r}, this "
                             f"{type(self).__name__} has normalize={self.normalize!r}: its "
                             f"importance is in other units; build the regularizer with "
                             f"normalize={normalize!r}")
        params = dict(self.model.named_parameters())
        if "tasks" in state and state.get("method") == type(self).__name__:
            self._load_per_task(state["tasks"], params)
            return
        if state.get("method") != self._method_name():
            raise ValueError(f"state is for {state.get('method')!r}, not {self._method_name()}")
        importances, anchors = _pair(state, "state")
        importance, scales, bad = self._load_importances(
            importances, state.get("importance_scales", {}),
            state.get("importance_exponents", {}), params)
        anchor = _load_tensors(anchors, params, "state anchor")
        residual = self._load_residuals(state.get("residual", {}), importance)
        tasks_seen = state.get("tasks_seen", 1 if importance else 0)
        if isinstance(tasks_seen, bool) or not isinstance(tasks_seen, numbers.Integral):
            raise TypeError(f"state tasks_seen must be an int >= 0, got {_kind(tasks_seen)}")
        if tasks_seen < 0:
            raise ValueError(f"state tasks_seen must be an int >= 0, got {tasks_seen}")
        kept = None
        if self.task_importances is not None:
            tasks = state.get("task_importances", [])
            if not isinstance(tasks, (list, tuple)):
                raise TypeError("state task_importances must be a list of importance dicts, "
                                f"got {type(tasks).__name__}")
            kept = [_load_tensors(t, params, f"state task_importances[{i}]")
                    for i, t in enumerate(tasks)]
        entries = _value_entries({}, anchor, residual, "state {} {!r}")
        for i, task in enumerate(kept or []):
            entries += [(f"state task_importances[{i}] {name!r}", t, True)
                        for name, t in task.items()]
        _refuse_bad_values(entries, "", "", bad)
        self._importance, self._importance_scales = importance, scales
        self._anchor, self._residual = anchor, residual
        self.tasks_seen = int(tasks_seen)
        self.task_importances = kept

    def _load_per_task(self, tasks, params: dict) -> None:
        """Check the per-task (importance, anchor) pairs of an earlier version's state and
        fold them into a fresh state, all or nothing."""
        if not isinstance(tasks, (list, tuple)):
            raise TypeError("state tasks must be a list of {'importance', 'anchor'} dicts, got "
                            f"{type(tasks).__name__}")
        if len(tasks) > 1 and not self._folds_tasks_exactly():
            raise ValueError(f"{self._method_name()} keeps one task, the state has "
                             f"{len(tasks)}")
        loaded = [self._load_pair(task, params, f"state tasks[{i}]")
                  for i, task in enumerate(tasks)]
        _refuse_bad_values([entry for i, (importance, anchor) in enumerate(loaded)
                            for entry in _value_entries(importance, anchor, {},
                                                        f"state tasks[{i}] {{}} {{!r}}")],
                           "", "")
        saved = dict(vars(self))
        self._reset_state(self.task_importances is not None)
        try:
            for importance, anchor in loaded:
                self._enter_task(importance, anchor)
        except BaseException:
            vars(self).update(saved)
            raise

    @staticmethod
    def _load_pair(state, params: dict, where: str) -> tuple[dict, dict]:
        """The checked and laid out ``importance`` and ``anchor`` dicts of ``state`` (values
        in each parameter's dtype)."""
        importance, anchor = _pair(state, where)
        return (_load_tensors(importance, params, f"{where} importance"),
                _load_tensors(anchor, params, f"{where} anchor"))

    def _load_importances(self, tensors: Mapping, scales, exponents, params: dict
                          ) -> tuple[dict, dict, tuple | None]:
        """A state's importances (``tensors``, the 8-bit ones with their block ``scales`` or
        per-element ``exponents``) in this regularizer's format, laid out like their
        parameters: (stored, 8-bit block scales, the first entry whose values are not finite
        and >= 0 as ``(label, True, what)`` or None). Malformed entries raise, naming the
        entry. One parameter at a time: decoded or float32 temporaries are one parameter's."""
        entries = {"importance_scales": scales, "importance_exponents": exponents}
        for key, per_name in entries.items():
            if not isinstance(per_name, Mapping):
                raise TypeError(f"state {key} must be a dict of tensors by parameter name, got "
                                f"{type(per_name).__name__}")
        stored, kept_scales, bad = {}, {}, None
        for name, t in tensors.items():
            label = f"state importance {name!r}"
            p = params.get(name) if isinstance(name, str) else None
            if p is None:
                raise ValueError(f"{label} matches no parameter of the model")
            if not isinstance(t, Tensor) or not (t.is_floating_point() or t.dtype == torch.uint8):
                raise TypeError(f"{label} must be a floating-point tensor (or uint8 8-bit "
                                f"codes), got {_kind(t)}")
            if t.shape != p.shape:
                raise ValueError(f"{label} has shape {tuple(t.shape)}, its parameter "
                                 f"{tuple(p.shape)}")
            dtype = importance_dtype(p, self.state_dtype)
            codes = block_scales = None
            if t.dtype == torch.uint8 and (name in exponents or isinstance(t, DTensor)
                                           or isinstance(p, DTensor)):
                element_exponents = _checked_exponents(t, scales.get(name),
                                                       exponents.get(name), name)
                if dtype == torch.uint8:
                    codes, block_scales = restored(t, element_exponents, p)
                    codes = wrap_like(codes, p)
                else:
                    values = decoded(t, element_exponents, p)
            elif t.dtype == torch.uint8:
                codes, block_scales = _checked_codes(t, scales.get(name), name, p.device)
                values = importance_values(codes, block_scales, torch.float32)
            else:
                values = local(like_param(t.detach(), p)).to(
                    torch.float32 if dtype == torch.uint8 else dtype)
            if dtype == torch.uint8:
                detail = None if codes is not None else bad_values(values, True)
                if codes is None and detail is None:
                    codes, block_scales = encode_importance(values, dtype)
                    codes = wrap_like(codes, p)
                stored[name], kept_scales[name] = codes, block_scales
            else:
                out = wrap_like(values.to(dtype), p)
                if local(out).untyped_storage().data_ptr() == local(t).untyped_storage().data_ptr():
                    out = out.clone()
                stored[name] = out
                detail = bad_values(local(out), True)
            if bad is None and detail is not None:
                bad = (label, True, detail)
        for key, per_name in entries.items():
            stray = [n for n in per_name if n not in tensors or tensors[n].dtype != torch.uint8]
            if stray:
                raise ValueError(f"state {key} {stray[0]!r} belongs to no uint8 importance "
                                 f"entry: block scales and exponents go with 8-bit codes only")
        return stored, kept_scales, bad

    def _load_residuals(self, residuals, importance: dict) -> dict[str, Tensor]:
        """The checked ``residual`` entries of a state, as float64 CPU scalars."""
        if not isinstance(residuals, Mapping):
            raise TypeError("state residual must be a dict of scalar tensors by parameter "
                            f"name, got {type(residuals).__name__}")
        loaded = {}
        for name, t in residuals.items():
            if not self._folds_tasks_exactly():
                raise ValueError(f"state residual {name!r}: {self._method_name()} keeps no "
                                 "residual (only EWC-separate does)")
            if name not in importance:
                raise ValueError(f"state residual {name!r} has no importance entry: residuals "
                                 "belong to regularized parameters")
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 0:
                raise TypeError(f"state residual {name!r} must be a floating-point scalar "
                                f"tensor, got {_kind(t)}")
            loaded[name] = local(t).detach().to("cpu", torch.float64, copy=True)
        return loaded

    def _method_name(self) -> str:
        return type(self).__name__

    def _folds_tasks_exactly(self) -> bool:
        """Whether several per-task states fold into this method's state without loss."""
        return False


def _pair(state, where: str) -> tuple[Mapping, Mapping]:
    """The ``importance`` and ``anchor`` mappings of ``state``, checked to name the same
    parameters."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{where} must be a mapping with 'importance' and 'anchor', got "
                        f"{type(state).__name__}")
    for key in ("importance", "anchor"):
        if not isinstance(state.get(key), Mapping):
            raise TypeError(f"{where} {key} must be a dict of tensors by parameter name, "
                            f"got {type(state.get(key)).__name__}")
    missing = set(state["importance"]) ^ set(state["anchor"])
    if missing:
        raise ValueError(f"{where} has importance and anchor for different parameters: "
                         f"{sorted(missing, key=str)} lack their pair")
    return state["importance"], state["anchor"]


def _checked_codes(codes: Tensor, scales, name: str, device) -> tuple[Tensor, Tensor]:
    """Copies on ``device`` of the plain uint8 importance ``codes`` of ``name`` (contiguous)
    and of its block ``scales`` (``_check_block_scales``)."""
    _check_block_scales(codes, scales, name)
    return (codes.detach().to(device).contiguous().clone(),
            scales.detach().to(device).contiguous().clone())


def _check_block_scales(codes: Tensor, scales, name: str) -> None:
    """Raise unless ``scales`` are the block scales of the plain uint8 importance ``codes`` of
    ``name``: float32, one per block of 256 elements, each 0 or a power of two in
    [2**-115, 2**127]."""
    label = f"state importance_scales {name!r}"
    if scales is None:
        raise ValueError(f"state importance {name!r} holds uint8 8-bit codes, but "
                         f"importance_scales has no entry for it (its block scales)")
    blocks = num_blocks(codes.numel())
    if (not isinstance(scales, Tensor) or isinstance(scales, DTensor)
            or scales.dtype != torch.float32 or scales.shape != (blocks,)):
        raise TypeError(f"{label} must be a float32 tensor of shape ({blocks},) (one scale per "
                        f"{BLOCK} elements), got {_kind(scales)}")
    bits = scales.detach().view(torch.int32)
    exponent = bits >> 23  # 127 + E for 2**E; negative for a set sign bit
    power = ((bits & 0x7FFFFF) == 0) & (exponent >= 127 - 115) & (exponent <= 127 + 127)
    wrong = int((~(power | (bits == 0))).sum())
    if wrong:
        raise ValueError(f"{label} must hold 0 or powers of two in [2**-115, 2**127], got "
                         f"{wrong} other element(s)")


def _checked_exponents(codes: Tensor, scales, exponents, name: str) -> Tensor:
    """The per-element block exponents of the uint8 importance ``codes`` of ``name``: its
    ``importance_exponents`` entry, checked (``sharded_codes.check_exponents``), or for plain
    codes of the whole tensor those of its checked block ``scales``."""
    if scales is not None and exponents is not None:
        raise ValueError(f"state importance {name!r} has an entry in importance_scales and in "
                         f"importance_exponents: 8-bit codes carry one of them")
    if exponents is not None:
        check_exponents(exponents, codes, f"state importance_exponents {name!r}")
        return exponents.detach()
    if isinstance(codes, DTensor):
        raise ValueError(f"state importance {name!r} holds 8-bit codes as a DTensor without "
                         f"an importance_exponents entry (the exponent of each element's block "
                         f"scale, as state_dict() gives)")
    _check_block_scales(codes, scales, name)
    return exponents_of(codes.detach(), scales.detach())


def _load_tensors(tensors, params: dict, where: str) -> dict[str, Tensor]:
    """Copies of ``tensors`` (by parameter name) in each parameter's dtype and layout; raises
    naming the entry unless each is a floating-point tensor shaped like its parameter."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{where} must be a dict of tensors by parameter name, got "
                        f"{type(tensors).__name__}")
    loaded = {}
    for name, t in tensors.items():
        p = params.get(name) if isinstance(name, str) else None
        if p is None:
            raise ValueError(f"{where} {name!r} matches no parameter of the model")
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{where} {name!r} must be a floating-point tensor, got {_kind(t)}")
        if t.shape != p.shape:
            raise ValueError(f"{where} {name!r} has shape {tuple(t.shape)}, its parameter "
                             f"{tuple(p.shape)}")
        out = like_param(t.detach().to(dtype=p.dtype), p)
        if local(out).untyped_storage().data_ptr() == local(t).untyped_storage().data_ptr():
            out = out.clone()
        loaded[name] = out
    return loaded


def _value_entries(importance: dict, anchor: dict, residual: dict, label: str) -> list:
    """(label, tensor, must be >= 0) for every entry of a state; ``label`` is formatted with
    the key and the parameter name."""
    return ([(label.format("importance", n), t, True) for n, t in importance.items()]
            + [(label.format("anchor", n), t, False) for n, t in anchor.items()]
            + [(label.format("residual", n), t, True) for n, t in residual.items()])


def _refuse_bad_values(entries: list, prefix: str, suffix: str, bad: tuple | None = None
                       ) -> None:
    """Raise ValueError for ``bad`` (a refusal found earlier: label, nonnegative, what is
    wrong) or else the first entry (label, tensor, nonnegative) whose values are not finite
    (or negative where they must not be); under FSDP2 on every rank of the mesh when any rank
    finds one, so all refuse together."""
    for label, t, nonnegative in entries if bad is None else ():
        detail = bad_values(local(t), nonnegative)
        if detail is not None:
            bad = (label, nonnegative, detail)
            break
    sharded = next((t for _, t, _ in entries if isinstance(t, DTensor)), None)
    if not any_over_mesh(bad is not None, sharded):
        return
    if bad is None:
        raise ValueError(f"{prefix}another rank's shard holds non-finite or negative values"
                         f"{suffix}")
    label, nonnegative, detail = bad
    expected = "finite and >= 0" if nonnegative else "finite"
    raise ValueError(f"{prefix}{label} must be {expected}, got {detail}{suffix}")


def _layout(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {local(t).device}"


def _kind(value) -> str:
    """What ``value`` is, for an error message."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
