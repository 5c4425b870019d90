"""An experiment: every (benchmark, method, seed) cell of a configuration, run and reported.

``run_experiment(ExperimentConfig(...))`` validates the whole configuration before writing
anything, holds the output folder's lock for the run (``classp_fused.cl.folders``), refuses a
folder that holds an earlier run's results unless told to ``resume`` or ``overwrite``, keeps
on ``resume`` the finished cells whose files pass ``classp_fused.cl.cells``' checks, runs the
rest, and writes results.json, results.csv, results.md and plots/*.png. Progress goes to
stderr: a line per cell, and a bar when stderr is a terminal. The ``classp-fused`` command
and ``tune`` both use it.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .benchmarks import BENCHMARKS, DEFAULT_DIRS
from .cells import cell_problem, read_cell
from .folders import FolderError, FolderLock, claim_folder
from .methods import METHODS, build_method, resolve_hparams
from .metrics import average_accuracy
from .models import mlp
from .report import (MAX_NESTING, aggregate, atomic_write, divergence_line, markdown_table,
                     nesting, plot_paths, write_csv, write_json, write_plots)
from .streams import Stream, load_idx_dataset, validation_stream
from .train import SCENARIOS, run_cell

#: Seeds seed torch, numpy and scikit-learn alike, so they must fit in 32 bits.
SEED_LIMIT = 2 ** 32
#: More seeds than this is a typo, not an experiment.
MAX_SEEDS = 10_000
#: What a run (the first five) or a tune writes under its folder: any of them there means the
#: folder holds an earlier run's or tune's results.
RESULTS = ("results.json", "results.csv", "results.md", "plots", "cells", "tuned.json",
           "tuning.md", "grid")


class ConfigError(ValueError):
    """An invalid experiment configuration, found before anything was written."""


class CellFileWarning(UserWarning):
    """A stored cell file failed its checks on ``resume``: the cell is run again."""


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
    hyperparameters). A folder that holds an earlier run's results is refused unless
    ``resume`` (keep its finished cells) or ``overwrite`` (run every cell again) is set.
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
    overwrite: bool = False
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
    #: whether the method records CLASSP's update density
    reports_density: bool

    def path(self, out: Path) -> Path:
        return out / "cells" / self.benchmark / self.method / f"seed{self.seed}.json"

    @property
    def label(self) -> str:
        return f"{self.benchmark} {self.method} seed {self.seed}"


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
    for name in ("resume", "overwrite", "plots", "progress"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name}: expected true or false, got {getattr(config, name)!r}")
    if config.resume and config.overwrite:
        raise ConfigError("resume keeps finished cells and overwrite runs them again: give one")


def check_json_mapping(name: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is a mapping that can be written as JSON."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    if nesting(dict(value)) > MAX_NESTING:
        raise ConfigError(f"{name}: nested deeper than {MAX_NESTING} levels")
    try:
        json.dumps(dict(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: not JSON ({exc})") from None


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
    probe = mlp((1,), 2)
    for method, overrides in config.hparams.items():  # run or not, every override is checked
        try:
            build_method(method, probe, resolve_hparams(method, overrides))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"hparams {method}: {exc}") from None
    _check_scalars(config)
    check_json_mapping("record", config.record)
    dirs = _data_dirs(config)
    cells = []
    for name in config.benchmarks:
        benchmark = BENCHMARKS[name]
        methods = benchmark.default_methods if config.methods is None else config.methods
        methods = tuple(METHODS) if "all" in methods else tuple(dict.fromkeys(methods))
        for method in methods:
            try:
                hparams = resolve_hparams(method, {**benchmark.method_hparams.get(method, {}),
                                                   **config.hparams.get(method, {})})
                built = build_method(method, probe, hparams)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{name}/{method}: {exc}") from None
            settings = {"epochs": list(config.epochs or benchmark.epochs),
                        "batch_size": config.batch_size or benchmark.batch_size,
                        "scenario": config.scenario, "max_per_task": config.max_per_task,
                        "validation": config.validation,
                        "data_dirs": {d: str(Path(dirs[d]).resolve()) for d in benchmark.data_dirs},
                        "hparams": hparams}
            cells += [Cell(name, method, seed, settings, built.reports_update_density)
                      for seed in config.seeds]
    _check_device(config.device)
    _check_writable(Path(config.out))
    return cells, dirs


def output_files(config: ExperimentConfig, cells: Sequence[Cell]) -> list[Path]:
    """Every file a run of ``cells`` under ``config`` writes."""
    out = Path(config.out)
    files = [cell.path(out) for cell in cells]
    files += [out / name for name in ("results.json", "results.csv", "results.md")]
    if config.plots:
        for benchmark in dict.fromkeys(cell.benchmark for cell in cells):
            files += plot_paths(out / "plots", benchmark)
    return files


def _check_targets(out: Path, files: Iterable[Path]) -> None:
    """Raise ConfigError unless every file can be written: each is absent or a regular file
    (a symlink to one counts), and each folder on the way to it absent or a folder."""
    files = list(files)
    folders = {parent for path in files for parent in path.relative_to(out).parents}
    for relative in sorted(folders):
        folder = out / relative
        if os.path.lexists(folder) and not folder.is_dir():
            raise ConfigError(f"out {out}: {folder} is in the way of the results (expected a"
                              " directory); move it away or choose another directory")
    for path in files:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue  # absent, or a dangling symlink that os.replace replaces
        except OSError as exc:
            raise ConfigError(f"out {out}: cannot inspect {path} ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ConfigError(f"out {out}: {path} is {kind}, in the way of a result file;"
                              " move it away or choose another directory")


def claim_output(config: ExperimentConfig, files: Sequence[Path]) -> FolderLock:
    """Lock ``config.out`` for writing ``files``; ConfigError before anything is written if
    another run holds it, a folder around it or one it writes into; if it holds any of
    RESULTS and neither ``resume`` nor ``overwrite`` is set; or if something is in the way of
    a file."""
    out = Path(config.out)

    def check() -> None:
        found = [name for name in RESULTS if os.path.lexists(out / name)]
        if found and not (config.resume or config.overwrite):
            raise ConfigError(f"out {out} holds results of an earlier run ({', '.join(found)});"
                              " rerun with --resume to keep its finished cells, or --overwrite"
                              " to run them again and replace them")
        _check_targets(out, files)

    try:
        return claim_folder(out, {path.parent for path in files}, check)
    except FolderError as exc:
        raise ConfigError(str(exc)) from None


def _stream(cell: Cell, dirs: Mapping[str, str]) -> Stream:
    settings = cell.settings
    stream = BENCHMARKS[cell.benchmark].stream(cell.seed, dirs, settings["max_per_task"])
    if settings["validation"]:
        stream = validation_stream(stream, settings["validation"], cell.seed)
    return stream


def _reusable(cell: Cell, out: Path, task_names: Callable[[], list[str]]) -> Optional[dict]:
    """The stored result of ``cell`` if its file passes every check (cells.cell_problem);
    None, with a CellFileWarning naming the file and the reason, if it exists but does not."""
    path = cell.path(out)
    if not os.path.lexists(path):
        return None
    stored, problem = read_cell(path)
    if problem is None:
        identity = {"benchmark": cell.benchmark, "method": cell.method, "seed": cell.seed}
        problem = cell_problem(stored, identity, cell.settings, task_names,
                               cell.reports_density)
    if problem is None:
        return stored
    warnings.warn(f"{path}: not reused ({problem}); running the cell again", CellFileWarning,
                  stacklevel=2)
    return None


def _run_cell(cell: Cell, dirs: Mapping[str, str], device: str, on_task) -> dict:
    benchmark = BENCHMARKS[cell.benchmark]
    settings = cell.settings
    stream = _stream(cell, dirs)
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


def progress_bar(total: int, unit: str, enabled: bool) -> tqdm:
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal (a log gets
    the per-item lines alone, written with ``tqdm.write``)."""
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        terminal = False
    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not (enabled and terminal),
                dynamic_ncols=True)


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Run every cell of ``config`` (keeping finished ones on ``resume``) and write the reports.

    Raises ConfigError before writing anything if the configuration is invalid, another run
    or tune holds the output folder or a folder around it, or the folder holds an earlier
    run's results and neither ``resume`` nor ``overwrite`` is set; Interrupted (a
    KeyboardInterrupt) on Ctrl-C, after which the finished cells stay on disk. Warns
    (CellFileWarning) for each stored cell that ``resume`` finds unfit and runs again.
    """
    cells, dirs = plan(config)
    lock = claim_output(config, output_files(config, cells))
    try:
        return run_planned(config, cells, dirs)
    finally:
        lock.release()


def run_planned(config: ExperimentConfig, cells: list[Cell],
                dirs: Mapping[str, str]) -> ExperimentResult:
    """Run the cells ``plan(config)`` returned; the caller holds the lock of ``config.out`` or
    of a folder around it."""
    out = Path(config.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    results, ran = [], 0
    names: dict[tuple[str, int], list[str]] = {}  # (benchmark, seed) -> its task names

    def task_names(cell: Cell) -> list[str]:
        key = (cell.benchmark, cell.seed)
        if key not in names:
            names[key] = [task.name for task in _stream(cell, dirs).tasks]
        return names[key]

    bar = progress_bar(len(cells), "cell", config.progress)
    try:
        for number, cell in enumerate(cells, 1):
            stored = (_reusable(cell, out, lambda: task_names(cell)) if config.resume
                      else None)
            if stored is None:
                bar.set_description(cell.label, refresh=False)
                stored = _run_cell(cell, dirs, config.device,
                                   lambda i: bar.set_postfix_str(f"task {i + 1}", refresh=False))
                write_json(cell.path(out), stored)
                ran += 1
                if config.progress:
                    bar.write(f"[{number}/{len(cells)}] {cell.label}: {_outcome(stored)}"
                              f" ({stored['seconds']:.1f} s)", file=sys.stderr)
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
