"""The "Bounded temporaries" section of RESULTS.md, from the JSON of
benchmarks/bench_bounded_memory.py (``benchmarks/bounded_memory_cpu.json``); none without it."""
from __future__ import annotations

import json
from pathlib import Path

from .gpu_report import fmt_time

COMMAND = (".venv/bin/python -m pytest benchmarks/bench_bounded_memory.py "
           "--benchmark-json=benchmarks/bounded_memory_cpu.json")
CASES = {"foreach-step": ('`CLASSP(backend="foreach").step()`', "fused Adagrad"),
         "add_penalty_grad_": ("`add_penalty_grad_`", "`torch._foreach_add_`"),
         "proximal_step_": ("`proximal_step_`", "`torch._foreach_add_`")}


def section(path: Path) -> list[str]:
    """The section's markdown lines: the method, the machine's load and one row per case."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = [bench["extra_info"] for bench in data["benchmarks"]]
    loads = [row["load_average"] for row in rows]
    device = data["machine_info"].get("bench_device", {})
    lines = [
        "### Bounded temporaries (CPU, pure-PyTorch paths)", "",
        f"`{COMMAND}`: the `foreach` backend's step against `torch.optim.Adagrad(fused=True)`, "
        "and the penalty's gradient and proximal step (`classp_fused.regularizers.penalty`) "
        "against `torch._foreach_add_(grads, params)`, on 1e7 fp32 parameters. Each round times "
        "the peer on tensors of its own, then the case; **ratio** is the median of the "
        f"{rows[0]['rounds']} per-round ratios, with their range. **peak extra** is the most "
        "memory one call allocates (torch.profiler's allocation events), and its share of the "
        "params' bytes. The step this replaced flattened every tensor into new buffers: 74x "
        "fused Adagrad's time and 440 MB of temporaries at 1e7 in one tensor (the "
        "`classp/foreach` rows below, run of 2026-11-30).", "",
        f"Machine: {device.get('name', '?')}; torch {device.get('torch', '?')}; run "
        f"{data['datetime'][:16].replace('T', ' ')} UTC. The machine was shared and loaded: "
        f"1-minute load average {min(loads):.1f} to {max(loads):.1f} on its 2 cores during the "
        "run, which slows a peer's many thread-pool forks and joins (200 tensors on 2 threads) "
        "more than the chunked passes, whose ops stay on one thread.", "",
        "| case | peer | layout | threads | median | peer median | ratio (range) | "
        "peak extra |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name, peer = CASES[row["case"]]
        layout = "1 tensor" if row["tensors"] == 1 else f"{row['tensors']} tensors"
        lines.append(
            f"| {name} | {peer} | {layout} | {row['threads']} | {fmt_time(row['median_s'])} | "
            f"{fmt_time(row['peer_median_s'])} | **{row['ratio_median']:.2f}x** "
            f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | {row['peak_extra_mb']:.2f} MB "
            f"({row['peak_extra_fraction']:.1%}) |")
    return lines + [""]
