"""Results over seeds: aggregation, JSON, CSV, a markdown table and PNG plots (Agg, no pyplot).

Every file is written atomically: a temporary file in the target's directory, then os.replace.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from matplotlib.figure import Figure

from .metrics import mean_std, sequence_metrics

#: JSON read from users (config files, --hparam values, stored cells) nests at most this deep.
MAX_NESTING = 32
SCALARS = ("avg_acc", "bwt", "forgetting", "own_acc", "state_bytes", "cpu_seconds", "seconds",
           "peak_rss_delta_bytes")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The file gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def nesting(value: Any, limit: int = MAX_NESTING) -> int:
    """How deep lists and dicts nest in ``value`` (a scalar is 0), counted up to ``limit + 1``.

    Iterative, so a value nested past the interpreter's recursion limit is measured too.
    """
    deepest, stack = 0, [(value, 0)]
    while stack and deepest <= limit:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(_json_safe(value), indent=1, allow_nan=False) + "\n").encode())


def _spread(per_seed: list) -> dict:
    if not per_seed:
        return {"mean": None, "std": None, "per_seed": []}
    mean, std = mean_std(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


def _summarize(runs: list[dict]) -> dict:
    """Metrics over the runs that finished; the diverged ones listed with where they stopped."""
    finished = [run for run in runs if not run.get("diverged")]
    rows = [{**sequence_metrics(run["acc_matrix"]), **run} for run in finished]
    summary = {"hparams": runs[0]["settings"]["hparams"],
               "seeds": [run["seed"] for run in runs],
               "finished_seeds": [run["seed"] for run in finished],
               "diverged": [{"seed": run["seed"], **run["diverged"]}
                            for run in runs if run.get("diverged")],
               "unstable": [{"seed": run["seed"], "tasks": run["unstable_tasks"]}
                            for run in runs if run.get("unstable_tasks")],
               "acc_matrix": _spread([row["acc_matrix"] for row in rows])}
    summary.update({key: _spread([row[key] for row in rows]) for key in SCALARS})
    densities = [run["update_density"] for run in finished if run["update_density"] is not None]
    if densities:
        summary["update_density"] = _spread(densities)
    return summary


def aggregate(cells: Iterable[dict]) -> dict[str, dict]:
    """Group cells by benchmark and method; mean, std and per-seed value of each metric.

    Returns {benchmark: {"tasks": [...], "settings": {...}, "methods": {method: {"hparams",
    "seeds", "finished_seeds", "diverged", "unstable", "acc_matrix", "avg_acc", "bwt",
    "forgetting", "own_acc", "state_bytes", "cpu_seconds", "seconds", "peak_rss_delta_bytes"
    [, "update_density"]}}}}. Each metric is {"mean", "std", "per_seed"} over the seeds that
    finished (``finished_seeds``; mean and std are None when none did); ``diverged`` lists the
    other seeds with the task, epoch and step where a loss or parameter became non-finite;
    ``unstable`` the seeds whose explicit penalty step was unstable after some tasks.
    "settings" is the benchmark's protocol (epochs, batch size, scenario, ...).
    """
    grouped: dict[str, dict[str, list[dict]]] = {}
    for cell in cells:
        grouped.setdefault(cell["benchmark"], {}).setdefault(cell["method"], []).append(cell)
    results = {}
    for benchmark, methods in grouped.items():
        summaries = {method: _summarize(runs) for method, runs in methods.items()}
        first = next(iter(methods.values()))[0]
        settings = {k: v for k, v in first["settings"].items() if k != "hparams"}
        results[benchmark] = {"tasks": first["tasks"], "settings": settings, "methods": summaries}
    return results


def diverged_count(summary: dict) -> str:
    """``"k/n"``: seeds that diverged out of seeds run."""
    return f"{len(summary['diverged'])}/{len(summary['seeds'])}"


def _where(stop: dict) -> str:
    return f"task {stop['task']} epoch {stop['epoch']} step {stop['step']} ({stop['what']})"


def write_csv(path: Path, results: dict) -> None:
    """One row per benchmark, method and seed (update_density: mean over tasks).

    A diverged seed has empty metrics and says where it stopped in ``diverged``.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["benchmark", "method", "seed", *SCALARS, "update_density", "diverged"])
    for benchmark, entry in results.items():
        for method, summary in entry["methods"].items():
            density = summary.get("update_density", {}).get("per_seed")
            for i, seed in enumerate(summary["finished_seeds"]):
                values = [summary[key]["per_seed"][i] for key in SCALARS]
                mean_density = sum(density[i]) / len(density[i]) if density else ""
                writer.writerow([benchmark, method, seed, *values, mean_density, ""])
            for stop in summary["diverged"]:
                writer.writerow([benchmark, method, stop["seed"], *[""] * len(SCALARS), "",
                                 _where(stop)])
    atomic_write(path, out.getvalue().encode())


