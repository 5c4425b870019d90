"""The regularized CLASSP step (pytest-benchmark): the penalty inside the step kernel
(``MAS.attach``) against the plain step and the two-pass manual forms.

    pytest benchmarks/bench_fused_penalty.py --bench-device cpu -q -s \
        --benchmark-columns=min,median,max,rounds

Backend ``cpp`` on the CPU (``cuda`` on a GPU), float32, power 1, threshold 0 (every element
updates: the most traffic), 1e7 parameter elements in one tensor and in 200 tensors. Per
layout, candidates:

- ``plain``: ``CLASSP.step()``, no penalty (20 B/element: read param, grad, accumulator; write
  param, accumulator)
- ``attached explicit`` / ``attached proximal``: ``MAS(penalty=...).attach(optimizer)`` then
  ``step()``: one pass that also reads the importance and the anchor (28 B/element)
- ``manual explicit``: ``mas.add_penalty_grad_(); step()``
- ``manual proximal``: ``step(); mas.proximal_step_(optimizer)``

The machine is shared: single timings swing with the load. ``test_interleaved_ratios`` times
every candidate once per round, in turn, and records the median over rounds of each one's
per-round ratio to ``plain`` in its ``extra_info`` (and prints it with ``-s``): compare those,
not timings taken in different benchmarks.
"""
import statistics
import time

import pytest
import torch
from torch import nn

from classp_fused import CLASSP, MAS

NUMEL = 10 ** 7
LAYOUTS = {"1x1e7": [NUMEL], "200x5e4": [NUMEL // 200] * 200}
CANDIDATES = ("plain", "attached explicit", "attached proximal", "manual explicit",
              "manual proximal")
ROUNDS = 30


class Params(nn.Module):
    """A module holding the stepped tensors, for the regularizer."""

    def __init__(self, sizes, device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tensors = nn.ParameterList(
            nn.Parameter(torch.randn(n, generator=g).to(device)) for n in sizes)


def penalty_state(model: Params) -> dict:
    """A MAS state with an importance and an anchor for every tensor (made, not consolidated)."""
    g = torch.Generator().manual_seed(1)
    named = list(model.named_parameters())
    return {"method": "MAS", "tasks_seen": 1,
            "importance": {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in named},
            "anchor": {n: (p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g))
                       .to(p.device) for n, p in named},
            "residual": {}}


def steps(sizes, device) -> dict:
    """One callable per candidate, all stepping the same params and grads, each with its own
    optimizer (its own accumulators); the regularizers share one importance and anchor."""
    model = Params(sizes, device)
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.grad = (0.1 * torch.randn(p.shape, generator=g)).to(device)
    backend = "cuda" if device.type == "cuda" else "cpp"
    optimizers = {name: CLASSP(model.parameters(), lr=1e-3, threshold=0.0, power=1.0,
                               backend=backend) for name in CANDIDATES}
    state = penalty_state(model)
    regularizers = {}
    for name in CANDIDATES[1:]:
        regularizers[name] = MAS(model, lam=1.0, penalty=name.split()[1])
        regularizers[name].load_state_dict(state)  # the same tensors: loading does not copy
    regularizers["attached explicit"].attach(optimizers["attached explicit"])
    regularizers["attached proximal"].attach(optimizers["attached proximal"])

    def manual_explicit():
        regularizers["manual explicit"].add_penalty_grad_()
        optimizers["manual explicit"].step()

    def manual_proximal():
        optimizers["manual proximal"].step()
        regularizers["manual proximal"].proximal_step_(optimizers["manual proximal"])

    return {"plain": optimizers["plain"].step,
            "attached explicit": optimizers["attached explicit"].step,
            "attached proximal": optimizers["attached proximal"].step,
            "manual explicit": manual_explicit, "manual proximal": manual_proximal}


def synced(fn, device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, device):
    return request.param, {name: synced(fn, device)
                           for name, fn in steps(LAYOUTS[request.param], device).items()}


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_step(benchmark, layout, candidate):
    name, candidates = layout
    benchmark.group = f"regularized-step-{name}"
    benchmark.extra_info.update(layout=name, candidate=candidate)
    benchmark(candidates[candidate])


def test_interleaved_ratios(benchmark, layout):
    """Each round times every candidate once, in turn; the ratios to ``plain`` are per round."""
    name, candidates = layout
    benchmark.group = f"regularized-step-{name}-interleaved"
    times = {candidate: [] for candidate in CANDIDATES}

    def one_round():
        for candidate in CANDIDATES:
            start = time.perf_counter()
            candidates[candidate]()
            times[candidate].append(time.perf_counter() - start)

    one_round()  # warm-up, not counted
    for samples in times.values():
        samples.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    print(f"\n{name}: median time, and median / min / max over rounds of the ratio to plain")
    for candidate, samples in times.items():
        ratios = [t / p for t, p in zip(samples, times["plain"])]
        median_ratio = statistics.median(ratios)
        benchmark.extra_info[f"{candidate} median ms"] = statistics.median(samples) * 1e3
        benchmark.extra_info[f"{candidate} / plain"] = median_ratio
        print(f"  {candidate:18s} {statistics.median(samples) * 1e3:8.2f} ms   "
              f"{median_ratio:5.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
