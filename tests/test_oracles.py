"""CLASSP against independent oracles: torch's Adagrad, a closed form, and float64."""
import pytest
import torch

from classp_fused import CLASSP, classp_step_
from helpers import CPU_BACKENDS, random_like


def _float64_capable(backend):
    try:
        classp_step_([torch.ones(2, dtype=torch.float64)], [torch.ones(2, dtype=torch.float64)],
                     [torch.zeros(2, dtype=torch.float64)], lr=0.1, backend=backend)
        return True
    except (TypeError, RuntimeError):
        return False


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_power_two_without_threshold_is_adagrad(backend):
    dtype = torch.float64 if _float64_capable(backend) else torch.float32
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
def test_fp32_backends_track_float64_reference(backend, power):
    g = torch.Generator().manual_seed(int(power * 10))
    shapes = [(513,), (31, 17), (2, 3, 5)]
    params32 = [random_like(s, generator=g) for s in shapes]
    params64 = [p.double() for p in params32]
    accs32 = [torch.zeros(s) for s in shapes]
    accs64 = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for _ in range(20):
        grads = [random_like(s, generator=g, scale=0.5) for s in shapes]
        hyper = dict(lr=0.05, threshold=0.04, eps=1e-5, power=power)
        c32 = classp_step_(params32, grads, accs32, backend=backend, **hyper)
        c64 = classp_step_(params64, [x.double() for x in grads], accs64, backend="torch", **hyper)
        assert torch.equal(c32.cpu(), c64.cpu())
    for p32, p64 in zip(params32, params64):
        torch.testing.assert_close(p32.double(), p64, rtol=1e-5, atol=1e-5)
    for a32, a64 in zip(accs32, accs64):
        torch.testing.assert_close(a32.double(), a64, rtol=1e-5, atol=1e-6)
