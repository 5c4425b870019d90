"""Consolidated state of a regularizer: importance, anchor and residual per parameter.

Every method keeps, per regularized parameter, an importance Omega and an anchor m such that
its penalty is ``scale * (sum Omega * (theta - m)^2 + residual)``; the residual is a float64
scalar per parameter, zero except for EWC in separate mode. That form holds any number of
tasks in constant memory: for quadratics, a*(x - p)^2 + b*(x - q)^2 =
(a + b) * (x - (a*p + b*q)/(a + b))^2 + a*b/(a + b) * (p - q)^2.

``TaskState`` is mixed into ``Regularizer``; it uses ``self.model`` and the subclass's
``_merge``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .shards import DTensor, Shard, like_param, local, match_shard, wrap_like


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
        """(params, local importances, local anchors, residuals) for params requiring grad."""
        params, imps, anchors, residuals = [], [], [], []
        for name, p in self.model.named_parameters():
            if name in self._importance and p.requires_grad:
                params.append(p)
                imps.append(local(match_shard(self._importance, name, p)))
                anchors.append(local(match_shard(self._anchor, name, p)))
                residuals.append(self._residual.get(name))
        return params, imps, anchors, residuals

    def _enter_task(self, new: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Fold a finished task's importance ``new`` and anchor into the state, all or nothing.

        Tensors may be plain or DTensors (then the merge runs on local shards and residual
        increments are summed over the mesh).
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
        residual = dict(self._residual)
        if self._folds_tasks_exactly():  # a residual from the first task on: constant bytes
            for name in new:
                residual.setdefault(name, torch.zeros((), dtype=torch.float64))
        if increments:
            sums = torch.stack([increments[n].to(torch.float64) for n in increments])
            sums = _sum_over_mesh(sums, next(iter(new.values())))
            for name, s in zip(increments, sums):
                residual[name] = residual[name] + s.cpu()
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
        float64 scalars, equal on every rank.
        """
        params = dict(self.model.named_parameters())
        for name in self._importance:
            match_shard(self._importance, name, params[name])
            match_shard(self._anchor, name, params[name])
        state = {"method": self._method_name(), "tasks_seen": self.tasks_seen,
                 "importance": dict(self._importance), "anchor": dict(self._anchor),
                 "residual": dict(self._residual)}
        if self.task_importances is not None:
            state["task_importances"] = [dict(task) for task in self.task_importances]
        return state

    def empty_state_dict(self) -> dict:
        """A template shaped like ``state_dict()`` after a consolidate, zeros laid out like the
        parameters (DTensors under FSDP2): what ``torch.distributed.checkpoint.load`` loads
        into before ``load_state_dict``. Per-task importances are not part of it."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            state = {"method": self._method_name(), "tasks_seen": 0,
                     "importance": {n: torch.zeros_like(p) for n, p in params.items()},
                     "anchor": {n: torch.zeros_like(p) for n, p in params.items()},
                     "residual": {n: torch.zeros((), dtype=torch.float64) for n in params}
                     if self._folds_tasks_exactly() else {}}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; hyperparameters stay the constructor's.

        Entries are full-shaped plain tensors (a single-process ``torch.save``) or DTensors
        (torch.distributed.checkpoint); each is re-laid out like its parameter. The per-task
        form of earlier versions (``{"tasks": [{"importance", "anchor"}, ...]}``) is folded
        task by task into the constant-memory form. Everything is checked before anything
        changes: every importance needs an anchor and a parameter of the same shape.
        """
        params = dict(self.model.named_parameters())
        if "tasks" in state and state.get("method") == type(self).__name__:
            if len(state["tasks"]) > 1 and not self._folds_tasks_exactly():
                raise ValueError(f"{self._method_name()} keeps one task, the state has "
                                 f"{len(state['tasks'])}")
            self._load_per_task([self._load_tensors(t, params) for t in state["tasks"]])
            return
        if state.get("method") != self._method_name():
            raise ValueError(f"state is for {state.get('method')!r}, not {self._method_name()}")
        importance, anchor = self._load_tensors(state, params)
        residual = {}
        for name, t in state.get("residual", {}).items():
            if name not in importance or t.dim() != 0:
                raise ValueError(f"state residual {name!r} must be a scalar of a regularized "
                                 "parameter")
            residual[name] = local(t).detach().to("cpu", torch.float64, copy=True)
        kept = None
        if self.task_importances is not None:
            kept = [self._load_tensors({"importance": t, "anchor": t}, params)[0]
                    for t in state.get("task_importances", [])]
        self._importance, self._anchor, self._residual = importance, anchor, residual
        self.tasks_seen = int(state.get("tasks_seen", 1 if importance else 0))
        self.task_importances = kept

    def _load_per_task(self, tasks: list[tuple[dict, dict]]) -> None:
        """Fold checked per-task (importance, anchor) pairs into a fresh state."""
        saved = dict(vars(self))
        self._reset_state(self.task_importances is not None)
        try:
            for importance, anchor in tasks:
                self._enter_task(importance, anchor)
        except BaseException:
            vars(self).update(saved)
            raise

    def _load_tensors(self, state: dict, params: dict) -> tuple[dict, dict]:
        """The ``importance`` and ``anchor`` dicts of ``state``, checked and laid out."""
        missing = set(state["importance"]) ^ set(state["anchor"])
        if missing:
            raise ValueError(f"state has importance and anchor for different parameters: "
                             f"{sorted(missing)} lack their pair")
        loaded = []
        for key in ("importance", "anchor"):
            tensors = {}
            for name, t in state[key].items():
                p = params.get(name)
                if p is None or t.shape != p.shape:
                    raise ValueError(f"state {key} {name!r} matches no parameter of the model")
                tensors[name] = like_param(t.to(dtype=p.dtype), p)
            loaded.append(tensors)
        return tuple(loaded)

    def _method_name(self) -> str:
        return type(self).__name__

    def _folds_tasks_exactly(self) -> bool:
        """Whether several per-task states fold into this method's state without loss."""
        return False


def _sum_over_mesh(t: Tensor, like: Tensor) -> Tensor:
    """``t`` summed over the mesh dims that shard ``like`` when it is a DTensor, else ``t``."""
    if isinstance(like, DTensor):
        for dim, placement in enumerate(like.placements):
            if isinstance(placement, Shard):
                dist.all_reduce(t, group=like.device_mesh.get_group(dim))
    return t
