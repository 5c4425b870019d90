"""Continual-learning harness: task streams, models, methods, training loop, metrics, reports."""
from .methods import METHODS, Method, build_method, resolve_hparams
from .metrics import average_accuracy, backward_transfer, forgetting, sequence_metrics
from .streams import Stream, Task, read_idx
from .train import BENCHMARKS, Benchmark, run_cell

__all__ = ["BENCHMARKS", "METHODS", "Benchmark", "Method", "Stream", "Task", "average_accuracy",
           "backward_transfer", "build_method", "forgetting", "read_idx", "resolve_hparams",
           "run_cell", "sequence_metrics"]
