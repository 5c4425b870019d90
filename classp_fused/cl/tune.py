"""One tuning protocol for every method: a plain grid of equal size, scored on validation data.

Each method gets ``GRID_SIZE`` configurations (learning rate for all; lambda for EWC and MAS;
threshold or relative threshold, power and apply_scaling for CLASSP; power and lambda for
CLASSP plus MAS). Every configuration is trained with the tuning seeds (by default apart from
the evaluation seeds 0, 1, 2, ...) on the benchmark's task stream with ``validation`` of each
task's training data held out; the score is the final average accuracy on those held-out
parts, averaged over the tuning seeds. A configuration with a diverged seed is scored as
diverged and never picked. The test splits are not used.

A plain grid rather than a sampler: with 12 points per method the search is exhaustive and
cheap, every method gets exactly the same budget, and the full table of scores can be read.

A tune holds the lock of its output folder for its whole run; each configuration runs into
``<out>/grid/<method>/<index>`` under that lock, so no run or tune can write into the tree
meanwhile. A folder that holds an earlier tune's results is refused unless ``resume`` (keep
the finished cells of its configurations) or ``overwrite`` is set.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .experiment import (ConfigError, ExperimentConfig, Interrupted, check_json_mapping,
                         claim_output, output_files, plan, progress_bar, run_planned)
from .report import atomic_write, write_json

_LR_SGD = (0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)
_LR_ADAM = (1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2)
_LR_REG = (0.01, 0.03, 0.1)
#: CLASSP's relative threshold in the grid: the recommended value (docs/RESULTS.md, "Relative
#: against absolute threshold on every stream")
RELATIVE_THRESHOLD = 0.5


def _classp_grid() -> list[dict]:
    scaled = [{"lr": lr, "threshold": thr, "relative_threshold": 0.0, "power": p,
               "apply_scaling": True}
              for lr, thr, p in itertools.product((0.03, 0.1), (0.0, 1e-4), (1.0, 2.0))]
    # the unitless sparsity setting at its recommended value
    relative = [{"lr": lr, "threshold": 0.0, "relative_threshold": RELATIVE_THRESHOLD,
                 "power": 1.0, "apply_scaling": True} for lr in (0.03, 0.1)]
    # without scaling the step is lr * g whatever the power (only the accumulator differs)
    unscaled = [{"lr": lr, "threshold": 0.0, "relative_threshold": 0.0, "power": 1.0,
                 "apply_scaling": False} for lr in (0.03, 0.1)]
    return scaled + relative + unscaled


def _classp_mas_grid() -> list[dict]:
    # CLASSP's scaled settings at threshold 0 (the optimizer part) times MAS's penalty strength
    return [{"lr": lr, "threshold": 0.0, "relative_threshold": 0.0, "power": p,
             "apply_scaling": True, "lam": lam}
            for lr, p, lam in itertools.product((0.03, 0.1), (1.0, 2.0), (0.1, 1.0, 10.0))]


#: The configurations searched per method (overrides of the method's defaults).
GRIDS: dict[str, list[dict]] = {
    "sgd": [{"lr": lr} for lr in _LR_SGD],
    "adam": [{"lr": lr} for lr in _LR_ADAM],
    "adagrad": [{"lr": lr} for lr in _LR_SGD],
    "classp": _classp_grid(),
    "ewc": [{"lr": lr, "lam": lam} for lr in _LR_REG for lam in (1.0, 10.0, 100.0, 1000.0)],
    "online-ewc": [{"lr": lr, "lam": lam} for lr in _LR_REG for lam in (1.0, 10.0, 100.0, 1000.0)],
    "mas": [{"lr": lr, "lam": lam} for lr in _LR_REG for lam in (0.1, 1.0, 10.0, 100.0)],
    "classp+mas": _classp_mas_grid(),
}
GRID_SIZE = 12
TUNING_SEEDS = (1000, 1001)
VALIDATION = 0.2


def _score(summary: dict) -> Optional[float]:
    """Mean final average validation accuracy, or None if any seed diverged."""
    return None if summary["diverged"] else summary["avg_acc"]["mean"]


def _point_config(config: ExperimentConfig, method: str, index: int,
                  point: Mapping) -> ExperimentConfig:
    return replace(config, methods=(method,), hparams={method: dict(point)},
                   out=str(Path(config.out) / "grid" / method / str(index)),
                   plots=False, progress=False)


def _setting(hparams: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in hparams.items())


def _table(trials: Mapping[str, list[dict]]) -> str:
    lines = ["| method | configuration | validation avg acc | diverged | picked |",
             "|---|---|---|---|---|"]
    for method, rows in trials.items():
        for row in rows:
            setting = _setting(row["hparams"])
            score = "—" if row["score"] is None else f"{row['score']:.3f} ± {row['std']:.3f}"
            diverged = row["diverged"] or "—"
            lines.append(f"| {method} | {setting} | {score} | {diverged} |"
                         f" {'yes' if row['picked'] else ''} |")
    return "\n".join(lines)


def tune(config: ExperimentConfig, run_options: Optional[Mapping[str, Any]] = None,
         grids: Mapping[str, Sequence[Mapping]] = GRIDS) -> dict:
    """Search each method's grid on one benchmark; write and return the tuned run config.

    ``config`` names one benchmark, the methods (default: every method with a grid), the
    tuning seeds and the protocol; ``validation`` defaults to VALIDATION. The result is written
    to ``<out>/tuned.json`` (a config ``classp-fused run --config`` takes: the protocol, the
    picked hyperparameters, ``run_options`` such as data directories, and a ``tuning`` record
    with every configuration's score) and ``<out>/tuning.md``. Raises ConfigError before
    writing anything for what ``run_experiment`` refuses, over the whole tree of the tune.
    """
    if len(config.benchmarks) != 1:
        raise ConfigError(f"tune: expected one benchmark, got {len(config.benchmarks)}")
    methods = tuple(config.methods) if config.methods is not None else tuple(grids)
    untuned = [m for m in methods if m not in grids]
    if untuned:
        raise ConfigError(f"tune: no grid for method {untuned[0]!r}"
                          f" (grids exist for {', '.join(grids)})")
    if config.hparams:
        raise ConfigError("tune: hparams are what it searches; give none")
    run_options = {} if run_options is None else run_options
    check_json_mapping("run_options", run_options)
    config = replace(config, methods=methods,
                     validation=VALIDATION if config.validation is None else config.validation)
    points = []
    for method in methods:
        for index, point in enumerate(grids[method]):
            point_config = _point_config(config, method, index, point)
            points.append((method, index, point, point_config, *plan(point_config)))
    out = Path(config.out)
    files = [out / "tuned.json", out / "tuning.md"]
    for *_, point_config, cells, _dirs in points:
        files += output_files(point_config, cells)
    lock = claim_output(config, files)
    benchmark = config.benchmarks[0]
    trials: dict[str, list[dict]] = {m: [] for m in methods}
    try:
        with progress_bar(len(points), "config", config.progress) as bar:
            for number, (method, index, point, point_config, cells, dirs) in enumerate(points, 1):
                label = f"{benchmark} {method} {index + 1}/{len(grids[method])}"
                bar.set_description(label)
                try:
                    result = run_planned(point_config, cells, dirs)
                except Interrupted:
                    raise Interrupted(sum(len(t) for t in trials.values()) * len(config.seeds),
                                      out) from None
                summary = result.results[benchmark]["methods"][method]
                trials[method].append({
                    "hparams": dict(point), "score": _score(summary),
                    "std": summary["avg_acc"]["std"],
                    "diverged": (f"{len(summary['diverged'])}/{len(summary['seeds'])}"
                                 if summary["diverged"] else None),
                    "picked": False})
                if config.progress:
                    score = trials[method][-1]["score"]
                    outcome = (f"diverged {trials[method][-1]['diverged']}" if score is None
                               else f"validation avg acc {score:.3f}")
                    bar.write(f"[{number}/{len(points)}] {label} ({_setting(point)}): {outcome}",
                              file=sys.stderr)
                bar.update()
        picked = {}
        for method, rows in trials.items():
            scored = [row for row in rows if row["score"] is not None]
            if scored:
                best = max(scored, key=lambda row: row["score"])
                best["picked"] = True
                picked[method] = best["hparams"]
        tuned = {"benchmark": [benchmark], "methods": list(methods), "scenario": config.scenario,
                 **{k: v for k, v in (("epochs", config.epochs and list(config.epochs)),
                                      ("batch_size", config.batch_size),
                                      ("max_per_task", config.max_per_task)) if v is not None},
                 **dict(run_options), "hparams": picked,
                 "tuning": {"seeds": list(config.seeds), "validation": config.validation,
                            "criterion": "final average accuracy on the held-out validation"
                                         " part of each task's training data, mean over seeds",
                            "untuned": [m for m in methods if m not in picked],
                            "trials": trials}}
        write_json(out / "tuned.json", tuned)
        atomic_write(out / "tuning.md", (_table(trials) + "\n").encode())
    finally:
        lock.release()
    return tuned
