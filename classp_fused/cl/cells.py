"""Cell files: the stored result of one (benchmark, method, seed) run, and what ``resume``
requires of one before it reuses it instead of running the cell again.

A stored cell is reused only if it is a JSON object with exactly the keys a run writes; it
names the expected benchmark, method and seed and was run with the same settings on the same
tasks; its accuracy matrix has a row of finite accuracies in [0, 1] per finished task (every
task, or the tasks before a recorded divergence); and its times, byte counts, unstable tasks
and update densities are well-formed. ``cell_problem`` says what is wrong, else None.
"""
from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .report import MAX_NESTING, nesting

CELL_KEYS = frozenset({"benchmark", "method", "seed", "settings", "tasks", "acc_matrix",
                       "diverged", "unstable_tasks", "seconds", "cpu_seconds",
                       "peak_rss_delta_bytes", "state_bytes", "update_density"})
STOP_KEYS = frozenset({"task", "epoch", "step", "what"})
#: What a divergence records as non-finite (classp_fused.cl.train.Diverged).
NONFINITE = ("loss", "parameter")
#: A cell file is a few kilobytes; a larger one is not read.
MAX_CELL_BYTES = 16 * 2 ** 20


def _show(value: Any) -> str:
    return reprlib.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_fraction(value: Any) -> bool:
    return _is_real(value) and 0.0 <= value <= 1.0


def read_cell(path: Path) -> tuple[Any, Optional[str]]:
    """The parsed JSON of ``path`` and None, or None and why it cannot be read."""
    try:
        size = path.stat().st_size
        if size > MAX_CELL_BYTES:
            return None, f"{size} bytes, more than a cell file holds ({MAX_CELL_BYTES})"
        text = path.read_bytes().decode()
    except OSError as exc:
        return None, f"cannot read it ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        stored = json.loads(text)
    except RecursionError:
        return None, f"JSON nested deeper than {MAX_NESTING} levels"
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if nesting(stored) > MAX_NESTING:
        return None, f"JSON nested deeper than {MAX_NESTING} levels"
    return stored, None


def _settings_problem(stored: Any, settings: Mapping[str, Any]) -> Optional[str]:
    if not isinstance(stored, dict):
        return f"settings is {_show(stored)}, expected an object"
    differ = sorted(k for k in {*stored, *settings} if stored.get(k) != settings.get(k))
    return f"run with other settings ({', '.join(differ)})" if differ else None


def _stop_problem(stop: Any, tasks: int, epochs: Sequence[int]) -> Optional[str]:
    """What is wrong with a recorded divergence (task, epoch, step, what), else None."""
    if not (isinstance(stop, dict) and set(stop) == STOP_KEYS):
        return f"diverged is {_show(stop)}, expected null or {{{', '.join(sorted(STOP_KEYS))}}}"
    task, epoch = stop["task"], stop["epoch"]
    if not (_is_count(task) and task < tasks):
        return f"diverged.task is {_show(task)}, expected a task index below {tasks}"
    limit = epochs[min(task, len(epochs) - 1)]
    if not (_is_count(epoch) and epoch < limit):
        return f"diverged.epoch is {_show(epoch)}, expected an epoch index below {limit}"
    if not _is_count(stop["step"]):
        return f"diverged.step is {_show(stop['step'])}, expected a step index"
    if stop["what"] not in NONFINITE:
        return f"diverged.what is {_show(stop['what'])}, expected one of {', '.join(NONFINITE)}"
    return None


def _matrix_problem(matrix: Any, rows: int, tasks: int) -> Optional[str]:
    if not (isinstance(matrix, list) and len(matrix) == rows
            and all(isinstance(row, list) and len(row) == tasks for row in matrix)):
        return (f"acc_matrix is {_show(matrix)}, expected {rows} rows of {tasks} accuracies"
                " (one row per finished task)")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not _is_fraction(value):
                return f"acc_matrix[{i}][{j}] is {_show(value)}, expected an accuracy in [0, 1]"
    return None


def _measures_problem(stored: dict, rows: int, reports_density: bool) -> Optional[str]:
    unstable = stored["unstable_tasks"]
    if not (isinstance(unstable, list) and all(_is_count(t) and t < rows for t in unstable)
            and unstable == sorted(set(unstable))):
        return (f"unstable_tasks is {_show(unstable)}, expected increasing indices of the"
                f" {rows} finished tasks")
    for key in ("seconds", "cpu_seconds"):
        if not (_is_real(stored[key]) and stored[key] >= 0):
            return f"{key} is {_show(stored[key])}, expected a finite number >= 0"
    for key in ("peak_rss_delta_bytes", "state_bytes"):
        if not _is_count(stored[key]):
            return f"{key} is {_show(stored[key])}, expected a byte count"
    density = stored["update_density"]
    if reports_density and rows:
        if not (isinstance(density, list) and len(density) == rows
                and all(_is_fraction(d) for d in density)):
            return (f"update_density is {_show(density)}, expected {rows} fractions in [0, 1]"
                    " (one per finished task)")
    elif density is not None:
        return f"update_density is {_show(density)}, expected null (no CLASSP step ran)"
    return None


def cell_problem(stored: Any, identity: Mapping[str, Any], settings: Mapping[str, Any],
                 tasks: Callable[[], list[str]], reports_density: bool) -> Optional[str]:
    """Why ``stored`` (a parsed cell file) must not be reused, or None if it may be.

    ``identity`` holds the expected benchmark, method and seed, ``settings`` the run's cell
    settings (``epochs`` among them), ``tasks()`` the task names (called only once the cheaper
    checks pass), ``reports_density`` whether the method records CLASSP's update density.
    """
    if not isinstance(stored, dict):
        return f"expected a JSON object, got {type(stored).__name__}"
    if stored.keys() != CELL_KEYS:
        missing, extra = CELL_KEYS - stored.keys(), stored.keys() - CELL_KEYS
        return "; ".join(part for part in (
            missing and f"missing {', '.join(sorted(missing))}",
            extra and f"unexpected {', '.join(sorted(extra))}") if part)
    for key, expected in identity.items():
        if stored[key] != expected or type(stored[key]) is not type(expected):
            return f"{key} is {_show(stored[key])}, expected {expected!r}"
    problem = _settings_problem(stored["settings"], settings)
    if problem:
        return problem
    names = tasks()
    if stored["tasks"] != names:
        return f"tasks are {_show(stored['tasks'])}, expected {_show(names)}"
    stop = stored["diverged"]
    if stop is not None:
        problem = _stop_problem(stop, len(names), settings["epochs"])
        if problem:
            return problem
    rows = len(names) if stop is None else stop["task"]
    return (_matrix_problem(stored["acc_matrix"], rows, len(names))
            or _measures_problem(stored, rows, reports_density))
