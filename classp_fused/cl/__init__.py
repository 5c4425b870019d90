"""Continual-learning harness: task streams, models, methods, training loop, metrics, reports.

``run_experiment(ExperimentConfig(...))`` runs and reports a whole experiment (what the
``classp-fused run`` command does); ``tune`` searches each method's grid on validation data.
"""
from .benchmarks import BENCHMARKS, Benchmark
from .experiment import ConfigError, ExperimentConfig, ExperimentResult, Interrupted, run_experiment
from .methods import METHODS, Method, build_method, resolve_hparams
from .metrics import average_accuracy, backward_transfer, forgetting, sequence_metrics
from .streams import Stream, Task, read_idx
from .train import run_cell
from .tune import GRIDS, tune

__all__ = ["BENCHMARKS", "GRIDS", "METHODS", "Benchmark", "ConfigError", "ExperimentConfig",
           "ExperimentResult", "Interrupted", "Method", "Stream", "Task", "average_accuracy",
           "backward_transfer", "build_method", "forgetting", "read_idx", "resolve_hparams",
           "run_cell", "run_experiment", "sequence_metrics", "tune"]
