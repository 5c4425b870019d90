"""Every backend at the edges of the step's rule, against the scalar oracle (tests/oracle.py) and
the spec's own statements: zero gradients, g*g exactly at the threshold, subnormal gradients and
gradients so large that g*g overflows float32.

The backends run on the CPU (the Triton kernel through its interpreter); the CUDA kernel and the
Triton kernel on the GPU join where a GPU is present."""
import math

import pytest
import torch

from classp_fused import available_backends
from classp_fused.backends import param_dtypes
from helpers import (CPU_BACKENDS, assert_backend_matches_oracle, bits, random_like,
                     random_with_zeros, run_steps)

GPU_BACKENDS = [name for name in ("cuda", "triton")
                if torch.cuda.is_available() and name in available_backends("cuda")]
BACKEND_DEVICES = [(name, "cpu") for name in CPU_BACKENDS] + [(name, "cuda")
                                                              for name in GPU_BACKENDS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES = [pytest.param(name, device, dtype, id=f"{name}-{device}-{str(dtype)[6:]}")
         for name, device in BACKEND_DEVICES for dtype in DTYPES if dtype in param_dtypes(name)]
HYPER = dict(lr=0.05, threshold=0.0, eps=1e-5, power=1.0, apply_scaling=True)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def exactly(values, dtype):
    """``values`` as a tensor of ``dtype``, each required to be representable in it."""
    tensor = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert tensor.double().tolist() == list(values), "not representable"
    return tensor


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_zero_gradients_at_threshold_zero_change_nothing(backend, device, dtype, power):
    g = torch.Generator().manual_seed(1)
    param = random_like((67,), dtype, g)
    param[::4] = -0.0
    acc = torch.rand(67, generator=g, dtype=acc_dtype(dtype))
    acc[::3] = 0.0
    before = bits(param).clone(), bits(acc).clone()
    zeros = torch.zeros(67, dtype=dtype)
    zeros[1::2] = -0.0
    params, accs, counts = run_steps(backend, device, [param], [zeros], [acc],
                                     [dict(HYPER, power=power)])
    assert counts == [[[0, 0]]]
    assert torch.equal(bits(params[0]), before[0]) and torch.equal(bits(accs[0]), before[1])

    grad = random_with_zeros((5, 13), dtype, g)  # zeros among others: those others only update
    param, acc = param[:65].reshape(5, 13), acc[:65].reshape(5, 13)
    params, accs, counts = assert_backend_matches_oracle(backend, device, [param], [grad], [acc],
                                                         [dict(HYPER, power=power)])
    zero = grad == 0
    assert counts == [[[int((~zero).sum()), 0]]]
    assert torch.equal(bits(params[0])[zero], bits(param)[zero])
    assert torch.equal(bits(accs[0])[zero], bits(acc)[zero])
    assert (accs[0][~zero] > acc[~zero]).all()


def ulp(x: float, dtype) -> float:
    """The spacing of ``dtype``'s values at ``x`` (a normal number)."""
    return math.ldexp(torch.finfo(dtype).eps, math.frexp(x)[1] - 1)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("root, threshold", [(0.5, 0.25), (1.5, 2.25), (2.0 ** -6, 2.0 ** -12)])
def test_square_exactly_at_the_threshold_is_not_an_update(backend, device, dtype, power, root,
                                                          threshold):
    assert root * root == threshold  # exactly, in every arithmetic
    spacing_below = ulp(root, dtype) / (2 if math.frexp(root)[0] == 0.5 else 1)
    above, below = root + ulp(root, dtype), root - spacing_below
    grad = exactly([root, -root, above, -above, below, -below, 0.0, root], dtype)
    param = random_like((8,), dtype, torch.Generator().manual_seed(2))
    acc = torch.zeros(8, dtype=acc_dtype(dtype))
    hyper = dict(HYPER, threshold=threshold, power=power)
    params, accs, counts = assert_backend_matches_oracle(backend, device, [param], [grad], [acc],
                                                         [hyper])
    selected = torch.tensor([False, False, True, True, False, False, False, False])
    assert counts == [[[2, 0]]]
    assert torch.equal(bits(params[0])[~selected], bits(param)[~selected])
    assert torch.equal(bits(accs[0])[~selected], bits(acc)[~selected])
    assert (accs[0][selected] > 0).all() and (params[0][selected] != param[selected]).all()


@pytest.mark.parametrize("backend, device, dtype",
                         [case for case in CASES if case.values[2] == torch.float32])
def test_threshold_is_compared_in_float32_like_the_square(backend, device, dtype):
    """0.1 has no float32: the gradient whose float32 square is float32(0.1), which is above
    0.1, is not updated."""
    root = torch.tensor([math.sqrt(0.1)], dtype=dtype)
    assert (root * root).item() == torch.tensor(0.1, dtype=dtype).item() > 0.1
    grad = torch.cat([root, -root, root * 1.0001])
    param, acc = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    _, _, counts = assert_backend_matches_oracle(backend, device, [param], [grad], [acc],
                                                 [dict(HYPER, threshold=0.1)])
    assert counts == [[[1, 0]]]


def subnormal_gradients(dtype):
    """Gradients at and below the smallest normal of ``dtype`` and of float32, whose squares
    are subnormal or underflow to zero in float32, with their signs flipped too."""
    info = torch.finfo(dtype)
    values = [info.smallest_normal / 2, info.smallest_normal * info.eps,  # subnormal in dtype
              2.0 ** -75,   # float32 square 2^-150: rounds to zero, never updated
              2.0 ** -74,   # float32 square 2^-148: subnormal and positive, updated
              1e-20,        # float32 square about 1e-40: subnormal, updated
              info.smallest_normal]
    grad = torch.tensor(values + [-v for v in values], dtype=torch.float64).to(dtype)
    return grad[grad != 0]  # float16 has none of the float32 ones


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_subnormal_gradients(backend, device, dtype, power, apply_scaling):
    grad = subnormal_gradients(dtype)
    param = torch.zeros(grad.shape, dtype=dtype)  # tiny steps stay visible from zero
    acc = torch.zeros(grad.shape, dtype=acc_dtype(dtype))
    hyper = dict(HYPER, power=power, apply_scaling=apply_scaling)
    _, accs, counts = assert_backend_matches_oracle(backend, device, [param], [grad], [acc],
                                                    [hyper] * 2, scale=0.0)
    square = grad.to(acc_dtype(dtype)) ** 2
    assert counts == [[[int((square > 0).sum()), 0]]] * 2
    if dtype == torch.float32:  # as the comments of subnormal_gradients say
        assert counts[0][0][0] == 4
    if power == 1.0:  # the accumulator grows by |g| exactly, twice
        torch.testing.assert_close(accs[0], torch.where(square > 0, 2 * grad.abs(), 0)
                                   .to(acc.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("apply_scaling", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 1e30])
def test_max_finite_gradients_are_updates(backend, device, dtype, power, apply_scaling,
                                          threshold):
    """g*g overflows to infinity in the arithmetic (not for float16's 65504): infinity is
    greater than any threshold, so the element is updated; the accumulator may become inf."""
    big = torch.finfo(dtype).max
    grad = torch.tensor([big, -big, big / 2, 0.75, -0.25], dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(3)
    param = random_like((5,), dtype, g)
    acc = torch.rand(5, generator=g, dtype=acc_dtype(dtype))
    hyper = dict(HYPER, power=power, apply_scaling=apply_scaling, threshold=threshold)
    _, accs, counts = assert_backend_matches_oracle(backend, device, [param], [grad], [acc],
                                                    [hyper] * 2)
    square = grad.to(acc_dtype(dtype)) ** 2
    assert square[:2].isinf().all() == (dtype != torch.float16)
    assert counts == [[[int((square > threshold).sum()), 0]]] * 2
    if dtype != torch.float16:
        assert (square[:2] > threshold).all()  # the two max-finite gradients are updates
        if power >= 2.0:
            assert accs[0][:2].isinf().all()


@pytest.mark.parametrize("backend, device, dtype",
                         [case for case in CASES if case.values[2] != torch.float16])
@pytest.mark.parametrize("power", [3.0, 4.0])
def test_subnormal_accumulator_without_eps(backend, device, dtype, power):
    """eps = 0 and |g|**power subnormal: 1/A overflows, yet the step g * A**(-1/power) is
    about sign(g) (float16 gradients are too large for a subnormal |g|**power)."""
    tiny = torch.finfo(acc_dtype(dtype)).smallest_normal ** (1 / power) / 4
    grad = torch.tensor([tiny, -tiny, 0.5], dtype=torch.float64).to(dtype)
    param = torch.ones(3, dtype=dtype)
    acc = torch.zeros(3, dtype=acc_dtype(dtype))
    hyper = dict(HYPER, eps=0.0, power=power)
    params, accs, counts = assert_backend_matches_oracle(backend, device, [param], [grad], [acc],
                                                         [hyper])
    assert counts == [[[3, 0]]]
    assert 0 < accs[0][0] < torch.finfo(acc.dtype).smallest_normal
    torch.testing.assert_close(params[0], (1 - 0.05 * grad.double().sign()).to(dtype),
                               rtol=1e-4, atol=0)
