"""Benchmarks (a stream plus its training protocol) and the train/evaluate loop over a stream."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field, replace
from statistics import fmean
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .methods import METHODS, Method, build_method
from .models import MODELS
from .streams import (FASHION_MNIST_DIR, Stream, Task, digits_dataset, domain_stream,
                      load_idx_dataset, permuted_stream, split_stream)

SCENARIOS = ("task", "class")
#: At most this many training examples of a finished task feed the regularizer's importance.
CONSOLIDATION_SAMPLES = 1024
EVAL_BATCH = 1024


@dataclass(frozen=True)
class Benchmark:
    """A task stream with its network and training protocol.

    ``epochs`` lists epochs per task (the last entry repeats). ``data_dirs`` names the IDX
    directories the stream reads (keys of the ``dirs`` mapping passed to ``build``).
    ``method_hparams`` overrides method defaults for this benchmark only.
    """

    name: str
    summary: str
    build: Callable[[int, Mapping[str, str]], Stream]
    model: str
    epochs: tuple[int, ...]
    batch_size: int
    default_methods: tuple[str, ...] = tuple(METHODS)
    data_dirs: tuple[str, ...] = ()
    method_hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _mnist_fashion(seed: int, dirs: Mapping[str, str]) -> Stream:
    return domain_stream("mnist-fashion", [replace(load_idx_dataset(dirs["mnist"]), name="mnist"),
                                           replace(load_idx_dataset(dirs["fashion"]),
                                                   name="fashion-mnist")])


#: The published vision schedule: MNIST without scaling (threshold 0.5), Fashion-MNIST with it.
PAPER_SCHEDULE = [{"apply_scaling": False, "threshold": 0.5},
                  {"apply_scaling": True, "threshold": 0.0}]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("split-digits", "8x8 digits, 5 tasks of 2 classes",
              lambda seed, dirs: split_stream(digits_dataset(seed), 5), "mlp", (5,), 32),
    Benchmark("permuted-digits", "8x8 digits, 5 tasks under fixed pixel permutations",
              lambda seed, dirs: permuted_stream(digits_dataset(seed), 5, seed), "mlp", (5,), 32),
    Benchmark("mnist-fashion", "MNIST then Fashion-MNIST (IDX directories), MLP",
              _mnist_fashion, "mlp", (1,), 32, data_dirs=("mnist", "fashion")),
    Benchmark("paper-vision", "the published vision run: CNN, MNIST 4 epochs then"
              " Fashion-MNIST 1 epoch, batch 32",
              _mnist_fashion, "cnn", (4, 1), 32,
              default_methods=("classp-legacy", "classp", "ewc", "sgd"),
              data_dirs=("mnist", "fashion"),
              method_hparams={
                  "classp-legacy": {"per_task": PAPER_SCHEDULE},
                  "classp": {"lr": 0.2, "per_task": [{"apply_scaling": False},
                                                     {"apply_scaling": True}]},
                  # lambda 5000 without the 1/2: EWC's penalty is (lam/2) sum F (theta - theta*)^2
                  "ewc": {"lr": 0.25, "lam": 10000.0},
                  "sgd": {"lr": 0.25},
              }),
)}

DEFAULT_DIRS = {"fashion": str(FASHION_MNIST_DIR)}


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


def train_task(model: nn.Module, method: Method, task: Task, mask: Optional[Tensor], epochs: int,
               batch_size: int, generator: torch.Generator, device) -> list[float]:
    """Train on one task; return the update fraction of each step (empty for non-CLASSP)."""
    model.train()
    fractions = []
    for _ in range(epochs):
        order = torch.randperm(len(task.x_train), generator=generator)
        for x, y in _batches(task.x_train, task.y_train, batch_size, order):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits if mask is None else logits + mask, y)
            method.optimizer.zero_grad()
            loss.backward()
            method.after_backward()
            method.optimizer.step()
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

    Result keys: ``acc_matrix`` (R[i][j]: accuracy on task j after training task i, all j),
    ``seconds`` (training, consolidation and evaluation wall time), ``peak_rss_delta_bytes``
    (growth of the process's peak RSS during the cell: 0 when an earlier cell peaked higher),
    ``state_bytes`` (optimizer plus regularizer state after the last task's consolidation) and
    ``update_density`` (per task, mean fraction of elements a CLASSP step updated, or None).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    torch.manual_seed(seed)
    model = MODELS[model_name](stream.input_shape, stream.num_classes).to(device)
    method = build_method(method_name, model, hparams)
    generator = torch.Generator().manual_seed(seed)
    masks = [_logit_mask(task, stream.num_classes, scenario, device) for task in stream.tasks]
    acc_matrix, density = [], []
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    for index, task in enumerate(stream.tasks):
        on_task(index)
        method.start_task(index)
        fractions = train_task(model, method, task, masks[index],
                               epochs[min(index, len(epochs) - 1)], batch_size, generator, device)
        density.append(fmean(fractions) if fractions else None)
        subset = torch.randperm(len(task.x_train), generator=generator)[:CONSOLIDATION_SAMPLES]
        method.end_task(list(_batches(task.x_train, task.y_train, batch_size, subset)))
        acc_matrix.append([evaluate(model, t, m, device) for t, m in zip(stream.tasks, masks)])
    return {"acc_matrix": acc_matrix,
            "seconds": time.perf_counter() - start,
            "peak_rss_delta_bytes": peak_rss_bytes() - rss_before,
            "state_bytes": method.state_bytes(),
            "update_density": density if any(d is not None for d in density) else None}
