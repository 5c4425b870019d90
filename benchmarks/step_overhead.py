"""Host time of ``CLASSP.step()`` on many small tensors, against the bare op and torch's optimizers.

``python benchmarks/step_overhead.py [--device cpu|cuda] [--tensors 200] [--numel 500]``

Each repeat times every contender once, interleaved (best of ``--inner`` calls each), so a
change in the machine's load shows in all; the report gives per contender the median over
repeats and the median of its per-repeat ratio to the named peer, with the spread (min-max) of
that ratio. On CUDA the times are host times of eager calls (no synchronize in the loop), the
figure that decides whether a small step is launch-bound.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from classp_fused import CLASSP, available_backends
from classp_fused import _extension

LR = 1e-3


def make_params(tensors: int, numel: int, device: torch.device) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device).manual_seed(0)
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(numel, generator=generator, device=device))
        p.grad = torch.randn(numel, generator=generator, device=device)
        params.append(p)
    return params


def contenders(tensors: int, numel: int, device: torch.device) -> dict:
    """Zero-argument callables, each one step of an optimizer or of the bare op."""
    steps = {}
    for backend in available_backends(device):
        if backend in ("torch",) or (backend == "triton" and device.type == "cpu"):
            continue
        steps[f"classp/{backend}"] = CLASSP(make_params(tensors, numel, device), lr=LR,
                                            backend=backend).step
    if _extension.has_kernel("CUDA" if device.type == "cuda" else "CPU"):
        params = make_params(tensors, numel, device)
        grads = [p.grad for p in params]
        accs = [torch.zeros_like(p) for p in params]
        lr = torch.tensor(LR, dtype=torch.float64)

        def bare_op():
            torch.ops.classp_fused.classp_step_(params, grads, accs, lr, 0.0, 1e-5, 1.0, True,
                                               None, None, [], [], "none", 0.0, 0.0, [], [],
                                               None, [])
        steps["bare op"] = bare_op
    if device.type == "cpu":
        steps["adagrad/fused"] = torch.optim.Adagrad(make_params(tensors, numel, device), lr=LR,
                                                     fused=True).step
    steps["adagrad/foreach"] = torch.optim.Adagrad(make_params(tensors, numel, device), lr=LR,
                                                   foreach=True).step
    steps["adam/fused"] = torch.optim.Adam(make_params(tensors, numel, device), lr=LR,
                                           fused=True).step
    return steps


def best_of(fn, inner: int) -> float:
    best = float("inf")
    for _ in range(inner):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(device: str = "cpu", tensors: int = 200, numel: int = 500, repeats: int = 15,
            inner: int = 20) -> dict[str, list[float]]:
    """Per contender, its host time per step (seconds) in each repeat."""
    device = torch.device(device)
    steps = contenders(tensors, numel, device)
    for fn in steps.values():  # state creation, tables, compilation
        fn()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(best_of(fn, inner))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return times


def report(times: dict[str, list[float]], peers: tuple[str, ...]) -> list[str]:
    lines = []
    for name, values in times.items():
        line = f"{name:18s} {statistics.median(values) * 1e6:9.1f} us"
        for peer in peers:
            if peer in times and peer != name:
                ratios = [a / b for a, b in zip(values, times[peer])]
                line += (f"   {statistics.median(ratios):5.2f}x {peer} "
                         f"({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--numel", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = measure(args.device, args.tensors, args.numel, args.repeats)
    peers = ("bare op", "adagrad/fused") if args.device == "cpu" else ("bare op", "adam/fused")
    print(f"{args.tensors} tensors x {args.numel} elements on {args.device}, "
          f"{args.repeats} interleaved repeats (median, ratio range):")
    print("\n".join(report(times, peers)))


if __name__ == "__main__":
    main()
