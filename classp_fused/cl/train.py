"""The train/evaluate loop of one method over one task stream, stopping at divergence."""
from __future__ import annotations

import math
import resource
import sys
import time
from statistics import fmean
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .methods import Method, build_method
from .models import build_model
from .streams import Stream, Task

SCENARIOS = ("task", "class")
#: At most this many training examples of a finished task feed the regularizer's importance.
CONSOLIDATION_SAMPLES = 1024
EVAL_BATCH = 1024


def _batches(x: Tensor, y: Tensor, size: int, order: Optional[Tensor] = None):
    """(x, y) batches of ``size`` over the examples ``order`` lists (default: all, in order)."""
    order = torch.arange(len(x)) if order is None else order
    for start in range(0, len(order), size):
        index = order[start:start + size]
        yield x[index], y[index]


def _logit_mask(task: Task, num_classes: int, scenario: str, device) -> Optional[Tensor]:
    """0 on the task's classes, -inf elsewhere (task-incremental); None for a shared head."""
    if scenario == "class" or len(task.classes) == num_classes:
        return None
    mask = torch.full((num_classes,), float("-inf"), device=device)
    mask[list(task.classes)] = 0.0
    return mask


class Diverged(Exception):
    """Training met a non-finite loss or parameter at (task, epoch, step), all 0-based."""

    def __init__(self, task: int, epoch: int, step: int, what: str):
        super().__init__(f"non-finite {what} at task {task}, epoch {epoch}, step {step}")
        self.where = {"task": task, "epoch": epoch, "step": step, "what": what}


def _finite(params: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def train_task(model: nn.Module, method: Method, task: Task, mask: Optional[Tensor], epochs: int,
               batch_size: int, generator: torch.Generator, device, index: int = 0) -> list[float]:
    """Train on task number ``index``; return the update fraction of each step (CLASSP only).

    Raises Diverged at the first non-finite loss (before it is applied) or parameter (after
    the step that produced it).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fractions = []
    for epoch in range(epochs):
        order = torch.randperm(len(task.x_train), generator=generator)
        for step, (x, y) in enumerate(_batches(task.x_train, task.y_train, batch_size, order)):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits if mask is None else logits + mask, y)
            if not math.isfinite(loss.item()):
                raise Diverged(index, epoch, step, "loss")
            method.optimizer.zero_grad()
            loss.backward()
            method.optimizer.step()  # with the attached regularizer's penalty
            if not _finite(params):
                raise Diverged(index, epoch, step, "parameter")
            fraction = method.update_fraction()
            if fraction is not None:
                fractions.append(fraction)
    return fractions


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, mask: Optional[Tensor], device) -> float:
    """Accuracy on the task's held-out test split, in eval() mode."""
    model.eval()
    correct = 0
    for x, y in _batches(task.x_test, task.y_test, EVAL_BATCH):
        logits = model(x.to(device))
        predicted = (logits if mask is None else logits + mask).argmax(dim=1)
        correct += int((predicted == y.to(device)).sum())
    return correct / len(task.x_test)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_cell(stream: Stream, model_name: str, method_name: str, hparams: Mapping[str, Any],
             seed: int, epochs: Sequence[int], batch_size: int, scenario: str,
             device: str = "cpu", on_task: Callable[[int], None] = lambda index: None) -> dict:
    """Train ``method_name`` through ``stream`` from a fresh seeded network; return raw results.

    Result keys: ``acc_matrix`` (R[i][j]: accuracy on task j after training task i, all j;
    only the rows of finished tasks if the cell diverged), ``diverged`` (None, or the task,
    epoch, step and what was non-finite), ``seconds`` (wall time of training, consolidation
    and evaluation), ``cpu_seconds`` (process CPU time over the same span, all threads),
    ``unstable_tasks`` (tasks after which the explicit penalty step was unstable: stiffness
    times step size >= 2; see Method.end_task), ``peak_rss_delta_bytes`` (growth of the
    process's peak RSS during the cell: 0 when an earlier cell peaked higher), ``state_bytes``
    (optimizer plus regularizer state at the end) and ``update_density`` (per finished task,
    mean fraction of elements a CLASSP step updated, or None).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    torch.manual_seed(seed)
    model = build_model(model_name, stream).to(device)
    method = build_method(method_name, model, hparams)
    generator = torch.Generator().manual_seed(seed)
    masks = [_logit_mask(task, stream.num_classes, scenario, device) for task in stream.tasks]
    acc_matrix, density, unstable, diverged = [], [], [], None
    rss_before = peak_rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    for index, task in enumerate(stream.tasks):
        on_task(index)
        method.start_task(index)
        try:
            fractions = train_task(model, method, task, masks[index],
                                   epochs[min(index, len(epochs) - 1)], batch_size, generator,
                                   device, index)
        except Diverged as exc:
            diverged = exc.where
            break
        density.append(fmean(fractions) if fractions else None)
        subset = torch.randperm(len(task.x_train), generator=generator)[:CONSOLIDATION_SAMPLES]
        if method.end_task(list(_batches(task.x_train, task.y_train, batch_size, subset))):
            unstable.append(index)
        acc_matrix.append([evaluate(model, t, m, device) for t, m in zip(stream.tasks, masks)])
    return {"acc_matrix": acc_matrix,
            "diverged": diverged,
            "unstable_tasks": unstable,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
            "peak_rss_delta_bytes": peak_rss_bytes() - rss_before,
            "state_bytes": method.state_bytes(),
            "update_density": density if any(d is not None for d in density) else None}
