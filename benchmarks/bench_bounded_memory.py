"""The pure-PyTorch passes in chunk views against their peers (CPU, pytest-benchmark): the
foreach backend's step vs ``torch.optim.Adagrad(fused=True)``, and the penalty's gradient
(``add_penalty_grad_``) and proximal step (``proximal_step_``) vs
``torch._foreach_add_(grads, params)``, at 1e7 float32 parameters in one tensor and in 200
tensors (bench_step.py's log-spaced sizes).

    .venv/bin/python -m pytest benchmarks/bench_bounded_memory.py \\
        --benchmark-json=benchmarks/bounded_memory_cpu.json

Every round times the peer once, on tensors of its own with the same layout, then the case,
so each round gives a ratio and a change in the machine's load shows in both; each case runs
on 2 threads (the suite's) and on 1. ``extra_info`` holds the median ratio with its range over
the rounds, both medians, the peak extra memory of one call (allocated bytes, from
torch.profiler) in MB and as a fraction of the params' bytes, and the 1-minute load average
as the case starts. benchmarks/report.py turns the JSON into RESULTS.md's "Bounded
temporaries" section (benchmarks/bounded_report.py).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from classp_fused import CLASSP
from classp_fused.regularizers import penalty as penalty_ops

from memory import peak_extra_bytes
from step_cases import Case, make_params

SIZE = 10 ** 7
ROUNDS = 15
FACTOR = 2.0  # 2 * lam, lam = 1
LR = 1e-3


def penalty_terms(params: list) -> tuple[list, list]:
    """Importances in [0, 1) and anchors near the params."""
    g = torch.Generator().manual_seed(1)
    importances = [torch.rand(p.shape, generator=g) for p in params]
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, generator=g) for p in params]
    return importances, anchors


def contenders(name: str, tensors: int) -> tuple:
    """The case's call and its peer's, each on parameters of its own."""
    case = Case(name, SIZE, tensors, "fp32")
    params = make_params(case, torch.device("cpu"))
    if name == "foreach-step":
        peer = torch.optim.Adagrad(make_params(case, torch.device("cpu")), lr=LR, fused=True)
        return CLASSP(params, lr=LR, backend="foreach").step, peer.step
    others = make_params(case, torch.device("cpu"))
    grads, values = [p.grad for p in others], [p.detach() for p in others]
    importances, anchors = penalty_terms(params)

    def call():  # on the chunk views also on the CPU, where the C++ ops take them otherwise
        saved, penalty_ops.CPU_KERNELS = penalty_ops.CPU_KERNELS, False
        try:
            if name == "add_penalty_grad_":
                penalty_ops.add_penalty_grad_(params, importances, anchors, FACTOR)
            else:
                penalty_ops.proximal_step_(params, importances, anchors, [LR] * len(params),
                                           FACTOR)
        finally:
            penalty_ops.CPU_KERNELS = saved

    def foreach_add():
        torch._foreach_add_(grads, values)
    return call, foreach_add


@pytest.fixture
def threads(request):
    """The CPU threads of one case (the suite's 2, or 1: the work per core, without the pool's
    fork and join that a loaded machine delays), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 1], indirect=True, ids=["2threads", "1thread"])
@pytest.mark.parametrize("tensors", [1, 200], ids=["1tensor", "200tensors"])
@pytest.mark.parametrize("name", ["foreach-step", "add_penalty_grad_", "proximal_step_"])
def test_bounded_memory(benchmark, name: str, tensors: int, threads: int):
    load_average = os.getloadavg()[0]  # the machine's load (others' work) as the case starts
    call, peer = contenders(name, tensors)
    call(), peer()  # state, caches
    peak, peer_peak = peak_extra_bytes(call), peak_extra_bytes(peer)
    peer_times = []

    def setup():
        start = time.perf_counter()
        peer()
        peer_times.append(time.perf_counter() - start)

    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test
        return
    times = benchmark.stats.stats.data
    ratios = [t / p for t, p in zip(times, peer_times[-len(times):])]
    param_bytes = SIZE * 4
    benchmark.extra_info.update(
        case=name, tensors=tensors, size=SIZE, threads=threads, rounds=len(times),
        load_average=load_average,
        peer="adagrad/fused" if name == "foreach-step" else "torch._foreach_add_",
        median_s=statistics.median(times), peer_median_s=statistics.median(peer_times),
        ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
        peak_extra_mb=peak / 1e6, peak_extra_fraction=peak / param_bytes,
        peer_peak_extra_mb=peer_peak / 1e6)
