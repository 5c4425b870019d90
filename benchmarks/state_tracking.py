"""How closely compressed CLASSP accumulators track the exact one over a long run.

An MLP (64-256-256-10) trains with CLASSP (fp32 state) on the class-incremental split-digits
stream (5 tasks of 2 classes, scikit-learn's 8x8 digits, 2,000 steps per task, batch 32): the
later classes' output rows get their first gradients thousands of steps in, and gradients
shrink by decades as each task is fitted. At every step the gradient of all parameters, as one
flat vector, also steps shadow accumulators in the bf16 and 8-bit formats
(``classp_fused.state_formats``) through the reference step with the same selection, so the
three accumulators see identical increments. Printed per format: the ratio of the mean
compressed accumulator to the mean exact one, quantiles of the per-element ratio, and the
fraction of elements stalled (below half the exact value), over all updated elements and over
those whose first update came after the first task.

    python -m benchmarks.state_tracking [--steps-per-task 2000] [--power 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from classp_fused import CLASSP
from classp_fused.backends.step_spec import CompressedState
from classp_fused.reference import classp_step_
from classp_fused.state_formats import num_blocks, tensor_key

FORMATS = {"bf16": torch.bfloat16, "8bit": torch.uint8}


def digits_tasks(seed: int = 0):
    """Five (inputs, labels) training tasks of two digit classes each, inputs scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return [(x[(y == 2 * t) | (y == 2 * t + 1)], y[(y == 2 * t) | (y == 2 * t + 1)])
            for t in range(5)]


def track(steps_per_task: int, power: float, lr: float, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    params = list(model.parameters())
    opt = CLASSP(params, lr=lr, power=power)
    numel = sum(p.numel() for p in params)
    exact = torch.zeros(numel)
    first_update = torch.full((numel,), -1, dtype=torch.int64)
    shadows = {name: torch.zeros(numel, dtype=dtype) for name, dtype in FORMATS.items()}
    scales = torch.zeros(num_blocks(numel))
    shadow_params = {name: torch.zeros(numel) for name in FORMATS}
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for inputs, labels in digits_tasks(seed):
        for _ in range(steps_per_task):
            batch = torch.randint(len(labels), (32,), generator=generator)
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            selected = torch.isfinite(flat) & (flat * flat > 0)
            exact += torch.where(selected, flat.abs() ** power, 0.0)
            first_update[selected & (first_update < 0)] = step
            keys = tensor_key(seed, torch.tensor([float(step)]))
            for name in FORMATS:
                compressed = CompressedState([scales if name == "8bit" else None], keys, [0])
                classp_step_([shadow_params[name]], [flat], [shadows[name]], lr=lr,
                             threshold=0.0, eps=1e-5, power=power, apply_scaling=True,
                             compressed=compressed)
            opt.step()
            step += 1
    from classp_fused.state_formats import decode
    values = {"bf16": shadows["bf16"].float(), "8bit": decode(shadows["8bit"], scales)}
    updated = first_update >= 0
    late = first_update >= steps_per_task
    report = {"steps": step, "power": power, "lr": lr, "elements": numel,
              "updated": int(updated.sum()), "late": int(late.sum()), "formats": {}}
    for name, value in values.items():
        entry = {}
        for label, where in (("all", updated), ("late", late)):
            ratio = value[where] / exact[where]
            step_ratio = ((1e-5 + value[where]) / (1e-5 + exact[where])) ** (-1 / power)
            entry[label] = {
                "step_size_quantiles": {q: float(step_ratio.quantile(q))
                                        for q in (0.001, 0.01, 0.5, 0.99, 0.999)},
                "step_size_off_2x": float(((step_ratio > 2) | (step_ratio < 0.5)).float().mean()),
                "mean_ratio": float(value[where].mean() / exact[where].mean()),
                "quantiles": {q: float(ratio.quantile(q)) for q in (0.01, 0.5, 0.99)},
                "stalled": float((ratio < 0.5).float().mean()),
                "zero": int((value[where] == 0).sum()),
            }
        report["formats"][name] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-task", type=int, default=2000)
    parser.add_argument("--power", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--json", help="also write the reports to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reports = []
    for power in args.power:
        start = time.perf_counter()
        report = track(args.steps_per_task, power, args.lr)
        report["seconds"] = round(time.perf_counter() - start, 1)
        reports.append(report)
        print(f"power {power}: {report['steps']} steps, {report['updated']} of "
              f"{report['elements']} elements updated, {report['late']} first after task 1 "
              f"({report['seconds']} s)")
        print("| format | elements | mean A / exact | A ratio q01 | median | q99 | A < 0.5x exact "
              "| read as 0 | step size ratio q001 | q01 | q99 | q999 | step size off > 2x |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, entry in report["formats"].items():
            for label, stats in entry.items():
                q = stats["quantiles"]
                print(f"| {name} | {label} | {stats['mean_ratio']:.4f} | {q[0.01]:.3f} | "
                      f"{q[0.5]:.3f} | {q[0.99]:.3g} | {stats['stalled']:.2%} | "
                      f"{stats['zero']} | " + " | ".join(
                          f"{stats['step_size_quantiles'][k]:.3f}"
                          for k in (0.001, 0.01, 0.99, 0.999))
                      + f" | {stats['step_size_off_2x']:.3%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main()
