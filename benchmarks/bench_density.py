"""The cost of the CPU step against its update density (pytest-benchmark, CPU, 2 threads).

    .venv/bin/python -m pytest benchmarks/bench_density.py --bench-device cpu -q -s \\
        --benchmark-columns=min,median,max,rounds

``CLASSP(backend="cpp").step()`` on 1e7 fp32 elements in one tensor, power 1, threshold 1,
with fresh gradients that select exactly 100%, 50%, 10%, 1%, 0.1% or 0% of the elements, in
random or clustered (whole-row) positions (benchmarks/density_cases.py); and the read-only
floor, ``torch.sum`` of the param, the gradient and the accumulator, which reads what a step
reads and writes nothing. Every case steps tensors of its own, 120 MB, far beyond the caches.

``test_step`` and ``test_read_floor`` time the cases one after another. The machine is shared:
compare instead ``test_interleaved``, whose every round times each case once, in turn, and
whose ``extra_info`` (printed with ``-s``) holds each case's min and median time, its min time
over the dense step's and over the empty selection's (the least disturbed runs), and the
median over rounds of its per-round ratio to the dense step. benchmarks/density_curve.py runs
the same curve against a baseline build of the kernel and writes it into RESULTS.md.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from classp_fused import CLASSP

from density_cases import EPS, FLOOR, LR, THRESHOLD, DensityCase, cases, read_floor, state

ROUNDS = 20
INTERLEAVED_ROUNDS = 30


def stepper(case: DensityCase, seed: int) -> tuple:
    """The case's ``step()`` and a call of the read-only floor on its tensors."""
    param, grad, _ = state(case, seed)
    selected = int(torch.count_nonzero(grad * grad > THRESHOLD))
    assert selected == case.selected, (case, selected)
    param = torch.nn.Parameter(param)
    param.grad = grad
    optimizer = CLASSP([param], lr=LR, threshold=THRESHOLD, eps=EPS, power=1.0, backend="cpp")
    optimizer.step()  # creates the accumulator
    acc = optimizer.state[param]["accumulator"]
    return optimizer.step, lambda: read_floor(param.detach(), grad, acc)


@pytest.fixture(scope="module")
def steps(device) -> dict:
    """Every case's step, and the floor (on the dense case's tensors), by name."""
    if device.type != "cpu":
        pytest.skip("the density curve is a CPU benchmark")
    calls = {}
    for seed, case in enumerate(cases()):
        calls[str(case)], floor = stepper(case, seed)
        if case.density == 1.0:
            calls[FLOOR] = floor
    return calls


@pytest.mark.parametrize("case", cases(), ids=str)
def test_step(benchmark, steps, case: DensityCase):
    benchmark.group = "density"
    benchmark.extra_info.update(density=case.density, mask=case.mask, selected=case.selected)
    benchmark.pedantic(steps[str(case)], rounds=ROUNDS, warmup_rounds=1)


def test_read_floor(benchmark, steps):
    benchmark.group = "density"
    benchmark.pedantic(steps[FLOOR], rounds=ROUNDS, warmup_rounds=1)


def test_interleaved(benchmark, steps):
    """Each round times every case and the floor once, in turn."""
    benchmark.group = "density-interleaved"
    times = {name: [] for name in steps}

    def one_round():
        for name, call in steps.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)

    one_round()  # warm-up, not counted
    for samples in times.values():
        samples.clear()
    benchmark.pedantic(one_round, rounds=INTERLEAVED_ROUNDS, iterations=1)
    dense, none = times["dense"], times["none selected"]
    print("\ncase: min and median time; min time over the dense step's and the empty "
          "selection's; median over rounds of the ratio to the dense step")
    for name, samples in times.items():
        ratios = [t / d for t, d in zip(samples, dense)]
        info = {"min ms": min(samples) * 1e3, "median ms": statistics.median(samples) * 1e3,
                "min / dense min": min(samples) / min(dense),
                "min / none min": min(samples) / min(none),
                "median ratio to dense": statistics.median(ratios)}
        benchmark.extra_info.update({f"{name}: {key}": value for key, value in info.items()})
        print(f"  {name:16s} {info['min ms']:7.2f} ms {info['median ms']:7.2f} ms   "
              f"{info['min / dense min']:5.2f}x {info['min / none min']:5.2f}x   "
              f"{info['median ratio to dense']:5.2f}x")
