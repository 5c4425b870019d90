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

``TaskState`` is mixed into ``Regularizer``; it uses ``self.model``, ``self.normalize`` and
the subclass's ``_merge``.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from .checks import bad_values
from .shards import (DTensor, any_over_mesh, like_param, local, match_shard, sum_over_mesh,
                     wrap_like)


class TaskState:
    """The consolidated state and its (de)serialisation.

    Attributes: ``tasks_seen`` (task boundaries consolidated), ``task_importances`` (a list of
    per-task importance dicts when the method was asked to keep them, else None).
    """

    def _reset_state(self, keep_task_importances: bool) -> None:
        self._importance: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}
        self._residual: dict[str, Tensor] = {}
        self.tasks_seen = 0
        self.task_importances: list[dict[str, Tensor]] | None = (
            [] if keep_task_importances else None)

    @property
    def importance(self) -> dict[str, Tensor]:
        """Importance per parameter name (for EWC separate, the sum over tasks of F_t).

        Under FSDP2 an entry is a DTensor once the state has been laid out like its parameter.
        """
        return dict(self._importance)

    @property
    def anchor(self) -> dict[str, Tensor]:
        """Anchor per parameter name: theta* of the latest task, or for EWC separate the
        importance-weighted mean sum_t F_t theta*_t / sum_t F_t (theta*_latest where that sum
        is zero)."""
        return dict(self._anchor)

    def _terms(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(params, local importances, local anchors, residuals) for params requiring grad.

        Raises ValueError naming the first parameter that no longer fits its state."""
        params, imps, anchors, residuals = [], [], [], []
        for name, p in self.model.named_parameters():
            if name in self._importance and p.requires_grad:
                imps.append(self._fitting(self._importance, name, p, "importance"))
                anchors.append(self._fitting(self._anchor, name, p, "anchor"))
                params.append(p)
                residuals.append(self._residual.get(name))
        return params, imps, anchors, residuals

    def _check_fits(self, params: dict[str, Tensor]) -> None:
        """Raise ValueError naming the first of ``params`` that no longer fits its state."""
        for name, p in params.items():
            if name in self._importance:
                self._fitting(self._importance, name, p, "importance")
                self._fitting(self._anchor, name, p, "anchor")

    @staticmethod
    def _fitting(state: dict[str, Tensor], name: str, p: Tensor, key: str) -> Tensor:
        """The local tensor of ``state[name]`` laid out like ``p`` (``match_shard``); a
        ValueError naming the parameter when its shape, dtype or device changed since."""
        t = state[name]
        if not isinstance(p, DTensor) and not isinstance(t, DTensor):  # plain: the per-step case
            if t.shape == p.shape and t.dtype == p.dtype and t.device == p.device:
                return t
        elif t.shape == p.shape and t.dtype == p.dtype:
            t = local(match_shard(state, name, p))
            if t.device == local(p).device and t.shape == local(p).shape:
                return t
        hint = ("load a state for this model or build a new regularizer" if t.shape != p.shape
                else "reg.load_state_dict(reg.state_dict()) moves the state to the parameter's "
                     "dtype and device")
        raise ValueError(
            f"parameter {name!r} ({_layout(p)}) no longer fits its {key} ({_layout(t)}): the "
            f"model changed after the state was consolidated or loaded; {hint}")

    def _enter_task(self, new: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Fold a finished task's importance ``new`` and anchor into the state, all or nothing.

        Tensors may be plain or DTensors (then the merge runs on local shards and residual
        increments are summed over the mesh). A parameter with state but no entry in ``new``
        (frozen during the task: it had no gradient) keeps its anchor and residual, and its
        importance is the method's merge with a zero new importance (unchanged for MAS "sum"
        and EWC separate, times alpha for MAS "ema", times gamma for online EWC), exactly as
        for a parameter the task did not touch. The merged state is checked (finite,
        importance and residual >= 0) before it replaces the old one; ValueError naming the
        parameter if not.
        """
        importance, anchors, increments = {}, {}, {}
        for name, imp in new.items():
            if name in self._importance:
                old_imp = match_shard(self._importance, name, imp)
                old_anchor = match_shard(self._anchor, name, imp)
                merged = self._merge(local(old_imp), local(old_anchor),
                                     local(imp), local(anchor[name]))
                importance[name] = wrap_like(merged[0], imp)
                anchors[name] = wrap_like(merged[1], imp)
                if merged[2] is not None:
                    increments[name] = merged[2]
            else:
                importance[name], anchors[name] = imp, anchor[name]
        for name, old_imp in self._importance.items():
            if name not in new:
                old, kept_anchor = local(old_imp), local(self._anchor[name])
                carried = self._merge(old, kept_anchor, torch.zeros_like(old), kept_anchor)[0]
                importance[name] = wrap_like(carried, old_imp)
                anchors[name] = self._anchor[name]
        residual = dict(self._residual)
        if self._folds_tasks_exactly():  # a residual from the first task on: constant bytes
            for name in new:
                residual.setdefault(name, torch.zeros((), dtype=torch.float64))
        if increments:
            sums = torch.stack([increments[n].to(torch.float64) for n in increments])
            sums = sum_over_mesh(sums, next(iter(new.values())))
            for name, s in zip(increments, sums):
                residual[name] = residual[name] + s.cpu()
        entries = _value_entries(importance, anchors, residual, "{} of {!r} after this task")
        _refuse_bad_values(entries, "consolidate: ", "; the state is left as it was")
        self._importance, self._anchor, self._residual = importance, anchors, residual
        self.tasks_seen += 1
        if self.task_importances is not None:
            self.task_importances.append(dict(new))

    def state_bytes(self) -> int:
        """Bytes this rank keeps: importance, anchor and residual per parameter, plus the
        per-task importances when kept. Independent of the task count otherwise."""
        tensors = [*self._importance.values(), *self._anchor.values(), *self._residual.values()]
        for task in self.task_importances or []:
            tensors.extend(task.values())
        return sum(local(t).numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict:
        """Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it.

        For a DTensor parameter (FSDP2) the importance and anchor entries are DTensors with its
        mesh and placements, as torch.distributed.checkpoint needs; the returned tensors are
        the state itself, so ``dcp.load`` into them loads in place. Residuals are plain
        float64 scalars, equal on every rank. Entries of frozen parameters are included: the
        state always loads back into this regularizer.
        """
        params = dict(self.model.named_parameters())
        for name in self._importance:
            p = params.get(name)
            if p is not None and p.shape == self._importance[name].shape:
                match_shard(self._importance, name, p)
                match_shard(self._anchor, name, p)
        state = {"method": self._method_name(), "normalize": self.normalize,
                 "tasks_seen": self.tasks_seen, "importance": dict(self._importance),
                 "anchor": dict(self._anchor), "residual": dict(self._residual)}
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
        with torch.no_grad():
            state = {"method": self._method_name(), "normalize": self.normalize,
                     "tasks_seen": 0,
                     "importance": {n: torch.zeros_like(p) for n, p in params.items()},
                     "anchor": {n: torch.zeros_like(p) for n, p in params.items()},
                     "residual": {n: torch.zeros((), dtype=torch.float64) for n in params}
                     if self._folds_tasks_exactly() else {}}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()``; hyperparameters stay the constructor's.

        Entries are full-shaped plain tensors (a single-process ``torch.save``) or DTensors
        (torch.distributed.checkpoint); each is copied and re-laid out like its parameter
        (frozen or not). The per-task form of earlier versions (``{"tasks": [{"importance",
        "anchor"}, ...]}``) is folded task by task into the constant-memory form.

        Everything is checked before anything changes; each refusal names the entry and what
        it expected: importance and anchor for the same parameters, floating-point tensors
        of their parameter's shape; importances (also per task) and residuals finite and
        >= 0, anchors finite, in the parameter's dtype; residuals scalars, only for
        EWC-separate; ``tasks_seen`` an int >= 0; ``normalize`` (absent: ``"none"``, as
        states of earlier versions) this regularizer's, since it sets the importance's units.
        Under FSDP2 every rank refuses together.
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
        importance, anchor = self._load_pair(state, params, "state")
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
        entries = _value_entries(importance, anchor, residual, "state {} {!r}")
        for i, task in enumerate(kept or []):
            entries += [(f"state task_importances[{i}] {name!r}", t, True)
                        for name, t in task.items()]
        _refuse_bad_values(entries, "", "")
        self._importance, self._anchor, self._residual = importance, anchor, residual
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
        """The checked and laid out ``importance`` and ``anchor`` dicts of ``state``."""
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
        return (_load_tensors(state["importance"], params, f"{where} importance"),
                _load_tensors(state["anchor"], params, f"{where} anchor"))

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


def _refuse_bad_values(entries: list, prefix: str, suffix: str) -> None:
    """Raise ValueError for the first entry (label, tensor, nonnegative) whose values are not
    finite (or negative where they must not be); under FSDP2 on every rank of the mesh when
    any rank finds one, so all refuse together."""
    bad = None
    for label, t, nonnegative in entries:
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
