"""``classp-fused``: run continual-learning benchmarks and report accuracy, forgetting and memory.

    classp-fused run [--benchmark NAMES] [--methods NAMES] [--seeds N|LIST] [--epochs N|LIST]
                     [--out DIR] [--resume] [--config FILE] ...
    classp-fused methods          # the registered methods and their default hyperparameters
    classp-fused benchmarks       # the registered benchmarks

Bad input (unknown names, missing or malformed datasets, an unwritable --out, a bad config
file) is reported as one ``classp-fused: error: ...`` line with exit code 2, before anything
is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .cl.methods import METHODS, build_method, resolve_hparams
from .cl.metrics import average_accuracy
from .cl.models import mlp
from .cl.report import aggregate, markdown_table, write_csv, write_json, write_plots
from .cl.streams import load_idx_dataset, subsample_stream
from .cl.train import BENCHMARKS, DEFAULT_DIRS, SCENARIOS, run_cell

PROG = "classp-fused"
DEFAULT_BENCHMARKS = "split-digits,permuted-digits"


class UsageError(Exception):
    """Invalid command-line or config input: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def _seeds(text: str) -> tuple[int, ...]:
    """``N`` means seeds 0..N-1; a comma list (``7,`` for one) names the seeds."""
    if "," not in text:
        return tuple(range(_positive_int(text)))
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma list of seeds,"
                                         f" got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return seeds


def _names(text: str) -> tuple[str, ...]:
    """A comma list of names, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``run`` subcommand parser."""
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run benchmarks and write results",
                              description="Train each method through each benchmark's task"
                              " stream, once per seed; write results.json, results.csv,"
                              " plots/*.png and per-cell checkpoints under --out.")
    run.add_argument("--config", metavar="FILE",
                     help="JSON object of option values (keys as the long options, e.g."
                     ' "methods", "max_per_task", "hparams"); command-line flags override it')
    run.add_argument("--benchmark", type=_names, default=DEFAULT_BENCHMARKS, metavar="NAMES",
                     help=f"comma list of benchmarks (default {DEFAULT_BENCHMARKS}; see"
                     f" '{PROG} benchmarks')")
    run.add_argument("--methods", type=_names, metavar="NAMES",
                     help="comma list of methods, or 'all' (default: each benchmark's own list,"
                     " all methods for the digits benchmarks)")
    run.add_argument("--seeds", type=_seeds, default="3", metavar="N|LIST",
                     help="number of seeds (0..N-1) or a comma list of seeds (default 3)")
    run.add_argument("--epochs", type=_positive_ints, metavar="N|LIST",
                     help="epochs per task, or a comma list per task whose last entry repeats"
                     " (default: the benchmark's)")
    run.add_argument("--batch-size", type=_positive_int, metavar="N",
                     help="training batch size (default: the benchmark's, 32)")
    run.add_argument("--scenario", choices=SCENARIOS, default="task",
                     help="task: multi-head, logits masked to the task's classes; class: one"
                     " shared head (default task)")
    run.add_argument("--max-per-task", type=_positive_int, metavar="N",
                     help="keep at most N training and N test examples per task (quick runs)")
    run.add_argument("--hparam", action="append", default=[], metavar="METHOD.KEY=VALUE",
                     help="override a method hyperparameter (repeatable; VALUE is JSON or text),"
                     " e.g. classp.threshold=1e-3")
    run.add_argument("--mnist-dir", metavar="DIR",
                     help="MNIST IDX directory (needed by mnist-fashion and paper-vision)")
    run.add_argument("--fashion-dir", metavar="DIR",
                     help="Fashion-MNIST IDX directory (default /usr/share/datasets/fashion-mnist,"
                     " Debian's dataset-fashion-mnist)")
    run.add_argument("--threads", type=_positive_int, default="1", metavar="N",
                     help="torch CPU threads (default 1, fastest for the small MLPs)")
    run.add_argument("--device", default="cpu", help="torch device (default cpu)")
    run.add_argument("--out", default="runs/latest", metavar="DIR",
                     help="output directory (default runs/latest)")
    run.add_argument("--resume", action="store_true",
                     help="keep finished cells found in --out and run only the missing ones")
    commands.add_parser("methods", help="list methods and their default hyperparameters")
    commands.add_parser("benchmarks", help="list benchmarks")
    return parser, run


