"""CLASSP against independent oracles: torch's Adagrad, a closed form, and the scalar oracle of
tests/oracle.py (the spec as a loop over Python floats, sharing no code with the library)."""
import itertools

import pytest
import torch

import oracle
from classp_fused import CLASSP, classp_step_
from classp_fused.backends import param_dtypes
from helpers import CPU_BACKENDS, assert_backend_matches_oracle, random_like, random_with_zeros

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_power_two_without_threshold_is_adagrad(backend):
    dtype = torch.float64 if torch.float64 in param_dtypes(backend) else torch.float32
    lr, eps = 0.03, 1e-5
    g = torch.Generator().manual_seed(0)
    start = random_like((129, 7), dtype, g)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    classp = CLASSP([ours], lr=lr, eps=eps, power=2.0, threshold=0.0, backend=backend)
    adagrad = torch.optim.Adagrad([theirs], lr=lr, eps=0.0, initial_accumulator_value=eps)
    for _ in range(200):
        grad = random_like(start.shape, dtype, g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        classp.step()
        adagrad.step()
    tol = 1e-13 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(classp.state[ours]["accumulator"] + eps,
                               adagrad.state[theirs]["sum"], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_constant_gradient_follows_the_harmonic_closed_form(backend):
    lr, steps = 0.1, 300
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    grad = torch.tensor([0.3, -0.7, 2.0, -1e-3])
    opt = CLASSP([w], lr=lr, eps=0.0, power=1.0, backend=backend)
    for _ in range(steps):
        w.grad = grad.clone()
        opt.step()
    harmonic = sum(1.0 / t for t in range(1, steps + 1))
    expected = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) \
        - lr * torch.sign(grad.double()) * harmonic
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 3.0])
def test_fp32_backends_track_exact_arithmetic(backend, power):
    """Twenty float32 steps stay within 1e-5 of the oracle computing without rounding."""
    g = torch.Generator().manual_seed(int(power * 10))
    shapes = [(513,), (31, 17), (2, 3, 5)]
    params32 = [random_like(s, generator=g) for s in shapes]
    params64 = [p.double() for p in params32]
    accs32 = [torch.zeros(s) for s in shapes]
    accs64 = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    hyper = dict(lr=0.05, threshold=0.04, eps=1e-5, power=power, apply_scaling=True)
    for _ in range(20):
        grads = [random_like(s, generator=g, scale=0.5) for s in shapes]
        counts = classp_step_(params32, grads, accs32, backend=backend, **hyper)
        params64, accs64, expected = oracle.classp_step(params64, grads, accs64, **hyper,
                                                        arithmetic="float64")
        assert counts.tolist() == expected
    for p32, p64 in zip(params32, params64):
        torch.testing.assert_close(p32.double(), p64, rtol=1e-5, atol=1e-5)
    for a32, a64 in zip(accs32, accs64):
        torch.testing.assert_close(a32.double(), a64, rtol=1e-5, atol=1e-6)


def _odd_case(dtype, seed):
    """Small odd shapes; gradients with exact zeros, NaN and infinities among normal values;
    accumulators from zero (fresh) and positive (later steps)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(37,), (5, 7), (), (1,)]
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [random_like(s, dtype, g) for s in shapes]
    grads = [random_with_zeros(s, dtype, g, scale=0.5) for s in shapes]
    for i, value in zip(range(1, 37, 9), itertools.cycle([float("nan"), float("inf"),
                                                          -float("inf")])):
        grads[0][i] = value
    accs = [torch.rand(s, generator=g, dtype=acc_dtype) for s in shapes]
    accs[1].zero_()
    return params, grads, accs


@pytest.mark.parametrize("backend, dtype", [pytest.param(b, d, id=f"{b}-{str(d)[6:]}")
                                            for b in CPU_BACKENDS for d in DTYPES
                                            if d in param_dtypes(b)])
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_every_backend_matches_the_scalar_oracle(backend, dtype, power, apply_scaling):
    """Four steps, the second skipped by found_inf, gradients unscaled by grad_scale."""
    params, grads, accs = _odd_case(dtype, seed=int(power * 10) + apply_scaling)
    hyper = dict(lr=torch.tensor(0.05), threshold=0.04, eps=1e-5, power=power,
                 apply_scaling=apply_scaling, grad_scale=torch.tensor(0.5))
    hypers = [dict(hyper, found_inf=torch.tensor(float(i == 1))) for i in range(4)]
    *_, counts = assert_backend_matches_oracle(backend, "cpu", params, grads, accs,
                                               hypers, scale=2.0)
    assert counts[1] == [[0, 0]] * 4 and counts[0][0][1] == 4
    assert 0 < sum(row[0] for row in counts[0]) < sum(g.numel() for g in grads)
