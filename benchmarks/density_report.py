"""The "Step cost against update density" section of RESULTS.md, from the JSON of
benchmarks/density_curve.py (``benchmarks/density_cpu.json``), with what the CPU kernel does
(and what was tried) and what the GPU kernels write, which no run here has measured."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .gpu_report import fmt_time

COMMAND = ".venv/bin/python -m benchmarks.density_curve --baseline OTHER/_C.so"
DENSE, NONE = "dense", "none selected"

CPU_KERNEL = """\
The CPU kernel (`csrc/classp_cpu.cpp`) writes nothing for a block (one vector of params: 8 fp32
with AVX2) with no element selected: its stores go to a scratch block of the thread's, picked by
conditional moves, with no branch on the selection; a block with some selected is stored whole,
its unselected elements with their old bits, and one with all of them without the blend. The
kernel before (7f2205b) branched on whether a block had a selected element, a branch the CPU
mispredicts most between about 5% and 50% random density: at 10% random the step took 2.1x (2
threads) to 2.6x (1 thread) the dense step's time. Tried here and dropped (AMD EPYC, Zen 3,
AVX2; 1 thread, CPU time, 2026-12-05): AVX2 masked stores (`vmaskmovps`, `_mm256_maskstore_ps`)
for params and accumulators made the step 2.5x slower at every density (14 ms against 5.3-5.7
ms); loading param and accumulator only for blocks with a selected element (their addresses
chosen from the gradient, the prefetches left to the hardware) made a 1% random step 3x slower
(15 ms). At 1% and below the step costs what reading param, gradient and accumulator costs
(12 of a dense step's 20 bytes per element): in the runs of 2026-12-05 the empty selection's
step took 0.88-0.90x the dense one's time with 2 threads and about the same time with 1, so no
write-side change brings a 1% step under about 0.9x the dense one on this machine.
"""

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
        return lines + ["Not measured yet (`benchmarks/density_curve.py`).", "", CPU_KERNEL,
                        GPU_KERNELS]
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
        "rounds.", "", CPU_KERNEL]
    for run in data["runs"]:
        threads = f"{run['threads']} thread{'s' if run['threads'] > 1 else ''}"
        lines += [f"**{threads}, {run['clock']}, {run['rounds']} rounds.**", "",
                  *key_figures(run), "", *table(run, data["cases"]), ""]
    return lines + [GPU_KERNELS]
