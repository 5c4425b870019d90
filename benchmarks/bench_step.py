"""Time, throughput and extra memory of one optimizer step: CLASSP backends vs torch.optim peers.

Each case steps a fixed set of parameters whose gradients are populated once (standard normal,
the same every round). CLASSP backends and the peers run through their ``torch.optim``
optimizer's ``step()``; the torch.compile'd reference is the reference step function compiled
once per shape set. Every round of a case is paired with one step of fused Adagrad on tensors of
its own with the same size, layout and dtype, timed just before it (fused Adagrad itself too),
so the ratio to fused Adagrad survives the machine's bandwidth drifting during the run and both
steps see caches holding the other's data, as a training step's forward and backward leave them.

Cases (a subset of size x layout x dtype x power x threshold that runs in minutes):

- fp32, power 1, threshold 0, at the core sizes, one tensor and ``MANY`` tensors of mixed sizes:
  every CLASSP backend of the device and every peer; the compiled reference at two sizes, one
  tensor (compiling takes ~20 s on CPU, more for many tensors).
- the largest size, one tensor: the fused CLASSP kernels, fused Adagrad and fused Adam.
- one tensor at the two mid sizes: bf16 parameters (CLASSP, fused Adagrad, fused Adam), power 2,
  and threshold ``MASKING_THRESHOLD`` (CLASSP backends).

The suite runs on the CPU (the Triton backend, interpreted there, is left out); on a GPU the
suite is benchmarks/gpu.py.
"""
from __future__ import annotations

import statistics

import torch

from classp_fused import CLASSP, available_backends

from bandwidth import seconds, synchronize
from memory import peak_extra_bytes
from step_cases import (EPS, LR, MANY, MASKING_THRESHOLD, Case, bytes_per_element, make_params,
                        naive_classp_step)

BASELINE = "adagrad/fused"
PEERS = ("adagrad/fused", "adagrad/foreach", "adagrad/for-loop", "adam/fused")
FUSED_CLASSP = ("cpp", "cuda", "triton")
SIZES = {
    "cpu": dict(core=(10**5, 10**6, 10**7), large=(5 * 10**7,), mid=(10**6, 10**7),
                compiled=(10**6, 10**7)),
}
TIME_BUDGET_S = 1.0
MIN_ROUNDS, MAX_ROUNDS = 5, 300
def cases(device_type: str) -> list[Case]:
    """The benchmark plan for ``device_type`` (see the module docstring); none on a GPU, where
    ``python -m benchmarks --device cuda`` runs the GPU suite, benchmarks/gpu.py."""
    if device_type not in SIZES:
        return []
    sizes = SIZES[device_type]
    classp = [f"classp/{name}" for name in available_backends(device_type)
              if not (device_type == "cpu" and name == "triton")]
    fused = [impl for impl in classp if impl.split("/")[1] in FUSED_CLASSP]
    plan = []
    for n in sizes["core"]:
        for tensors in (1, MANY):
            plan += [Case(impl, n, tensors, "fp32", 1.0, 0.0) for impl in classp]
            if tensors == 1 and n in sizes["compiled"]:
                plan.append(Case("classp/torch+compile", n, 1, "fp32", 1.0, 0.0))
            plan += [Case(impl, n, tensors, "fp32") for impl in PEERS]
    for n in sizes["large"]:
        plan += [Case(impl, n, 1, "fp32", 1.0, 0.0) for impl in fused]
        plan += [Case(impl, n, 1, "fp32") for impl in ("adagrad/fused", "adam/fused")]
    for n in sizes["mid"]:
        plan += [Case(impl, n, 1, "bf16", 1.0, 0.0) for impl in classp]
        plan += [Case(impl, n, 1, "bf16") for impl in ("adagrad/fused", "adam/fused")]
        plan += [Case(impl, n, 1, "fp32", 2.0, 0.0) for impl in classp]
        plan += [Case(impl, n, 1, "fp32", 1.0, MASKING_THRESHOLD) for impl in classp]
    return plan


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        plan = cases(metafunc.config.getoption("--bench-device"))
        metafunc.parametrize("case", plan, ids=[str(case) for case in plan])


def make_step(case: Case, params):
    """A zero-argument callable that performs one step of the case's implementation."""
    family, variant = case.impl.split("/")
    if case.impl == "classp/torch+compile":
        grads = [p.grad for p in params]
        accs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        torch._dynamo.reset()
        compiled = torch.compile(naive_classp_step, dynamic=False)
        return lambda: compiled(params, grads, accs, case.threshold, case.power)
    if family == "classp":
        optimizer = CLASSP(params, lr=LR, threshold=case.threshold, eps=EPS, power=case.power,
                           backend=variant)
    elif family == "adagrad":
        flags = {"fused": dict(fused=True), "foreach": dict(foreach=True),
                 "for-loop": dict(foreach=False)}[variant]
        optimizer = torch.optim.Adagrad(params, lr=LR, **flags)
    else:
        optimizer = torch.optim.Adam(params, lr=LR, fused=True)
    return optimizer.step


def test_step(benchmark, case: Case, device: torch.device, bandwidth: dict):
    params = make_params(case, device)
    step = make_step(case, params)
    if case.impl == "classp/torch+compile":
        with torch._inductor.config.patch(force_disable_caches=True):
            first_call_s = seconds(step, device)
    else:
        first_call_s = seconds(step, device)
    estimate = max(seconds(step, device) for _ in range(3))
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TIME_BUDGET_S / estimate)))
    peak = peak_extra_bytes(step)

    baseline_case = Case(BASELINE, case.size, case.tensors, case.dtype)
    baseline = make_step(baseline_case, make_params(baseline_case, device))
    baseline()
    paired = []

    def setup():
        paired.append(seconds(baseline, device))

    def target():
        step()
        synchronize(device)

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test
        return
    median = benchmark.stats.stats.median
    gbs = bytes_per_element(case) * case.size / median / 1e9
    baseline_median = statistics.median(paired)
    reference_gbs = bandwidth["update_gbs_best"]
    benchmark.extra_info.update(
        impl=case.impl, size=case.size, tensors=case.tensors, dtype=case.dtype,
        power=case.power, threshold=case.threshold, bytes_per_element=bytes_per_element(case),
        first_call_s=first_call_s, peak_extra_mb=peak / 1e6, gbs=gbs,
        bandwidth_gbs=reference_gbs, bandwidth_fraction=gbs / reference_gbs,
        baseline_median_s=baseline_median, ratio_to_baseline=median / baseline_median)
