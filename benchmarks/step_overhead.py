"""Host time of ``CLASSP.step()`` on many small tensors, against the bare op and torch's optimizers.

``python benchmarks/step_overhead.py [--device cpu|cuda] [--tensors 200] [--total 100000]``

``--tensors`` tensors of log-spaced sizes (three decades, ``step_cases.tensor_sizes``) with
``--total`` elements in all. Each repeat times every contender once, interleaved (best of
``--inner`` calls each), so a change in the machine's load shows in all; the report gives per
contender the median over repeats and the median of its per-repeat ratio to the named peers,
with the spread (min-max) of that ratio. ``+ MAS`` is the step with a MAS regularizer attached
(explicit penalty, every tensor covered), against ``bare op + penalty``, the op on the same lists
with the importances and anchors. On CUDA the times are host times of eager calls (no
synchronize in the loop), the figure that decides whether a small step is launch-bound.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from classp_fused import CLASSP, MAS, available_backends
from classp_fused import _extension
from step_cases import tensor_sizes

LR = 1e-3
LAM = 1.0


def make_params(sizes: list[int], device: torch.device) -> list[nn.Parameter]:
    generator = torch.Generator(device).manual_seed(0)
    params = []
    for numel in sizes:
        p = nn.Parameter(torch.randn(numel, generator=generator, device=device))
        p.grad = torch.randn(numel, generator=generator, device=device)
        params.append(p)
    return params


def penalty_terms(params: list[nn.Parameter]) -> tuple[list, list]:
    """Importances in [0, 1) and anchors near the params."""
    return ([torch.rand_like(p) for p in params],
            [p.detach() + 0.01 * torch.randn_like(p) for p in params])


def attached_step(sizes: list[int], device: torch.device, backend: str):
    """``CLASSP.step`` with a MAS regularizer attached whose state covers every param."""
    model = nn.ParameterList(make_params(sizes, device))
    names = [name for name, _ in model.named_parameters()]
    importances, anchors = penalty_terms(list(model))
    mas = MAS(model, lam=LAM)
    mas.load_state_dict({"method": "MAS", "tasks_seen": 1,
                         "importance": dict(zip(names, importances)),
                         "anchor": dict(zip(names, anchors)), "residual": {}})
    optimizer = CLASSP(model.parameters(), lr=LR, backend=backend)
    mas.attach(optimizer)
    return optimizer.step


def bare_op(sizes: list[int], device: torch.device, penalty: bool):
    """The step op on lists made once, as ``CLASSP(lr=LR)`` calls it; with ``penalty`` the
    explicit penalty of MAS(lam=LAM) on every tensor."""
    params = make_params(sizes, device)
    grads = [p.grad for p in params]
    accs = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(LR, dtype=torch.float64)
    importances, anchors = penalty_terms(params) if penalty else ([], [])
    form, scale = ("explicit", LAM) if penalty else ("none", 0.0)

    def call():
        torch.ops.classp_fused.classp_step_(params, grads, accs, lr, 0.0, 1e-5, 1.0, True, None,
                                           None, importances, anchors, form, scale, [], 0.0, [],
                                           [], None, [])
    return call


def contenders(sizes: list[int], device: torch.device) -> dict:
    """Zero-argument callables, each one step of an optimizer or of the bare op."""
    steps = {}
    for backend in available_backends(device):
        if backend in ("torch",) or (backend == "triton" and device.type == "cpu"):
            continue
        steps[f"classp/{backend}"] = CLASSP(make_params(sizes, device), lr=LR,
                                            backend=backend).step
        if backend in ("cpp", "cuda"):
            steps[f"classp/{backend} + MAS"] = attached_step(sizes, device, backend)
    if _extension.has_kernel("CUDA" if device.type == "cuda" else "CPU"):
        steps["bare op"] = bare_op(sizes, device, penalty=False)
        steps["bare op + penalty"] = bare_op(sizes, device, penalty=True)
    if device.type == "cpu":
        steps["adagrad/fused"] = torch.optim.Adagrad(make_params(sizes, device), lr=LR,
                                                     fused=True).step
    steps["adagrad/foreach"] = torch.optim.Adagrad(make_params(sizes, device), lr=LR,
                                                   foreach=True).step
    steps["adam/fused"] = torch.optim.Adam(make_params(sizes, device), lr=LR, fused=True).step
    return steps


def best_of(fn, inner: int) -> float:
    best = float("inf")
    for _ in range(inner):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(device: str = "cpu", tensors: int = 200, total: int = 10 ** 5, repeats: int = 15,
            inner: int = 20) -> dict[str, list[float]]:
    """Per contender, its host time per step (seconds) in each repeat."""
    device = torch.device(device)
    steps = contenders(tensor_sizes(total, tensors), device)
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
        line = f"{name:20s} {statistics.median(values) * 1e6:9.1f} us"
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
    parser.add_argument("--total", type=int, default=10 ** 5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = measure(args.device, args.tensors, args.total, args.repeats)
    peers = ("bare op", "bare op + penalty",
             "adagrad/fused" if args.device == "cpu" else "adam/fused")
    print(f"{args.tensors} tensors, {args.total} elements in all (log-spaced sizes) on "
          f"{args.device}, {args.threads} thread(s), {args.repeats} interleaved repeats "
          f"(median, ratio range):")
    print("\n".join(report(times, peers)))


if __name__ == "__main__":
    main()
