"""The GPU section of RESULTS.md, from the GPU suite's JSON (benchmarks/gpu.py).

Without that file the section says plainly that no GPU figure has been measured yet.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

COMMAND = "python -m benchmarks --device cuda"
BASELINE = "adagrad/compiled"
HOST_BASELINE = "adam/fused"

NOT_MEASURED = f"""\
### GPU

**Not yet measured.** No GPU figure in this file has been measured: every kernel time, eager
and CUDA-graph step time, host time, GB/s and bandwidth fraction of the GPU suite is still to
be taken, and so are the speedups of a captured step and of
`torch.compile(mode="reduce-overhead")` that README.md names. Also unmeasured on a GPU: the
CUDA and Triton kernels with the fused MAS/EWC penalty (explicit and proximal) and with the
relative threshold's per-tensor gradient means, none of which has run on a GPU yet (CUDA is
compiled and its SASS read here, Triton run through its interpreter and compiled for sm_90),
and the foreach fallback's GPU chunk size. `benchmarks/gpu_check.sh` on
a CUDA machine builds the extension, runs the GPU tests and
`{COMMAND}`, whose JSON (`benchmarks/gpu_step_cuda.json`) fills this section.
"""

LEGEND = """\
- **kernel**: device time of the kernels and copies of one step (`torch.profiler`, CUDA
  activity, five steps after the timed rounds); **GB/s** and the bandwidth fractions use it.
- **eager**: back-to-back `step()` calls between CUDA events (host launch time included when
  the step is host-bound); **graph**: replays of the step captured in a CUDA graph; **host**:
  one `step()` call on an idle GPU, without waiting for its kernels.
- **of copy / of in-place**: GB/s over the copy (`a = b`) and in-place (`a += s*b`) bandwidth
  measured at the start of the same run.
- **kernel vs compiled Adagrad**: kernel time over that of `torch.compile`'d foreach Adagrad
  (same 20 B per fp32 element) on the same layout, from the medians of the same interleaved
  rounds; **host vs fused Adam**: host time over `torch.optim.Adam(fused=True, capturable=True)`'s.
"""


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_size(n: int) -> str:
    mantissa, exponent = f"{n:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _option(row: dict) -> str:
    """The case's option (an attached penalty, the relative threshold, compressed state), as
    a suffix of its implementation's name; none for rows of runs before options existed."""
    option = row.get("option", "")
    return f" ({option})" if option else ""


def _peer(rows, row, impl):
    for other in rows:
        if (other["impl"], other["size"], other["tensors"], other["dtype"]) == (
                impl, row["size"], row["tensors"], row["dtype"]):
            return other
    return None


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(run: dict) -> list[str]:
    bw = run["bandwidth"]
    copy, update = bw["copy_gbs_best"], bw["update_gbs_best"]
    lines = ["| size | layout | dtype | power | thr | impl | kernel | GB/s | of copy | of in-place "
             "| eager | graph | host | kernel vs compiled Adagrad | host vs fused Adam |",
             "|" + "---|" * 15]
    rows = run["rows"]
    for r in rows:
        kernel = r["kernel_s"]
        gbs = r["bytes_per_element"] * r["size"] / kernel / 1e9 if kernel else None
        base, host_base = _peer(rows, r, BASELINE), _peer(rows, r, HOST_BASELINE)
        graph = fmt_time(r["graph_s"]) if r["graph_s"] is not None else (
            "fails" if r["graph_error"] else "-")
        power = "-" if r["power"] is None else f"{r['power']:g}"
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        rates = ["-"] * 3 if gbs is None else [f"{gbs:.0f}", f"{gbs / copy:.0%}",
                                               f"{gbs / update:.0%}"]
        lines.append(
            f"| {fmt_size(r['size'])} | {r['tensors']} | {r['dtype']} | {power} | {threshold} | "
            f"`{r['impl']}`{_option(r)} | {fmt_time(kernel)} | {' | '.join(rates)} | "
            f"{fmt_time(r['eager_s'])} | {graph} | {fmt_time(r['host_s'])} | "
            f"{_ratio(kernel, base and base['kernel_s'])} | "
            f"{_ratio(r['host_s'], host_base and host_base['host_s'])} |")
    return lines


def section(path: Path) -> list[str]:
    """Markdown lines of the GPU section: the measured run at ``path``, or the notice."""
    if not path.is_file():
        return NOT_MEASURED.splitlines() + [""]
    run = json.loads(path.read_text())
    device, bw = run["device"], run["bandwidth"]
    lines = [f"### GPU ({device['name']})", "",
             f"Machine: {device['name']}; torch {device['torch']} (CUDA {device['cuda']}); "
             f"run {run['datetime']}; suite wall time {run['wall_s'] / 60:.1f} min. "
             f"Produced by `{COMMAND}` (`benchmarks/gpu.py`).", "",
             f"Bandwidth at the start of the run: copy {bw['copy_gbs_best']:.0f} GB/s, "
             f"in-place update {bw['update_gbs_best']:.0f} GB/s (best of {bw['repeats']}, "
             f"{bw['array_mb']:.0f} MB arrays).", "", LEGEND, *table(run), ""]
    failures = [f"- `{r['impl']}` {fmt_size(r['size'])} x {r['tensors']} {r['dtype']}: "
                f"{r['error'] or r['graph_error']}" for r in run["rows"]
                if r["error"] or r["graph_error"]]
    if failures:
        lines += ["Errors (step or graph capture):", "", *failures, ""]
    if run["skipped"]:
        lines += ["Not run (time budget or memory): " + ", ".join(run["skipped"]), ""]
    noise = [max(v) / min(v) for r in run["rows"] for v in [r["eager_s_rounds"]] if v]
    if noise:
        lines += [f"Noise: the largest/smallest eager step time over rounds has median "
                  f"{statistics.median(noise):.3f} and maximum {max(noise):.3f} across cases.",
                  ""]
    return lines
