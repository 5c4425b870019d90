"""``classp-fused``: run continual-learning benchmarks and report accuracy, forgetting and memory.

    classp-fused run [--benchmark NAMES] [--methods NAMES] [--seeds N|LIST] [--epochs N|LIST]
                     [--out DIR] [--resume | --overwrite] [--config FILE] ...
    classp-fused tune --benchmark NAME [--methods NAMES] [--seeds N|LIST] [--out DIR] ...
    classp-fused methods          # the registered methods and their default hyperparameters
    classp-fused benchmarks       # the registered benchmarks
    classp-fused check [--device cpu|cuda] [--quick]   # self-check: classp_fused.check

This module only parses and prints; ``classp_fused.cl.experiment`` and ``classp_fused.cl.tune``
do the work. Bad input (unknown names, out-of-range hyperparameters, missing or malformed
datasets, an unwritable or busy --out or one inside a busy folder, an --out holding earlier
results without --resume or --overwrite, a bad config file) is reported as one
``classp-fused: error: ...`` line with exit code 2, before anything is written. A stored cell
that --resume cannot trust is reported as one ``classp-fused: warning: ...`` line and run
again. Ctrl-C prints one line and exits with 130.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from . import check as self_check
from .cl.benchmarks import BENCHMARKS, DEFAULT_DIRS
from .cl.experiment import (MAX_SEEDS, SEED_LIMIT, CellFileWarning, ConfigError,
                            ExperimentConfig, Interrupted, run_experiment)
from .cl.methods import METHODS
from .cl.report import MAX_NESTING, nesting
from .cl.train import SCENARIOS
from .cl.tune import GRIDS, TUNING_SEEDS, VALIDATION, tune

PROG = "classp-fused"
DEFAULT_BENCHMARKS = "split-digits,permuted-digits"
#: Keys a --config file may hold besides the long options: recorded with the results.
RECORD_KEYS = ("tuning",)


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
        count = _positive_int(text)
        if count > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"expected at most {MAX_SEEDS} seeds, got {text}")
        return tuple(range(count))
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma list of seeds,"
                                         f" got {text!r}") from None
    if (not seeds or min(seeds) < 0 or max(seeds) >= SEED_LIMIT
            or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS):
        raise argparse.ArgumentTypeError(f"expected distinct seeds in [0, {SEED_LIMIT}),"
                                         f" got {text!r}")
    return seeds


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    """A comma list of names, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def _add_protocol_options(command: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``tune`` share: what to train and how."""
    command.add_argument("--methods", type=_names, metavar="NAMES",
                         help="comma list of methods, or 'all' (default: each benchmark's own"
                         " list, all methods for the built-in benchmarks)")
    command.add_argument("--epochs", type=_positive_ints, metavar="N|LIST",
                         help="epochs per task, or a comma list per task whose last entry"
                         " repeats (default: the benchmark's)")
    command.add_argument("--batch-size", type=_positive_int, metavar="N",
                         help="training batch size (default: the benchmark's, 32)")
    command.add_argument("--scenario", choices=SCENARIOS, default="task",
                         help="task: multi-head, logits masked to the task's classes; class:"
                         " one shared head (default task)")
    command.add_argument("--max-per-task", type=_positive_int, metavar="N",
                         help="keep at most N training and N test examples per task (seeded)")
    command.add_argument("--mnist-dir", metavar="DIR",
                         help="MNIST IDX directory (needed by mnist-fashion and paper-vision)")
    command.add_argument("--fashion-dir", metavar="DIR",
                         help="Fashion-MNIST IDX directory (default"
                         f" {DEFAULT_DIRS['fashion']}, Debian's dataset-fashion-mnist)")
    command.add_argument("--threads", type=_positive_int, default="1", metavar="N",
                         help="torch CPU threads (default 1, fastest for the small MLPs)")
    command.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:N]"
                         " (default cpu)")
    command.add_argument("--resume", action="store_true",
                         help="keep the finished cells found in --out (those whose files pass"
                         " their checks) and run only the others")
    command.add_argument("--overwrite", action="store_true",
                         help="run every cell again into an --out that holds earlier results,"
                         " replacing them (without --resume or --overwrite such an --out is"
                         " refused)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``run`` subcommand parser."""
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run benchmarks and write results",
                              description="Train each method through each benchmark's task"
                              " stream, once per seed; print the results table and write"
                              " results.json, results.csv, results.md, plots/*.png and"
                              " per-cell results under --out.")
    run.add_argument("--config", metavar="FILE",
                     help="JSON object of option values (keys as the long options, e.g."
                     ' "methods", "max_per_task", "hparams"; the tuned.json that tune writes);'
                     " command-line flags override it")
    run.add_argument("--benchmark", type=_names, default=DEFAULT_BENCHMARKS, metavar="NAMES",
                     help=f"comma list of benchmarks (default {DEFAULT_BENCHMARKS}; see"
                     f" '{PROG} benchmarks')")
    run.add_argument("--seeds", type=_seeds, default="3", metavar="N|LIST",
                     help="number of seeds (0..N-1) or a comma list of seeds (default 3)")
    run.add_argument("--hparam", action="append", default=[], metavar="METHOD.KEY=VALUE",
                     help="override a method hyperparameter (repeatable; VALUE is JSON or text),"
                     " e.g. classp.threshold=1e-3")
    run.add_argument("--out", default="runs/latest", metavar="DIR",
                     help="output directory (default runs/latest)")
    _add_protocol_options(run)
    tune_cmd = commands.add_parser(
        "tune", help="search each method's grid on a validation split; write tuned.json",
        description="Train every configuration of each method's grid (12 per method) with the"
        " tuning seeds, holding out --validation of each task's training data; pick per method"
        " the best final average validation accuracy (diverged configurations are never"
        " picked); write tuned.json (for run --config) and tuning.md under --out.")
    tune_cmd.add_argument("--benchmark", type=_names, required=True, metavar="NAME",
                          help="the benchmark to tune on")
    tune_cmd.add_argument("--seeds", type=_seeds,
                          default=",".join(map(str, TUNING_SEEDS)), metavar="N|LIST",
                          help="tuning seeds, kept apart from the evaluation seeds (default"
                          f" {','.join(map(str, TUNING_SEEDS))})")
    tune_cmd.add_argument("--validation", type=_fraction, default=str(VALIDATION),
                          metavar="FRACTION", help="share of each task's training data held"
                          f" out for scoring (default {VALIDATION})")
    tune_cmd.add_argument("--out", default="runs/tune", metavar="DIR",
                          help="output directory (default runs/tune)")
    _add_protocol_options(tune_cmd)
    commands.add_parser("methods", help="list methods, their defaults and tuning grids")
    commands.add_parser("benchmarks", help="list benchmarks")
    self_check.add_arguments(commands.add_parser(
        "check", help="check this installation's backends", description=self_check.DESCRIPTION))
    return parser, run


