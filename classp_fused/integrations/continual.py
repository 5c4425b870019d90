"""A task sequence around a regularizer, as framework callbacks drive it.

``ContinualRun`` attaches the regularizer to each task's optimizer (every optimizer step then
applies the penalty: inside CLASSP's step kernel, through step hooks for other optimizers),
records the largest lr each param group steps with during the task, consolidates the
regularizer at the end of each task on the data the user names (checking the penalty's
stability at that lr), carries the optimizer's per-parameter state (CLASSP's accumulators)
from one task's optimizer to the next one's, and saves all of it as one state dict for the
framework's checkpoints.
"""
from __future__ import annotations

import math
from collections import abc
from typing import Any, Callable, Iterable, Optional, Union

import torch

from ..backends.step_spec import PENALTY_FORMS
from ..regularizers import Regularizer
from ..regularizers.batches import Forward, Labels, check_forward_and_labels
from ..regularizers.checks import check_choice

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
        penalty: ``"explicit"`` or ``"proximal"`` sets the regularizer's ``penalty_form`` (the
            form its optimizer steps apply); None keeps the regularizer's own (its
            ``penalty=`` argument, default explicit).

    Attributes: ``tasks_done``; ``task_lrs``, per param group the largest lr the current
    task's optimizer has stepped with so far (None before its first step). The stability
    check at the end of a task uses these: the explicit step diverges at the peak of a
    warm-up and decay schedule, while the lr left at the end of the task is about 0.
    """

    def __init__(self, regularizer: Optional[Regularizer] = None, data: TaskData = None,
                 forward: Optional[Forward] = None, labels: Labels = None,
                 carry_optimizer_state: bool = True, penalty: Optional[str] = None):
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise TypeError("regularizer must be a classp_fused Regularizer (MAS, EWC) or None, "
                            f"got {type(regularizer).__name__}")
        check_forward_and_labels(forward, labels)
        if data is not None and not (callable(data) or isinstance(data, abc.Iterable)):
            raise TypeError("data must be batches (an iterable), a callable task index -> "
                            f"batches, or None, got {type(data).__name__}")
        if penalty is not None:
            check_choice("penalty", penalty, PENALTY_FORMS)
            if regularizer is None:
                raise ValueError(f"penalty={penalty!r} needs a regularizer")
            regularizer.penalty_form = penalty
        self.regularizer = regularizer
        self.data = data
        self.forward = forward
        self.labels = labels
        self.carry_optimizer_state = bool(carry_optimizer_state)
        self.tasks_done = 0
        self.optimizer_state: Optional[dict] = None
        self.task_lrs: Optional[list[float]] = None
        self._lr_recorder: Optional[tuple] = None  # (optimizer, hook handle)

    def begin_task(self, optimizer) -> None:
        """Give a new task's optimizer the carried state if it starts without any, attach the
        regularizer to it (``Regularizer.attach``: its steps apply the penalty in the
        regularizer's ``penalty_form``; nothing before the first consolidation) and record
        the lr of each of its steps (``task_lrs``)."""
        optimizer = unwrap_optimizer(optimizer)
        if self.task_lrs is not None and len(self.task_lrs) != len(optimizer.param_groups):
            raise ValueError(f"the recorded lrs of this task are for {len(self.task_lrs)} param "
                             f"group(s), the optimizer has {len(optimizer.param_groups)}: "
                             "resume with the optimizer the task started with")
        if self.carry_optimizer_state and self.optimizer_state is not None and not optimizer.state:
            self._load_carried_state(optimizer)
        if self.regularizer is not None and self.regularizer.attached_to is not optimizer:
            self.regularizer.detach()
            self.regularizer.attach(optimizer)
        if self._lr_recorder is None or self._lr_recorder[0] is not optimizer:
            self._stop_recording()
            self._lr_recorder = (optimizer, optimizer.register_step_pre_hook(self._record_lrs))

    def _record_lrs(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: keep, per param group, the largest lr seen (one float per group)."""
        seen = self.task_lrs or []
        self.task_lrs = [max(float(group["lr"]), seen[i]) if i < len(seen) else float(group["lr"])
                         for i, group in enumerate(optimizer.param_groups)]

    def _stop_recording(self) -> None:
        if self._lr_recorder is not None:
            self._lr_recorder[1].remove()
            self._lr_recorder = None

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
        the regularizer from the task's optimizer.

        ``consolidate`` gets the optimizer and ``task_lrs`` (the groups' current lrs if the
        task took no step), so a ``StiffnessWarning`` says when the next task's steps at
        this task's largest lr would make the explicit penalty diverge (or, in the proximal
        form, freeze the stiffest elements)."""
        optimizer = unwrap_optimizer(optimizer)
        if self.regularizer is not None:
            data = self.data(self.tasks_done) if callable(self.data) else self.data
            if data is None:
                data = training_data
            if data is None:
                raise ValueError("no consolidation data: give the callback data= (batches or "
                                 "a callable task index -> batches)")
            self.regularizer.consolidate(data, forward=self.forward, labels=self.labels,
                                         optimizer=optimizer, lr=self.task_lrs)
        if self.carry_optimizer_state:
            self.optimizer_state = optimizer.state_dict()["state"]
        if self.regularizer is not None:
            self.regularizer.detach()
        self._stop_recording()
        self.task_lrs = None
        self.tasks_done += 1

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
        return {"tasks_done": self.tasks_done,
                "regularizer": None if self.regularizer is None else self.regularizer.state_dict(),
                "optimizer_state": self.optimizer_state, "task_lrs": self.task_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; checks everything before changing anything. A state
        without ``task_lrs`` (earlier versions) restores none."""
        missing = {"tasks_done", "regularizer", "optimizer_state"} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}: not a ContinualRun state")
        if (state["regularizer"] is None) != (self.regularizer is None):
            raise ValueError("state and run disagree on having a regularizer")
        tasks_done = int(state["tasks_done"])
        task_lrs = state.get("task_lrs")
        if task_lrs is not None and not (
                isinstance(task_lrs, (list, tuple)) and all(
                    isinstance(lr, (int, float)) and not isinstance(lr, bool)
                    and math.isfinite(lr) and lr >= 0 for lr in task_lrs)):
            raise ValueError(f"state task_lrs must be None or a list of finite lrs >= 0, got "
                             f"{task_lrs!r}")
        if self.regularizer is not None:
            self.regularizer.load_state_dict(state["regularizer"])  # all or nothing itself
        self.tasks_done = tasks_done
        self.optimizer_state = state["optimizer_state"]
        self.task_lrs = None if task_lrs is None else [float(lr) for lr in task_lrs]
