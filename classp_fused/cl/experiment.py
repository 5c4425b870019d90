"""An experiment: every (benchmark, method, seed) cell of a configuration, run and reported.

``run_experiment(ExperimentConfig(...))`` validates the whole configuration before writing
anything, holds a lock on the output directory for the run, keeps finished cells on
``resume``, runs the rest with a progress bar, and writes results.json, results.csv,
results.md and plots/*.png. The ``classp-fused`` command and ``tune`` both call it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from .benchmarks import BENCHMARKS, DEFAULT_DIRS
from .methods import METHODS, build_method, resolve_hparams
from .metrics import average_accuracy
from .models import mlp
from .report import (aggregate, atomic_write, divergence_line, markdown_table, write_csv,
                     write_json, write_plots)
from .streams import load_idx_dataset, validation_stream
from .train import SCENARIOS, run_cell

#: Seeds seed torch, numpy and scikit-learn alike, so they must fit in 32 bits.
SEED_LIMIT = 2 ** 32
#: More seeds than this is a typo, not an experiment.
MAX_SEEDS = 10_000
LOCK_NAME = ".lock"


class ConfigError(ValueError):
    """An invalid experiment configuration, found before anything was written."""


class Interrupted(KeyboardInterrupt):
    """The run was interrupted; ``cells_kept`` finished cells are on disk for ``resume``."""

    def __init__(self, cells_kept: int, out: Path):
        super().__init__(f"interrupted: {cells_kept} finished cells kept in {out}")
        self.cells_kept = cells_kept
        self.out = out


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run and where to write it.

    ``methods`` None means each benchmark's own list; ``epochs``/``batch_size`` None mean the
    benchmark's. ``hparams`` maps a method to overrides of its defaults. ``data_dirs`` maps a
    dataset key (``mnist``, ``fashion``) to an IDX directory. ``validation`` holds out that
    fraction of each task's training data and evaluates on it instead of the test split
    (tuning). ``record`` is stored as-is in results.json (e.g. the tuning that chose the
    hyperparameters).
    """

    benchmarks: Sequence[str] = ("split-digits", "permuted-digits")
    methods: Optional[Sequence[str]] = None
    seeds: Sequence[int] = (0, 1, 2)
    epochs: Optional[Sequence[int]] = None
    batch_size: Optional[int] = None
    scenario: str = "task"
    max_per_task: Optional[int] = None
    hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    data_dirs: Mapping[str, str] = field(default_factory=dict)
    validation: Optional[float] = None
    threads: int = 1
    device: str = "cpu"
    out: str = "runs/latest"
    resume: bool = False
    plots: bool = True
    progress: bool = True
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One (benchmark, method, seed) run and the settings that must match to reuse its result."""

    benchmark: str
    method: str
    seed: int
    settings: dict

    def path(self, out: Path) -> Path:
        return out / "cells" / self.benchmark / self.method / f"seed{self.seed}.json"


@dataclass(frozen=True)
class ExperimentResult:
    """What a run produced: the aggregated results, the printed table and the files."""

    results: dict
    table: str
    files: list[Path]
    cells_run: int
    cells_kept: int
    seconds: float
    cpu_seconds: float

    @property
    def summary_line(self) -> str:
        """The run's last line: cells run and kept, time, and which cells diverged."""
        return (f"{self.cells_run} cells run, {self.cells_kept} kept, {self.seconds:.1f} s wall,"
                f" {self.cpu_seconds:.1f} s CPU; {divergence_line(self.results)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_ints(name: str, values: Optional[Sequence[int]]) -> None:
    if values is not None and (isinstance(values, (str, bytes)) or not values
                               or not all(_is_int(v) and v >= 1 for v in values)):
        raise ConfigError(f"{name}: expected a non-empty list of positive integers,"
                          f" got {values!r}")


def _check_scalars(config: ExperimentConfig) -> None:
    seeds = config.seeds
    if isinstance(seeds, (str, bytes)) or not seeds or len(seeds) > MAX_SEEDS:
        raise ConfigError(f"seeds: expected 1 to {MAX_SEEDS} seeds, got {seeds!r:.80}")
    if not all(_is_int(s) and 0 <= s < SEED_LIMIT for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: expected distinct integers in [0, {SEED_LIMIT}),"
                          f" got {seeds!r:.80}")
    _check_positive_ints("epochs", config.epochs)
    for name in ("batch_size", "max_per_task"):
        value = getattr(config, name)
        if value is not None and not (_is_int(value) and value >= 1):
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    if not (_is_int(config.threads) and config.threads >= 1):
        raise ConfigError(f"threads: expected a positive integer, got {config.threads!r}")
    if config.scenario not in SCENARIOS:
        raise ConfigError(f"scenario: expected one of {', '.join(SCENARIOS)},"
                          f" got {config.scenario!r}")
    v = config.validation
    if v is not None and not (isinstance(v, float) and 0.0 < v < 1.0):
        raise ConfigError(f"validation: expected a fraction in (0, 1), got {v!r}")


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ConfigError(f"device {name}: expected cpu or cuda[:N] (training needs real memory)")


def _check_writable(out: Path) -> None:
    """Raise ConfigError unless ``out`` is, or can be created as, a writable directory."""
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out {out}: {existing} is not writable")


def _data_dirs(config: ExperimentConfig) -> dict[str, str]:
    dirs = {**DEFAULT_DIRS, **config.data_dirs}
    for name in config.benchmarks:
        missing = [d for d in BENCHMARKS[name].data_dirs if d not in dirs]
        if missing:
            raise ConfigError(f"benchmark {name} needs --{missing[0]}-dir"
                              f" (data_dirs[{missing[0]!r}])")
        for key in BENCHMARKS[name].data_dirs:
            try:
                load_idx_dataset(dirs[key])
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{name}: {exc}") from None
    return dirs


def plan(config: ExperimentConfig) -> tuple[list[Cell], dict[str, str]]:
    """Validate the whole configuration; return the cells to run and the data directories."""
    for name in ("benchmarks", "methods"):
        value = getattr(config, name)
        if isinstance(value, str):
            raise ConfigError(f"{name}: expected a list of names, got the string {value!r}")
    unknown = [b for b in config.benchmarks if b not in BENCHMARKS]
    if unknown or not config.benchmarks:
        raise ConfigError(f"unknown benchmark {', '.join(map(repr, unknown)) or '(none given)'}"
                          f" (choose from {', '.join(BENCHMARKS)})")
    if config.methods is not None:
        unknown = [m for m in config.methods if m not in METHODS and m != "all"]
        if unknown or not config.methods:
            raise ConfigError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}"
                              f" (choose from {', '.join(METHODS)}, or all)")
    unknown = [m for m in config.hparams if m not in METHODS]
    if unknown:
        raise ConfigError(f"hparams: unknown method {unknown[0]!r}")
    if not all(isinstance(v, Mapping) for v in config.hparams.values()):
        raise ConfigError("hparams: expected a mapping of method names to mappings")
    _check_scalars(config)
    dirs = _data_dirs(config)
    cells = []
    probe = mlp((1,), 2)
    for name in config.benchmarks:
        benchmark = BENCHMARKS[name]
        methods = benchmark.default_methods if config.methods is None else config.methods
        methods = tuple(METHODS) if "all" in methods else tuple(dict.fromkeys(methods))
        for method in methods:
            try:
                hparams = resolve_hparams(method, {**benchmark.method_hparams.get(method, {}),
                                                   **config.hparams.get(method, {})})
                build_method(method, probe, hparams)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{name}/{method}: {exc}") from None
            settings = {"epochs": list(config.epochs or benchmark.epochs),
                        "batch_size": config.batch_size or benchmark.batch_size,
                        "scenario": config.scenario, "max_per_task": config.max_per_task,
                        "validation": config.validation,
                        "data_dirs": {d: str(Path(dirs[d]).resolve()) for d in benchmark.data_dirs},
                        "hparams": hparams}
            cells += [Cell(name, method, seed, settings) for seed in config.seeds]
    _check_device(config.device)
    _check_writable(Path(config.out))
    return cells, dirs


