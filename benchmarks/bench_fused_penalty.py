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
every candidate once per round, in turn (with 2 threads in wall time, and with 1 thread in the
stepping thread's CPU time), and records in its ``extra_info`` (and prints, with ``-s``) the
median over rounds of each one's per-round ratio to ``plain`` and the ratio of the min times
(on a loaded machine, the runs least disturbed): compare those, not timings taken in different
benchmarks.

``test_unfused_pass_ratios`` (CPU) times the penalty's passes for other optimizers the same
way against ``torch._foreach_add_(grads, params)`` on tensors of their own (12 B/element):
``mas.add_penalty_grad_()`` (20 B/element) and ``mas.proximal_step_(lr=...)`` (16 B/element)
as the C++ ops take them; the ops alone (``op ...``: ``regularizers.penalty``'s functions on
the state's tensors, without the regularizer's per-call checks); and the calls on the chunked
multi-tensor ops the C++ ops replace on the CPU (``... chunked``). ``extra_info`` also holds
the peak extra memory of each call (allocated bytes) against the params' bytes.

``test_importance_format_ratios`` (CPU) times the fused step with the penalty (``cpp``, one
tensor of 1e7 float32 elements, each form) with its importance stored in each importance
format (``state_formats.encode_importance``: float32, bfloat16, 8-bit codes with block
scales; 28, 26 and about 25 B/element) the same way, against the float32 importance.
"""

import pytest
import torch
from torch import nn

from classp_fused import CLASSP, MAS, classp_step_, state_formats
from classp_fused.backends.step_spec import Penalty
from classp_fused.regularizers import penalty as penalty_ops

from interleaved import time_interleaved
from memory import peak_extra_bytes

NUMEL = 10 ** 7
LAYOUTS = {"1x1e7": [NUMEL], "200x5e4": [NUMEL // 200] * 200}
CANDIDATES = ("plain", "attached explicit", "attached proximal", "manual explicit",
              "manual proximal")
PASSES = ("foreach_add_", "add_penalty_grad_", "proximal_step_", "op add_penalty_grad_",
          "op proximal_step_", "add_penalty_grad_ chunked", "proximal_step_ chunked")
ROUNDS = 40
LR = 1e-3


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


@pytest.mark.parametrize("threads", [2, 1])
def test_interleaved_ratios(benchmark, layout, device, threads):
    """Each round times every candidate once, in turn; the ratios to ``plain`` are per round
    (``time_interleaved``)."""
    if threads == 1 and device.type != "cpu":
        pytest.skip("the single-thread run is a CPU measurement")
    name, candidates = layout
    benchmark.group = f"regularized-step-{name}-interleaved-{threads}-threads"
    time_interleaved(benchmark, candidates, "plain", threads, ROUNDS)


def chunked(fn):
    """``fn`` with the penalty's passes on the chunked multi-tensor ops instead of the C++ ops."""
    def run():
        saved = penalty_ops.CPU_KERNELS
        penalty_ops.CPU_KERNELS = False
        try:
            fn()
        finally:
            penalty_ops.CPU_KERNELS = saved
    return run


def passes(sizes) -> tuple[dict, int]:
    """One callable per pass of ``PASSES`` on the CPU, and the params' bytes. The penalty's
    passes share one model, its grads and a MAS state; the peer adds tensors of its own."""
    model, peer = Params(sizes, torch.device("cpu")), Params(sizes, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    for p in [*model.parameters(), *peer.parameters()]:
        p.grad = 0.1 * torch.randn(p.shape, generator=g)
    mas = MAS(model, lam=1.0)
    mas.load_state_dict(penalty_state(model))
    grads = [p.grad for p in peer.parameters()]
    values = [p.detach() for p in peer.parameters()]

    def proximal():
        mas.proximal_step_(lr=LR)
    params, importances, _, anchors, _ = mas._terms()
    calls = {"foreach_add_": lambda: torch._foreach_add_(grads, values),
             "add_penalty_grad_": mas.add_penalty_grad_, "proximal_step_": proximal,
             "op add_penalty_grad_": lambda: penalty_ops.add_penalty_grad_(
                 params, importances, anchors, 2 * mas.lam),
             "op proximal_step_": lambda: penalty_ops.proximal_step_(
                 params, importances, anchors, [LR] * len(params), 2 * mas.lam),
             "add_penalty_grad_ chunked": chunked(mas.add_penalty_grad_),
             "proximal_step_ chunked": chunked(proximal)}
    return calls, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_unfused_pass_ratios(benchmark, device, name, threads):
    """The penalty's passes against ``torch._foreach_add_(grads, params)``, interleaved
    (``time_interleaved``); the peak extra memory of one call of each in ``extra_info``."""
    if device.type != "cpu":
        pytest.skip("the C++ ops of the penalty's passes are CPU kernels")
    calls, param_bytes = passes(LAYOUTS[name])
    benchmark.group = f"unfused-passes-{name}-interleaved-{threads}-threads"
    for candidate in PASSES[1:]:
        benchmark.extra_info[f"{candidate} peak extra / params bytes"] = (
            peak_extra_bytes(calls[candidate]) / param_bytes)
    time_interleaved(benchmark, calls, "foreach_add_", threads, ROUNDS)


IMPORTANCE_FORMATS = {"W float32": torch.float32, "W bfloat16": torch.bfloat16,
                      "W 8-bit": torch.uint8}


def importance_format_steps(form: str) -> dict:
    """One callable per importance format: the fused step (``cpp``) of one float32 tensor of
    NUMEL elements with the penalty ``form``, its importance (MAS-like values) stored in that
    format; all step the same param, gradient, accumulator and anchor."""
    g = torch.Generator().manual_seed(3)
    param = torch.randn(NUMEL, generator=g)
    grad = 0.1 * torch.randn(NUMEL, generator=g)
    acc = torch.rand(NUMEL, generator=g)
    anchor = param + 0.01 * torch.randn(NUMEL, generator=g)
    values = torch.rand(NUMEL, generator=g)
    calls = {}
    for name, dtype in IMPORTANCE_FORMATS.items():
        stored, scales = state_formats.encode_importance(values, dtype)
        penalty = Penalty(form, 0.5, [stored], [anchor], [scales])
        calls[name] = (lambda penalty: lambda: classp_step_(
            [param], [grad], [acc], lr=LR, threshold=0.0, power=1.0, penalty=penalty,
            backend="cpp"))(penalty)
    return calls


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("form", ["explicit", "proximal"])
def test_importance_format_ratios(benchmark, device, form, threads):
    """The fused step with the importance in each format against float32, interleaved
    (``time_interleaved``)."""
    if device.type != "cpu":
        pytest.skip("the cpp step is the CPU kernel")
    benchmark.group = f"importance-formats-{form}-interleaved-{threads}-threads"
    time_interleaved(benchmark, importance_format_steps(form), "W float32", threads,
                     ROUNDS)