def _config_defaults(run: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read a JSON config into argparse defaults (strings, so the option types parse them)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"config {path}: expected a JSON object")
    actions = {a.dest: a for a in run._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        dest = key.replace("-", "_")
        if dest == "hparams":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise UsageError(f"config {path}: hparams must map method names to objects")
            dest, value = "hparam", [f"{m}.{k}={json.dumps(v)}" for m, kv in value.items()
                                     for k, v in kv.items()]
        elif dest not in actions:
            raise UsageError(f"config {path}: unknown option {key!r}")
        elif actions[dest].nargs == 0:
            if not isinstance(value, bool):
                raise UsageError(f"config {path}: {key} must be true or false")
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, dict)) or value is None:
            raise UsageError(f"config {path}: {key} must be a string, a number or a list")
        else:
            value = str(value)
        defaults[dest] = value
    return defaults


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser, run = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.config:
        run.set_defaults(**_config_defaults(run, args.config))
        args = parser.parse_args(argv)
    return args


def _parse_hparams(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        method, dot, key = target.partition(".")
        if not (sep and dot and method and key):
            raise UsageError(f"--hparam expects METHOD.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        overrides.setdefault(method, {})[key] = value
    return overrides


def _check_writable(out: Path) -> None:
    """Raise UsageError unless ``out`` is, or can be created as, a writable directory."""
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {existing} is not writable")


@dataclass(frozen=True)
class Cell:
    """One (benchmark, method, seed) run and the settings that must match to reuse its result."""

    benchmark: str
    method: str
    seed: int
    settings: dict

    def path(self, out: Path) -> Path:
        return out / "cells" / self.benchmark / self.method / f"seed{self.seed}.json"


def plan_cells(args: argparse.Namespace) -> tuple[list[Cell], dict[str, str]]:
    """Validate everything (names, hyperparameters, datasets, --out); return the cells to run."""
    unknown = [b for b in args.benchmark if b not in BENCHMARKS]
    if unknown or not args.benchmark:
        raise UsageError(f"unknown benchmark {', '.join(map(repr, unknown)) or '(none given)'}"
                         f" (choose from {', '.join(BENCHMARKS)})")
    if args.methods is not None:
        unknown = [m for m in args.methods if m not in METHODS and m != "all"]
        if unknown or not args.methods:
            raise UsageError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}"
                             f" (choose from {', '.join(METHODS)}, or all)")
    overrides = _parse_hparams(args.hparam)
    unknown = [m for m in overrides if m not in METHODS]
    if unknown:
        raise UsageError(f"--hparam: unknown method {unknown[0]!r}")

    dirs = dict(DEFAULT_DIRS)
    if args.fashion_dir:
        dirs["fashion"] = args.fashion_dir
    if args.mnist_dir:
        dirs["mnist"] = args.mnist_dir
    for name in args.benchmark:
        missing = [d for d in BENCHMARKS[name].data_dirs if d not in dirs]
        if missing:
            raise UsageError(f"benchmark {name} needs --{missing[0]}-dir")
    cells = []
    probe = mlp((1,), 2)
    for name in args.benchmark:
        benchmark = BENCHMARKS[name]
        methods = benchmark.default_methods if args.methods is None else args.methods
        methods = tuple(METHODS) if "all" in methods else methods
        for method in methods:
            try:
                hparams = resolve_hparams(method, {**benchmark.method_hparams.get(method, {}),
                                                   **overrides.get(method, {})})
                build_method(method, probe, hparams)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{name}/{method}: {exc}") from None
            settings = {"epochs": list(args.epochs or benchmark.epochs),
                        "batch_size": args.batch_size or benchmark.batch_size,
                        "scenario": args.scenario, "max_per_task": args.max_per_task,
                        "data_dirs": {d: str(Path(dirs[d]).resolve()) for d in benchmark.data_dirs},
                        "hparams": hparams}
            cells += [Cell(name, method, seed, settings) for seed in args.seeds]
    _check_device(args.device)
    _load_datasets(args.benchmark, dirs)
    _check_writable(Path(args.out))
    return cells, dirs


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available")


