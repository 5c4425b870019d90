"""Turn the step suite's pytest-benchmark JSON (one file per device) into RESULTS.md and plots.

Usage: ``python -m benchmarks.report [step_cpu.json ...]`` (default: every
``benchmarks/step_*.json``). Writes ``benchmarks/RESULTS.md`` and one
``benchmarks/step_bandwidth_<device>.png`` per device; the GPU section comes from the GPU
suite's ``benchmarks/gpu_step_cuda.json`` (benchmarks/gpu_report.py), the bounded-temporaries
section from ``benchmarks/bounded_memory_cpu.json`` (benchmarks/bounded_report.py), the density
section from ``benchmarks/density_cpu.json`` (benchmarks/density_report.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import bounded_report, density_report, gpu_report  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python -m benchmarks"
IMPL_ORDER = ("classp/cpp", "classp/cuda", "classp/triton", "classp/foreach", "classp/torch",
              "classp/torch+compile", "adagrad/fused", "adagrad/foreach", "adagrad/for-loop",
              "adam/fused")
FUSED_CLASSP = ("classp/cpp", "classp/cuda", "classp/triton")
KERNELS = ("copy", "triad", "update")
FAMILY_NAMES = {"classp": "CLASSP (fp32 accumulator)",
                "adagrad": "Adagrad (state in param dtype)",
                "adam": "Adam (two states in param dtype)"}

LEGEND = """\
- **backend**: `classp/<name>` is `CLASSP(..., backend=name).step()`; `classp/torch+compile` is
  the reference step function under `torch.compile` (compiled once per shape set, with
  inductor's caches disabled; its first call, compile included, is listed under the key
  ratios, and the first compile in the process also starts inductor's compile workers);
  `adagrad/fused|foreach|for-loop` is `torch.optim.Adagrad(fused=True | foreach=True |
  foreach=False)`; `adam/fused` is `torch.optim.Adam(fused=True)`, for scale.
- **layout**: one tensor, or 200 tensors of log-spaced sizes (three decades, shuffled) with the
  same total. **power**/**threshold** apply to CLASSP only; threshold 2.7 masks ~90% of the
  standard-normal gradient elements (`g*g > 2.7` passes 10%).
- **median**: median of the timed rounds of one `step()` (gradients populated once, the same
  every round; warm-up excluded; on a GPU the step is followed by a device synchronize). Each
  round follows a fused-Adagrad step on other tensors (below), so caches hold that step's data,
  as forward and backward leave them in training.
- **GB/s**: bytes-per-element model x elements / median; the model (below) counts the minimum
  dense traffic, read param + grad + state and write param + state, also for the masked case.
- **of BW**: GB/s over the best in-place update bandwidth (`a += s*b` on arrays far larger
  than the caches, the access pattern of an optimizer step) measured at the start of the same
  session. Copy and triad are reported STREAM-style, without their write-allocate traffic,
  and so read lower than what an in-place kernel reaches. Working sets that stay in the
  last-level cache can exceed 100%.
- **vs fused Adagrad**: median step time over that of `torch.optim.Adagrad(fused=True)` on
  tensors of its own with the same size, layout and dtype, timed in the same rounds (each round
  steps fused Adagrad, then the case), so a drift of the machine's bandwidth cancels; below 1
  is faster. The `adagrad/fused` row is paired with a second instance: its ratio shows the
  method's noise.
- **peak extra MB**: peak memory allocated during one step above what was allocated before it
  (CPU: allocation events of `torch.profiler` with `profile_memory=True`; GPU:
  `torch.cuda.max_memory_allocated`). A fused step allocates no parameter-sized temporaries.
- **Cases**: a subset of size x layout x dtype x power x threshold, listed per device under
  "Cases run" (the full backend list on the dense fp32 slice, narrower slices for bf16, power 2,
  masking and the largest size). The Triton backend runs on CPU only in its interpreter and is
  left out there.
- CPU runs use 2 threads (`torch.set_num_threads(2)`); compare ratios, which are taken in the
  same run, rather than absolute times across runs.
"""


def load(path: Path) -> dict:
    """One device's run: machine, bandwidth probes and one row per benchmark."""
    data = json.loads(path.read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "impl" not in info:
            continue
        rows.append({**info, "median_s": bench["stats"]["median"],
                     "rounds": bench["stats"]["rounds"]})
    rows.sort(key=lambda r: (slice_rank(r), r["tensors"], r["size"], IMPL_ORDER.index(r["impl"])))
    return {"device": data["machine_info"]["bench_device"], "datetime": data["datetime"],
            "bandwidth": data.get("classp_bandwidth", {}), "wall_s": data.get("classp_wall_s"),
            "rows": rows}


def hyper(r) -> tuple[float, float]:
    """(power, threshold) of a row; the peers count as the plain AdaGrad-like case (1, 0)."""
    return (1.0, 0.0) if r["power"] is None else (r["power"], r["threshold"])


def slice_rank(r) -> tuple[bool, ...]:
    """Table order: fp32 dense, masked, power 2, then bf16."""
    power, threshold = hyper(r)
    return r["dtype"] != "fp32", power != 1.0, threshold != 0.0


def fmt_size(n: int) -> str:
    mantissa, exponent = f"{n:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def layout(tensors: int) -> str:
    return "1 tensor" if tensors == 1 else f"{tensors} tensors"


def find(rows, impl, size, tensors=1, dtype="fp32", power=1.0, threshold=0.0):
    """The row of one case, or None; peers match whatever the power and threshold."""
    for r in rows:
        if (r["impl"], r["size"], r["tensors"], r["dtype"]) != (impl, size, tensors, dtype):
            continue
        if r["power"] is None or hyper(r) == (power, threshold):
            return r
    return None


def key_ratios(rows) -> list[str]:
    """The headline comparisons, for the fastest fused CLASSP backend present."""
    impls = {r["impl"] for r in rows}
    fused = next((impl for impl in FUSED_CLASSP if impl in impls), "classp/foreach")
    dense = [r for r in rows if r["dtype"] == "fp32" and hyper(r) == (1.0, 0.0)]
    sizes = sorted({r["size"] for r in dense})
    if not sizes:
        return []
    mid = 10**7 if 10**7 in sizes else sizes[-1]
    lines = []
    for size in dict.fromkeys((mid, sizes[-1])):
        for tensors in (1, 200):
            r = find(rows, fused, size, tensors)
            if r:
                lines.append(f"`{fused}` vs fused Adagrad, {fmt_size(size)}, {layout(tensors)}: "
                             f"**{r['ratio_to_baseline']:.2f}x** the time "
                             f"({fmt_time(r['median_s'])} vs {fmt_time(r['baseline_median_s'])}), "
                             f"{r['gbs']:.1f} GB/s = **{r['bandwidth_fraction']:.0%}** of the "
                             f"in-place bandwidth")
    r = find(rows, fused, mid)
    for other, name in (("classp/torch", "the eager reference"),
                        ("classp/torch+compile", "the torch.compile'd reference"),
                        ("classp/foreach", "the foreach backend")):
        o = find(rows, other, mid)
        if r and o and other != fused:
            lines.append(f"`{fused}` vs {name}, {fmt_size(mid)}, 1 tensor: "
                         f"**{o['median_s'] / r['median_s']:.1f}x** faster "
                         f"({fmt_time(r['median_s'])} vs {fmt_time(o['median_s'])}; "
                         f"peak extra {r['peak_extra_mb']:.1f} MB vs {o['peak_extra_mb']:.1f} MB)")
    for r in rows:
        if r["impl"] == "classp/torch+compile":
            lines.append(f"torch.compile'd reference, {fmt_size(r['size'])}: first call "
                         f"(compile included) {r['first_call_s']:.1f} s, then "
                         f"{fmt_time(r['median_s'])} per step")
    for label, dtype, power, threshold in (("bf16 params", "bf16", 1.0, 0.0),
                                           ("power 2", "fp32", 2.0, 0.0),
                                           ("threshold 2.7 (~90% masked)", "fp32", 1.0, 2.7)):
        r = find(rows, fused, mid, 1, dtype, power, threshold)
        if r:
            lines.append(f"`{fused}` with {label}, {fmt_size(mid)}: {fmt_time(r['median_s'])}, "
                         f"{r['ratio_to_baseline']:.2f}x fused Adagrad ({dtype})")
    return lines


def coverage(rows) -> list[str]:
    """Which implementations ran at which sizes, per layout, dtype, power and threshold."""
    slices = {}
    for r in rows:
        power, threshold = hyper(r)
        key = f"{layout(r['tensors'])}, {r['dtype']}, p={power:g}, thr={threshold:g}"
        slices.setdefault(key, {}).setdefault(r["size"], []).append(f"`{r['impl']}`")
    lines = []
    for key, by_size in slices.items():
        groups = {}
        for size, impls in sorted(by_size.items()):
            groups.setdefault(", ".join(impls), []).append(fmt_size(size))
        lines.append(f"- {key}: " + "; ".join(f"{', '.join(sizes)}: {impls}"
                                               for impls, sizes in groups.items()))
    return lines


def bytes_model(rows) -> list[str]:
    model = {family: {} for family in FAMILY_NAMES}
    for r in rows:
        model.setdefault(r["impl"].split("/")[0], {})[r["dtype"]] = r["bytes_per_element"]
    lines = ["| optimizer | fp32 params | bf16 params |", "|---|---|---|"]
    for family, by_dtype in model.items():
        if by_dtype:
                lines.append(f"| {FAMILY_NAMES[family]} | {by_dtype.get('fp32', '-')} | "
                         f"{by_dtype.get('bf16', '-')} |")
    return lines


def table(device: dict, rows) -> list[str]:
    lines = ["| device | torch | size | layout | dtype | power | threshold | backend | median | "
             "GB/s | of BW | vs fused Adagrad | peak extra MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        power = "-" if r["power"] is None else f"{r['power']:g}"
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(f"| {device['type']} | {device['torch']} | {fmt_size(r['size'])} | "
                     f"{layout(r['tensors'])} | {r['dtype']} | {power} | {threshold} | "
                     f"`{r['impl']}` | {fmt_time(r['median_s'])} | {r['gbs']:.3g} | "
                     f"{r['bandwidth_fraction']:.0%} | {r['ratio_to_baseline']:.2f} | "
                     f"{r['peak_extra_mb']:.1f} |")
    return lines


def bandwidth_line(bandwidth: dict) -> str:
    parts = []
    for when in ("start", "end"):
        probe = bandwidth.get(when)
        if probe:
            kernels = ", ".join(f"{name} {probe[f'{name}_gbs_best']:.1f} (median "
                                f"{probe[f'{name}_gbs_median']:.1f})" for name in KERNELS)
            parts.append(f"{when}: {kernels} GB/s")
    array_mb = next(iter(bandwidth.values()))["array_mb"] if bandwidth else 0
    return (f"Measured bandwidth (copy `a = b`, triad `a = b + s*c`, in-place update `a += s*b`), "
            f"best of 10 on {array_mb:.0f} MB arrays, at the session's " + "; ".join(parts) + ".")


def plot(run: dict, path: Path) -> None:
    """GB/s against size per backend, fp32 / power 1 / threshold 0, one panel per layout."""
    rows = [r for r in run["rows"] if r["dtype"] == "fp32" and hyper(r) == (1.0, 0.0)]
    layouts = sorted({r["tensors"] for r in rows})
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), sharey=True,
                             squeeze=False)
    start = run["bandwidth"].get("start")
    for ax, tensors in zip(axes[0], layouts):
        for impl in IMPL_ORDER:
            points = sorted((r["size"], r["gbs"]) for r in rows
                            if r["impl"] == impl and r["tensors"] == tensors)
            if points:
                style = "-o" if impl.startswith("classp") else "--s"
                ax.plot(*zip(*points), style, label=impl, markersize=4,
                        color=f"C{IMPL_ORDER.index(impl) % 10}")
        if start:
            for name, color in zip(KERNELS[::-1], ("k", "dimgray", "darkgray")):
                ax.axhline(start[f"{name}_gbs_best"], color=color, linewidth=0.8,
                           linestyle=":", label=f"{name} bandwidth")
        ax.set(xscale="log", yscale="log", xlabel="parameters (elements)",
               title=f"{layout(tensors)}, fp32, power 1, threshold 0")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes-per-element model / median step time)")
    labelled = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    axes[0][-1].legend(labelled.values(), labelled.keys(), fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Optimizer step throughput, {run['device']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def title(run: dict) -> str:
    device = run["device"]
    return "CPU" if device["type"] == "cpu" else f"GPU ({device['name']})"


def summary(run: dict) -> list[str]:
    """Machine, date, bandwidth and the key ratios of one device's run."""
    device = run["device"]
    threads = f", {device['threads']} threads" if device["type"] == "cpu" else ""
    wall = f"; suite wall time {run['wall_s'] / 60:.1f} min" if run["wall_s"] else ""
    return [f"### {title(run)}", "",
            f"Machine: {device['name']}{threads}; torch {device['torch']}; "
            f"run {run['datetime'][:16].replace('T', ' ')} UTC{wall}.", "",
            bandwidth_line(run["bandwidth"]), "",
            *[f"- {line}" for line in key_ratios(run["rows"])], ""]


def results(run: dict, plot_name: str) -> list[str]:
    """The plot, the coverage and the full table of one device's run."""
    return [f"## {title(run)} results", "", f"![GB/s against size]({plot_name})", "",
            "Cases run:", "", *coverage(run["rows"]), "", *table(run["device"], run["rows"]), ""]


def write(paths, out_md: Path = HERE / "RESULTS.md", plot_dir: Path = HERE,
          gpu_json: Path = HERE / "gpu_step_cuda.json",
          bounded_json: Path = HERE / "bounded_memory_cpu.json",
          density_json: Path = HERE / "density_cpu.json") -> None:
    """Write the markdown report and one plot per device from the CPU suite's JSON files at
    ``paths``, with the GPU suite's section from ``gpu_json``, the bounded-temporaries section
    from ``bounded_json`` and the density section from ``density_json``."""
    runs = sorted((load(Path(p)) for p in paths), key=lambda run: run["device"]["type"] != "cpu")
    lines = ["# CLASSP step benchmarks", "",
             f"Produced by `{COMMAND}` (pytest-benchmark suite `benchmarks/bench_step.py`, "
             f"report `benchmarks/report.py`); raw data in `benchmarks/step_<device>.json`.", "",
             "## Summary", ""]
    for run in runs:
        lines += summary(run)
    lines += gpu_report.section(gpu_json)
    lines += bounded_report.section(bounded_json)
    lines += density_report.section(density_json)
    lines += ["## How to read the tables", "", LEGEND, "Bytes per element of the traffic model:",
              "", *bytes_model([r for run in runs for r in run["rows"]]), ""]
    for run in runs:
        plot_name = f"step_bandwidth_{run['device']['type']}.png"
        plot(run, plot_dir / plot_name)
        lines += results(run, plot_name)
    out_md.write_text("\n".join(lines))


if __name__ == "__main__":
    write(sys.argv[1:] or sorted(HERE.glob("step_*.json")))
