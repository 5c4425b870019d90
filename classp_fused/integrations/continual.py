"""A task sequence around a regularizer, as framework callbacks drive it.

``ContinualRun`` attaches the regularizer to each task's optimizer (every optimizer step then
applies the penalty: inside CLASSP's step kernel, through step hooks for other optimizers),
consolidates it at the end of each task on the data the user names, carries the optimizer's
per-parameter state (CLASSP's accumulators) from one task's optimizer to the next one's, and
saves all of it as one state dict for the framework's checkpoints.
"""
from __future__ import annotations

from collections import abc
from typing import Any, Callable, Iterable, Optional, Union

import torch

from ..regularizers import Regularizer
from ..regularizers.batches import Forward, Labels, check_forward_and_labels

# Consolidation data: batches, or a callable task index -> batches.
TaskData = Union[None, Iterable, Callable[[int], Iterable]]


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer), or ``optimizer`` itself."""
    inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    if inner is not None:
        return unwrap_optimizer(inner)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class ContinualRun:
    """The state of a task sequence: the regularizer, finished tasks and carried optimizer state.

    Args:
        regularizer: a MAS or EWC instance on the model being trained, or None (then the run
            only carries optimizer state across tasks).
        data: consolidation batches, or a callable ``data(task_index)`` returning them; None
            lets the framework's training data of the task be used.
        forward, labels: passed to ``regularizer.consolidate``.
        carry_optimizer_state: load the previous task's per-parameter optimizer state into a
            new task's optimizer when that one starts empty (a new Trainer per task).
    """

    def __init__(self, regularizer: Optional[Regularizer] = None, data: TaskData = None,
                 forward: Optional[Forward] = None, labels: Labels = None,
                 carry_optimizer_state: bool = True):
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise TypeError("regularizer must be a classp_fused Regularizer (MAS, EWC) or None, "
                            f"got {type(regularizer).__name__}")
        check_forward_and_labels(forward, labels)
        if data is not None and not (callable(data) or isinstance(data, abc.Iterable)):
            raise TypeError("data must be batches (an iterable), a callable task index -> "
                            f"batches, or None, got {type(data).__name__}")
        self.regularizer = regularizer
        self.data = data
        self.forward = forward
        self.labels = labels
        self.carry_optimizer_state = bool(carry_optimizer_state)
        self.tasks_done = 0
        self.optimizer_state: Optional[dict] = None

    def begin_task(self, optimizer) -> None:
        """Give a new task's optimizer the carried state if it starts without any, and attach
        the regularizer to it (``Regularizer.attach``: its steps apply the penalty in the
        regularizer's ``penalty_form``; nothing before the first consolidation)."""
        optimizer = unwrap_optimizer(optimizer)
        if self.carry_optimizer_state and self.optimizer_state is not None and not optimizer.state:
            self._load_carried_state(optimizer)
        if self.regularizer is not None and self.regularizer.attached_to is not optimizer:
            self.regularizer.detach()
            self.regularizer.attach(optimizer)

    def _load_carried_state(self, optimizer: torch.optim.Optimizer) -> None:
        state_dict = optimizer.state_dict()
        count = sum(len(group["params"]) for group in state_dict["param_groups"])
        if any(not isinstance(i, int) or i >= count for i in self.optimizer_state):
            raise ValueError(f"the carried optimizer state is for other parameters than the "
                             f"new optimizer's {count}: build it on the same model, same order")
        state_dict["state"] = self.optimizer_state
        optimizer.load_state_dict(state_dict)

    def end_task(self, optimizer, training_data: Optional[Iterable] = None) -> None:
        """Consolidate on the task's data, keep the optimizer's per-parameter state and detach
        the regularizer from the task's optimizer."""
        optimizer = unwrap_optimizer(optimizer)
        if self.regularizer is not None:
            data = self.data(self.tasks_done) if callable(self.data) else self.data
            if data is None:
                data = training_data
            if data is None:
                raise ValueError("no consolidation data: give the callback data= (batches or "
                                 "a callable task index -> batches)")
            self.regularizer.consolidate(data, forward=self.forward, labels=self.labels)
        if self.carry_optimizer_state:
            self.optimizer_state = optimizer.state_dict()["state"]
        if self.regularizer is not None:
            self.regularizer.detach()
        self.tasks_done += 1

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
        return {"tasks_done": self.tasks_done,
                "regularizer": None if self.regularizer is None else self.regularizer.state_dict(),
                "optimizer_state": self.optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; checks everything before changing anything."""
        missing = {"tasks_done", "regularizer", "optimizer_state"} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}: not a ContinualRun state")
        if (state["regularizer"] is None) != (self.regularizer is None):
            raise ValueError("state and run disagree on having a regularizer")
        tasks_done = int(state["tasks_done"])
        if self.regularizer is not None:
            self.regularizer.load_state_dict(state["regularizer"])  # all or nothing itself
        self.tasks_done = tasks_done
        self.optimizer_state = state["optimizer_state"]