def _load_datasets(benchmarks: Sequence[str], dirs: dict[str, str]) -> None:
    """Read every IDX directory a benchmark needs, so malformed data fails before any output."""
    for name in benchmarks:
        for key in BENCHMARKS[name].data_dirs:
            try:
                load_idx_dataset(dirs[key])
            except (OSError, ValueError) as exc:
                raise UsageError(f"{name}: {exc}") from None


def _finished(cell: Cell, out: Path) -> Optional[dict]:
    """The stored result of ``cell`` if it exists, parses and was run with the same settings."""
    try:
        stored = json.loads(cell.path(out).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("settings") == cell.settings else None


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per cell otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K[{self.done}/{self.total}] {text}")
            sys.stderr.flush()

    def finish_cell(self, text: str) -> None:
        self.done += 1
        if self.tty:
            self.show(text)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_command(args: argparse.Namespace) -> None:
    cells, dirs = plan_cells(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    progress = Progress(len(cells))
    started = time.perf_counter()
    ran = 0
    for cell in cells:
        label = f"{cell.benchmark} {cell.method} seed {cell.seed}"
        stored = _finished(cell, out) if args.resume else None
        if stored is None:
            stream = BENCHMARKS[cell.benchmark].build(cell.seed, dirs)
            if args.max_per_task:
                stream = subsample_stream(stream, args.max_per_task, args.max_per_task, cell.seed)
            tasks = len(stream.tasks)
            raw = run_cell(stream, BENCHMARKS[cell.benchmark].model, cell.method,
                           cell.settings["hparams"], cell.seed, cell.settings["epochs"],
                           cell.settings["batch_size"], cell.settings["scenario"], args.device,
                           lambda i: progress.show(f"{label}: task {i + 1}/{tasks}"))
            stored = {"benchmark": cell.benchmark, "method": cell.method, "seed": cell.seed,
                      "settings": cell.settings, "tasks": [t.name for t in stream.tasks], **raw}
            write_json(cell.path(out), stored)
            ran += 1
            progress.finish_cell(f"{label}: avg acc {average_accuracy(raw['acc_matrix']):.3f}"
                                 f" ({raw['seconds']:.1f} s)")
        else:
            progress.finish_cell(f"{label}: finished earlier, kept")
        results.append(stored)
    progress.close()

    summary = aggregate(results)
    settings = {"benchmarks": list(args.benchmark), "seeds": list(args.seeds),
                "scenario": args.scenario, "threads": args.threads, "device": args.device,
                "cells_run": ran, "cells_kept": len(cells) - ran,
                "seconds": time.perf_counter() - started}
    write_json(out / "results.json", {"settings": settings, "benchmarks": summary})
    write_csv(out / "results.csv", summary)
    plots = write_plots(summary, out / "plots")
    print(markdown_table(summary))
    print(f"\nresults: {out / 'results.json'}, {out / 'results.csv'}")
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"{ran} cells run, {len(cells) - ran} kept, {settings['seconds']:.1f} s")


def _list_methods() -> None:
    for spec in METHODS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        print(f"{spec.name:14} {spec.summary}\n{'':14} {defaults}")


def _list_benchmarks() -> None:
    for b in BENCHMARKS.values():
        required = [f"--{d}-dir" for d in b.data_dirs if d not in DEFAULT_DIRS]
        needs = f" (needs {', '.join(required)})" if required else ""
        print(f"{b.name:16} {b.summary}{needs}\n{'':16} model {b.model}, epochs"
              f" {','.join(map(str, b.epochs))}, batch {b.batch_size},"
              f" methods {','.join(b.default_methods)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``classp-fused`` and ``python -m classp_fused``; returns the exit code."""
    try:
        args = parse_args(argv)
        if args.command == "methods":
            _list_methods()
        elif args.command == "benchmarks":
            _list_benchmarks()
        else:
            run_command(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0
