"""The "Step cost against update density" section of RESULTS.md, from the JSON of
benchmarks/density_curve.py (``benchmarks/density_cpu.json``); with no JSON only what the GPU
kernels do, which no run here has measured."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .gpu_report import fmt_time

COMMAND = ".venv/bin/python -m benchmarks.density_curve --baseline OTHER/_C.so"
DENSE, NONE = "dense", "none selected"

GPU_KERNELS = """\
GPU kernels (read, not measured: there is no GPU here, and their density curve is still to be
taken). Both already leave unselected memory unwritten at 32-byte-sector granularity or finer,
and were not changed. `csrc/classp_cuda.cu` updates 128-bit packs (4 fp32, 8 bf16/fp16 or 2
fp64 params) without branches on the elements and stores a pack back, params and accumulators,
only when one of its elements was selected, the unselected ones with the bits just read; so a
written param word is 16 bytes, a written accumulator word 16 bytes (32 for 16-bit params: 8
fp32), and the scalar tail stores per element. The Triton kernel
(`classp_fused/backends/triton.py`, `_update_block`) masks its stores per row of 32 bytes of
params (8 fp32 or 16 bf16/fp16 elements): a row with a selected element is written whole,
others not at all; the accumulator row is 32 bytes for fp32 params and 64 bytes (two sectors)
for 16-bit params, the one place where a sector with no selected element can be rewritten (with
its own values) beside one that has.
"""


def min_ratio(samples: dict, name: str, reference: str) -> float:
    return min(samples[name]) / min(samples[reference])


def median_ratio(samples: dict, name: str, reference: str) -> float:
    return statistics.median(t / r for t, r in zip(samples[name], samples[reference]))


def key_figures(run: dict) -> list[str]:
    """The 1% steps against the empty and the dense one, and the dense step across builds."""
    builds = run["builds"]
    lines = []
    for build in builds:
        s = build["samples"]
        for mask in ("random", "clustered"):
            name = f"{mask} 1.0%"
            if name in s:
                lines.append(f"- {build['label']}, {mask} 1%: **{min_ratio(s, name, NONE):.2f}x**"
                             f" the empty selection's step, **{min_ratio(s, name, DENSE):.2f}x** "
                             f"the dense one (min times)")
    if len(builds) == 2:
        before, after = (b["samples"] for b in builds)
        lines.append(f"- dense step, {builds[1]['label']} over {builds[0]['label']}: "
                     f"**{min(after[DENSE]) / min(before[DENSE]):.2f}x** (min times; "
                     f"{fmt_time(min(before[DENSE]))} and {fmt_time(min(after[DENSE]))})")
    return lines


def table(run: dict, cases: list) -> list[str]:
    """A row per case: per build its min time and its ratios to the dense and empty steps."""
    builds = run["builds"]
    head = "| case | selected |"
    rule = "|---|---|"
    for build in builds:
        head += f" {build['label']}: min | x dense (median) | x none |"
        rule += "---|---|---|"
    if len(builds) == 2:
        head += " after / before (min) |"
        rule += "---|"
    rows = [head, rule]
    selected = {case["name"]: f"{case['selected']:,}" for case in cases}
    for name in builds[0]["samples"]:
        row = f"| {name} | {selected.get(name, '-')} |"
        for build in builds:
            s = build["samples"]
            row += (f" {fmt_time(min(s[name]))} | {min_ratio(s, name, DENSE):.2f} "
                    f"({median_ratio(s, name, DENSE):.2f}) | {min_ratio(s, name, NONE):.2f} |")
        if len(builds) == 2:
            row += f" {min(builds[1]['samples'][name]) / min(builds[0]['samples'][name]):.2f} |"
        rows.append(row)
    return rows


def section(path: Path) -> list[str]:
    """The section's markdown lines: the method, the machine's load, key figures and the table;
    the GPU kernels' write granularity."""
    lines = ["### Step cost against update density (CPU)", ""]
    if not path.exists():
        return lines + ["Not measured yet (`benchmarks/density_curve.py`).", "", GPU_KERNELS]
    data = json.loads(path.read_text())
    load = data["load"]
    machine = data["machine"]
    lines += [
        f"`{COMMAND}`: the op step of the cpp backend (`classp_step_`, power 1, threshold 1) on "
        "1e7 fp32 elements in one tensor whose fresh gradients select exactly the given share "
        "of the elements, at random positions or in whole rows of 1,000 (clustered), and the "
        "read-only floor (`torch.sum` of param, gradient and accumulator: what a step reads, "
        "nothing written); benchmarks/density_cases.py builds them, "
        "benchmarks/bench_density.py times the same cases under pytest-benchmark. Each build "
        "of the extension runs in a process of its own, on the same data; every round times "
        "every case of every build once, in turn. Other jobs share the machine's 2 cores, so "
        "the ratios are taken from the min over rounds (the least disturbed runs): **x dense** "
        "and **x none** are a case's min time over the min time of the same build's dense "
        "step and empty-selection step, with the median over rounds of the per-round ratio to "
        "the dense step in parentheses. The curve is taken with 2 threads in wall time, which "
        "another job's thread on either core delays, and with 1 thread in the stepping "
        "thread's CPU time, which descheduling does not inflate (memory contention still "
        "counts).", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}; run "
        f"{data['datetime'][:16].replace('T', ' ')} UTC, {data['wall_s'] / 60:.1f} min. "
        f"Load: `{load['start']}` at the start, `{load['end']}` at the end; 1-minute load "
        f"average {min(load['one_minute']):.2f} to {max(load['one_minute']):.2f} over the "
        "rounds.", ""]
    for run in data["runs"]:
        threads = f"{run['threads']} thread{'s' if run['threads'] > 1 else ''}"
        lines += [f"**{threads}, {run['clock']}, {run['rounds']} rounds.**", "",
                  *key_figures(run), "", *table(run, data["cases"]), ""]
    return lines + [GPU_KERNELS]