def _load_json(text: str, what: str) -> Any:
    """Parse JSON read from the user, refusing values nested deeper than MAX_NESTING."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None  # deeper than the parser can go: refused below
    else:
        if nesting(value) <= MAX_NESTING:
            return value
    raise UsageError(f"{what}: JSON nested deeper than {MAX_NESTING} levels")


def _config_defaults(run: argparse.ArgumentParser, path: str) -> tuple[dict[str, Any], dict]:
    """Read a JSON config into argparse defaults (strings, so the option types parse them).

    Returns the defaults and the record to store with the results (the file's content).
    """
    try:
        config = _load_json(Path(path).read_text(), f"config {path}")
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"config {path}: expected a JSON object")
    actions = {a.dest: a for a in run._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        dest = key.replace("-", "_")
        if key in RECORD_KEYS:
            continue
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
    return defaults, {"config_file": str(Path(path).resolve()), "config": config}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser, run = build_parser()
    args = parser.parse_args(argv)
    args.record = {}
    if args.command == "run" and args.config:
        defaults, record = _config_defaults(run, args.config)
        run.set_defaults(**defaults)
        args = parser.parse_args(argv)
        args.record = record
    return args


def _parse_hparams(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        method, dot, key = target.partition(".")
        if not (sep and dot and method and key):
            raise UsageError(f"--hparam expects METHOD.KEY=VALUE, got {item!r}")
        try:
            value = _load_json(text, f"--hparam {target}")
        except ValueError:
            value = text
        overrides.setdefault(method, {})[key] = value
    return overrides


def _data_dirs(args: argparse.Namespace) -> dict[str, str]:
    return {key: value for key, value in (("mnist", args.mnist_dir),
                                          ("fashion", args.fashion_dir)) if value}


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """The ExperimentConfig a parsed ``run`` or ``tune`` command line describes."""
    return ExperimentConfig(
        benchmarks=args.benchmark, methods=args.methods, seeds=args.seeds, epochs=args.epochs,
        batch_size=args.batch_size, scenario=args.scenario, max_per_task=args.max_per_task,
        hparams=_parse_hparams(getattr(args, "hparam", ())), data_dirs=_data_dirs(args),
        validation=getattr(args, "validation", None), threads=args.threads,
        device=args.device, out=args.out, resume=args.resume, overwrite=args.overwrite,
        record=args.record)


def run_command(args: argparse.Namespace) -> None:
    result = run_experiment(experiment_config(args))
    print(result.table)
    print(f"\ntable: {result.files[2]}; results: {result.files[0]}, {result.files[1]}")
    if len(result.files) > 3:
        print("plots: " + ", ".join(str(p) for p in result.files[3:]))
    print(result.summary_line)


def tune_command(args: argparse.Namespace) -> None:
    options = {f"{key}_dir": str(Path(path).resolve()) for key, path in _data_dirs(args).items()}
    tuned = tune(experiment_config(args), options)
    out = Path(args.out)
    for method in tuned["methods"]:
        picked = tuned["hparams"].get(method)
        setting = (", ".join(f"{k}={v}" for k, v in picked.items()) if picked
                   else "every configuration diverged; defaults kept")
        print(f"{method:12} {setting}")
    print(f"\ntrials: {out / 'tuning.md'}\nrun it: {PROG} run --config {out / 'tuned.json'}"
          f" --seeds 5 --out DIR")


def _list_methods() -> None:
    for spec in METHODS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        grid = f"; tune grid of {len(GRIDS[spec.name])}" if spec.name in GRIDS else ""
        print(f"{spec.name:14} {spec.summary}{grid}\n{'':14} {defaults}")


def _list_benchmarks() -> None:
    width = max(map(len, BENCHMARKS)) + 1
    for b in BENCHMARKS.values():
        required = [f"--{d}-dir" for d in b.data_dirs if d not in DEFAULT_DIRS]
        needs = f" (needs {', '.join(required)})" if required else ""
        print(f"{b.name:{width}} {b.summary}{needs}\n{'':{width}} model {b.model}, epochs"
              f" {','.join(map(str, b.epochs))}, batch {b.batch_size},"
              f" methods {','.join(b.default_methods)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``classp-fused`` and ``python -m classp_fused``; returns the exit code."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_cell_warnings_as_lines(message, category, *where):
            if issubclass(category, CellFileWarning):
                tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, *where)

        warnings.simplefilter("always", CellFileWarning)
        warnings.showwarning = show_cell_warnings_as_lines
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    try:
        args = parse_args(argv)
        if args.command == "methods":
            _list_methods()
        elif args.command == "benchmarks":
            _list_benchmarks()
        elif args.command == "tune":
            tune_command(args)
        elif args.command == "check":
            return self_check.run(args)
        else:
            run_command(args)
    except (UsageError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"{PROG}: interrupted: {exc.cells_kept} finished cells kept in {exc.out};"
              " rerun with --resume to continue", file=sys.stderr)
        return 130
    return 0