def _finished(cell: Cell, out: Path) -> Optional[dict]:
    """The stored result of ``cell`` if it exists, parses and was run with the same settings."""
    try:
        stored = json.loads(cell.path(out).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("settings") == cell.settings else None


def _run_cell(cell: Cell, dirs: Mapping[str, str], device: str, on_task) -> dict:
    benchmark = BENCHMARKS[cell.benchmark]
    settings = cell.settings
    stream = benchmark.stream(cell.seed, dirs, settings["max_per_task"])
    if settings["validation"]:
        stream = validation_stream(stream, settings["validation"], cell.seed)
    raw = run_cell(stream, benchmark.model, cell.method, settings["hparams"], cell.seed,
                   settings["epochs"], settings["batch_size"], settings["scenario"], device,
                   on_task)
    return {"benchmark": cell.benchmark, "method": cell.method, "seed": cell.seed,
            "settings": settings, "tasks": [t.name for t in stream.tasks], **raw}


def _outcome(stored: dict) -> str:
    stop = stored.get("diverged")
    if stop:
        return f"diverged at task {stop['task']} epoch {stop['epoch']} step {stop['step']}"
    return f"avg acc {average_accuracy(stored['acc_matrix']):.3f}"


def lock_directory(out: Path) -> FileLock:
    """Create ``out`` and take its lock without waiting; ConfigError if either fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out / LOCK_NAME))
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"out {out}: another run is writing there (it holds"
                          f" {out / LOCK_NAME}); wait for it or choose another directory") from None
    except OSError as exc:
        raise ConfigError(f"out {out}: cannot create it ({exc.strerror or exc})") from None
    return lock


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Run every cell of ``config`` (keeping finished ones on ``resume``) and write the reports.

    Raises ConfigError before writing anything if the configuration is invalid or another
    run holds the output directory, and Interrupted (a KeyboardInterrupt) on Ctrl-C, after
    which the finished cells stay on disk.
    """
    cells, dirs = plan(config)
    out = Path(config.out)
    lock = lock_directory(out)
    try:
        return _run_locked(config, cells, dirs, out)
    finally:
        lock.release()


def _run_locked(config: ExperimentConfig, cells: list[Cell], dirs: Mapping[str, str],
                out: Path) -> ExperimentResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    results, ran = [], 0
    bar = tqdm(total=len(cells), unit="cell", file=sys.stderr, disable=not config.progress,
               dynamic_ncols=True)
    try:
        for cell in cells:
            label = f"{cell.benchmark} {cell.method} seed {cell.seed}"
            stored = _finished(cell, out) if config.resume else None
            if stored is None:
                bar.set_description(label, refresh=False)
                stored = _run_cell(cell, dirs, config.device,
                                   lambda i: bar.set_postfix_str(f"task {i + 1}", refresh=False))
                write_json(cell.path(out), stored)
                ran += 1
                if config.progress:
                    bar.write(f"{label}: {_outcome(stored)} ({stored['seconds']:.1f} s)",
                              file=sys.stderr)
            results.append(stored)
            bar.update()
    except KeyboardInterrupt:
        raise Interrupted(len(results), out) from None
    finally:
        bar.close()
        torch.set_num_threads(threads)

    summary = aggregate(results)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    run_settings = {"benchmarks": list(config.benchmarks), "seeds": list(config.seeds),
                    "scenario": config.scenario, "threads": config.threads,
                    "device": config.device, "cells_run": ran, "cells_kept": len(cells) - ran,
                    "seconds": seconds, "cpu_seconds": cpu_seconds}
    table = markdown_table(summary)
    files = [out / "results.json", out / "results.csv", out / "results.md"]
    write_json(files[0], {"settings": run_settings, "record": dict(config.record),
                          "benchmarks": summary})
    write_csv(files[1], summary)
    atomic_write(files[2], (table + "\n").encode())
    if config.plots:
        files += write_plots(summary, out / "plots")
    return ExperimentResult(summary, table, files, ran, len(cells) - ran, seconds, cpu_seconds)

