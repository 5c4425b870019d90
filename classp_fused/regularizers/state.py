"""Task state of a regularizer: importance and anchor per remembered task, state dicts.

``TaskState`` is mixed into ``Regularizer``; it uses ``self.model`` and ``self.tasks``.
"""
from __future__ import annotations

from torch import Tensor

from .shards import like_param, local, match_shard

# One remembered task: (importance, anchor), each a dict parameter name -> tensor.
Task = tuple


class TaskState:
    """The remembered tasks and their (de)serialisation."""

    def _terms(self, task: Task) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, importances, anchors) of one task for the params that require grad."""
        importance, anchor = task
        params, imps, anchors = [], [], []
        for name, p in self.model.named_parameters():
            if name in importance and p.requires_grad:
                params.append(p)
                imps.append(local(match_shard(importance, name, p)))
                anchors.append(local(match_shard(anchor, name, p)))
        return params, imps, anchors

    @property
    def importance(self) -> dict[str, Tensor]:
        """Importance per parameter name; for several remembered tasks, their elementwise sum.

        Under FSDP2 an entry is a DTensor once the state has been laid out like its parameter.
        """
        if len(self.tasks) == 1:
            return dict(self.tasks[0][0])
        total: dict[str, Tensor] = {}
        for importance, _ in self.tasks:
            for name, t in importance.items():
                total[name] = total[name] + t if name in total else t.clone()
        return total

    def state_bytes(self) -> int:
        """Bytes this rank keeps: importance and anchor of every remembered task."""
        return sum(local(t).numel() * t.element_size()
                   for task in self.tasks for state in task for t in state.values())

    def state_dict(self) -> dict:
        """Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it.

        For a DTensor parameter (FSDP2) the entries are DTensors with its mesh and placements,
        as torch.distributed.checkpoint needs; the returned tensors are the state itself, so
        ``dcp.load`` into them loads in place.
        """
        params = dict(self.model.named_parameters())
        for task in self.tasks:
            for state in task:
                for name in state:
                    match_shard(state, name, params[name])
        return {"method": type(self).__name__,
                "tasks": [{"importance": dict(imp), "anchor": dict(anchor)}
                          for imp, anchor in self.tasks]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the tasks of ``state_dict()``; hyperparameters stay the constructor's.

        Entries are full-shaped plain tensors (a single-process ``torch.save``) or DTensors
        (torch.distributed.checkpoint); each is re-laid out like its parameter.
        """
        if state.get("method") != type(self).__name__:
            raise ValueError(f"state is for {state.get('method')!r}, not {type(self).__name__}")
        params = dict(self.model.named_parameters())
        tasks = []
        for task in state["tasks"]:
            pair = []
            for key in ("importance", "anchor"):
                tensors = {}
                for name, t in task[key].items():
                    p = params.get(name)
                    if p is None or t.shape != p.shape:
                        raise ValueError(f"state {key} {name!r} matches no parameter of the model")
                    tensors[name] = like_param(t.to(dtype=p.dtype), p)
                pair.append(tensors)
            tasks.append(tuple(pair))
        self._check_task_count(len(tasks))
        self.tasks = tasks

    def _check_task_count(self, n: int) -> None:
        """Methods that keep one combined task reject states with more."""
        if n > 1:
            raise ValueError(f"{type(self).__name__} keeps one task, the state has {n}")