def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n:.0f} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def _pm(stat: dict, digits: int = 3) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


TABLE_HEADER = ("| benchmark | method | n | avg acc | BWT | forgetting | own-task acc | state"
                " | CPU s | wall s | update density | diverged |")


def markdown_table(results: dict) -> str:
    """Mean ± std over the seeds that finished (n of them) per benchmark and method."""
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for benchmark, entry in results.items():
        for method, s in entry["methods"].items():
            density = "—"
            if "update_density" in s:
                per_task = s["update_density"]["mean"]
                density = f"{sum(per_task) / len(per_task):.3f}"
            diverged = f"diverged {diverged_count(s)}" if s["diverged"] else "—"
            lines.append(f"| {benchmark} | {method} | {len(s['finished_seeds'])} |"
                         f" {_pm(s['avg_acc'])} | {_pm(s['bwt'])} | {_pm(s['forgetting'])} |"
                         f" {_pm(s['own_acc'])} | {_bytes(s['state_bytes']['mean'])} |"
                         f" {_pm(s['cpu_seconds'], 1)} | {_pm(s['seconds'], 1)} | {density} |"
                         f" {diverged} |")
    return "\n".join(lines)


def divergence_line(results: dict) -> str:
    """One sentence naming every benchmark/method with diverged seeds, or saying none did."""
    parts = [f"{benchmark}/{method} {diverged_count(s)}"
             for benchmark, entry in results.items() for method, s in entry["methods"].items()
             if s["diverged"]]
    return "diverged: " + ", ".join(parts) if parts else "no cell diverged"


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def plot_accuracy_matrices(benchmark: str, entry: dict, path: Path) -> None:
    """One heatmap of the mean accuracy matrix per method."""
    methods = entry["methods"]
    cols = min(len(methods), 5)
    rows = math.ceil(len(methods) / cols)
    fig = Figure(figsize=(3.2 * cols + 1, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    t = len(entry["tasks"])
    image = None
    for ax, (method, summary) in zip(axes.flat, methods.items()):
        title = method + (f" (diverged {diverged_count(summary)})" if summary["diverged"] else "")
        ax.set_title(title, fontsize=10)
        matrix = summary["acc_matrix"]["mean"]
        if matrix is None:
            ax.text(0.5, 0.5, "diverged\non every seed", ha="center", va="center",
                    color="red", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        if t <= 10:
            for i in range(t):
                for j in range(t):
                    ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if matrix[i][j] < 0.6 else "black")
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after training task i")
        ax.set_xticks(range(t))
        ax.set_yticks(range(t))
    for ax in list(axes.flat)[len(methods):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy R[i][j]")
    fig.suptitle(f"{benchmark}: accuracy matrix (mean over seeds)")
    _save(fig, path)


def plot_task_accuracy(benchmark: str, entry: dict, path: Path) -> None:
    """Per task, its accuracy after each training stage, one line per method (± std band)."""
    tasks = entry["tasks"]
    fig = Figure(figsize=(3.2 * len(tasks) + 1.5, 3.2), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    stages = list(range(len(tasks)))
    for j, ax in enumerate(axes):
        for method, summary in entry["methods"].items():
            label = method + (f" (diverged {diverged_count(summary)})"
                              if summary["diverged"] else "")
            if summary["acc_matrix"]["mean"] is None:
                ax.plot([], [], linestyle="none", marker="x", color="red", label=label)
                continue
            mean = [row[j] for row in summary["acc_matrix"]["mean"]]
            std = [row[j] for row in summary["acc_matrix"]["std"]]
            line, = ax.plot(stages, mean, marker="o", markersize=3, label=label)
            ax.fill_between(stages, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.15,
                            color=line.get_color())
        ax.axvline(j, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"task {j}: {tasks[j]}", fontsize=9)
        ax.set_xlabel("after training task")
        ax.set_xticks(stages)
        ax.set_ylim(0.0, 1.02)
    axes[0].set_ylabel("test accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{benchmark}: accuracy of each task across the sequence")
    _save(fig, path)


def plot_paths(directory: Path, benchmark: str) -> tuple[Path, Path]:
    """The accuracy-matrix and task-accuracy plot files of ``benchmark`` in ``directory``."""
    return directory / f"{benchmark}-acc-matrix.png", directory / f"{benchmark}-task-accuracy.png"


def write_plots(results: dict, directory: Path) -> list[Path]:
    """Both plots for every benchmark; returns the files written."""
    paths = []
    for benchmark, entry in results.items():
        matrix_path, curves_path = plot_paths(directory, benchmark)
        plot_accuracy_matrices(benchmark, entry, matrix_path)
        plot_task_accuracy(benchmark, entry, curves_path)
        paths += [matrix_path, curves_path]
    return paths
