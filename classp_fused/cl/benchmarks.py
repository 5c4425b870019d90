"""Benchmarks: a task stream with its network and training protocol, by name."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional

from .methods import METHODS
from .streams import (FASHION_MNIST_DIR, ImageDataset, Stream, digits_dataset, domain_stream,
                      load_idx_dataset, permuted_stream, split_stream, subsample_dataset,
                      subsample_stream)
from .text import sentiment_stream


@dataclass(frozen=True)
class Benchmark:
    """A task stream with its network and training protocol.

    ``build(seed, dirs)`` makes the stream; ``epochs`` lists epochs per task (the last entry
    repeats). ``data_dirs`` names the IDX directories the stream reads (keys of ``dirs``).
    ``method_hparams`` overrides method defaults for this benchmark only. ``permuted``
    streams show every task the same images, so ``stream`` subsamples those once, before
    permuting (cheaper, and the tasks differ only by their permutation).
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
    permuted: Optional[Callable[[int, Mapping[str, str]], ImageDataset]] = None

    def stream(self, seed: int, dirs: Mapping[str, str], max_per_task: Optional[int]) -> Stream:
        """The task stream of ``seed``, with at most ``max_per_task`` train and test examples."""
        if max_per_task is None:
            return self.build(seed, dirs)
        if self.permuted is not None:
            data = subsample_dataset(self.permuted(seed, dirs), max_per_task, max_per_task, seed)
            return permuted_stream(data, 5, seed)
        return subsample_stream(self.build(seed, dirs), max_per_task, max_per_task, seed)


def _mnist_fashion(seed: int, dirs: Mapping[str, str]) -> Stream:
    return domain_stream("mnist-fashion", [replace(load_idx_dataset(dirs["mnist"]), name="mnist"),
                                           replace(load_idx_dataset(dirs["fashion"]),
                                                   name="fashion-mnist")])


def _fashion(dirs: Mapping[str, str]):
    return replace(load_idx_dataset(dirs["fashion"]), name="fashion")


#: Picked by ``classp-fused tune`` (task-incremental, tuning seeds 1000 and 1001, 20%
#: validation; the runs behind docs/RESULTS.md, docs/results.sh). Methods without a grid keep
#: their defaults.
SPLIT_DIGITS_TUNED = {
    "sgd": {"lr": 0.05}, "adagrad": {"lr": 0.003},
    "classp": {"lr": 0.03, "threshold": 1e-4, "power": 1.0, "apply_scaling": True},
    "ewc": {"lr": 0.1, "lam": 1.0}, "online-ewc": {"lr": 0.1, "lam": 100.0},
    "mas": {"lr": 0.1, "lam": 1.0},
    "classp+mas": {"lr": 0.03, "threshold": 0.0, "power": 2.0, "apply_scaling": True,
                   "lam": 1.0}}
PERMUTED_DIGITS_TUNED = {
    "sgd": {"lr": 0.15}, "adagrad": {"lr": 0.05},
    "classp": {"lr": 0.1, "threshold": 0.0, "power": 1.0, "apply_scaling": True},
    "ewc": {"lr": 0.1, "lam": 1.0}, "online-ewc": {"lr": 0.1, "lam": 1.0},
    "mas": {"lr": 0.1, "lam": 0.1},
    "classp+mas": {"lr": 0.1, "threshold": 0.0, "power": 1.0, "apply_scaling": True,
                   "lam": 0.1}}

#: The published vision schedule: MNIST without scaling (threshold 0.5), Fashion-MNIST with it.
PAPER_SCHEDULE = [{"apply_scaling": False, "threshold": 0.5},
                  {"apply_scaling": True, "threshold": 0.0}]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("split-digits", "8x8 digits, 5 tasks of 2 classes",
              lambda seed, dirs: split_stream(digits_dataset(seed), 5), "mlp", (5,), 32,
              method_hparams=SPLIT_DIGITS_TUNED),
    Benchmark("permuted-digits", "8x8 digits, 5 tasks under fixed pixel permutations",
              lambda seed, dirs: permuted_stream(digits_dataset(seed), 5, seed), "mlp", (5,), 32,
              method_hparams=PERMUTED_DIGITS_TUNED,
              permuted=lambda seed, dirs: digits_dataset(seed)),
    Benchmark("split-fashion", "Fashion-MNIST, 5 tasks of 2 classes, MLP",
              lambda seed, dirs: split_stream(_fashion(dirs), 5), "mlp", (1,), 32,
              data_dirs=("fashion",)),
    Benchmark("permuted-fashion", "Fashion-MNIST, 5 tasks under fixed pixel permutations, MLP",
              lambda seed, dirs: permuted_stream(_fashion(dirs), 5, seed), "mlp", (1,), 32,
              data_dirs=("fashion",), permuted=lambda seed, dirs: _fashion(dirs)),
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
    Benchmark("synthetic-sentiment", "generated sentiment-like text (classp_fused.cl.text),"
              " 5 domains of 2 classes over one vocabulary, small transformer encoder",
              lambda seed, dirs: sentiment_stream(seed), "transformer", (5,), 32),
)}

#: Data directories found without options: Debian's dataset-fashion-mnist.
DEFAULT_DIRS = {"fashion": str(FASHION_MNIST_DIR)}
