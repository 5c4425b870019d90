"""Bad inputs to the step: each case raises its documented error (and changes nothing) through
classp_fused.classp_step_ on every CPU backend and, where the case can reach it, the optimizer.
Edge cases that must work (zero-element and 0-dim tensors, empty lists) are checked as well.
Invalid constructor arguments are covered in test_optim.py."""
import numpy as np
import pytest
import torch

from classp_fused import CLASSP, classp_step_
from classp_fused.reference import classp_step_ as reference_step_
from helpers import CPU_BACKENDS, bits, random_like


def _inputs():
    return [random_like((4, 3))], [random_like((4, 3))], [torch.rand(4, 3)]


PARAMS, GRADS, ACCS = 0, 1, 2


def _replace(index, *tensors):
    """A case: the default inputs with one list (PARAMS, GRADS or ACCS) replaced."""
    def make():
        lists = list(_inputs())
        lists[index] = list(tensors)
        return (*lists, {})
    return make


def _with(**kwargs):
    return lambda: (*_inputs(), kwargs)


def _mixed_devices():
    params, grads, accs = _inputs()
    meta = torch.zeros(2, device="meta")
    return params + [meta], grads + [meta.clone()], accs + [meta.clone()], {}


META = torch.zeros(4, 3, device="meta")

# name: (make inputs -> (params, grads, accs, step kwargs), error type, message regex)
BAD_INPUTS = {
    "grad on another device": (
        _replace(GRADS, META), RuntimeError,
        r"grads\[0\] is on meta, expected the param's device cpu"),
    "accumulator on another device": (
        _replace(ACCS, META), RuntimeError,
        r"accs\[0\] is on meta, expected the param's device cpu"),
    "params on two devices": (
        _mixed_devices, RuntimeError,
        r"params\[1\] is on meta, expected params\[0\]'s device cpu"),
    "grad dtype differs": (
        _replace(GRADS, torch.zeros(4, 3, dtype=torch.float64)), TypeError,
        r"grads\[0\] has dtype torch.float64, expected the param's torch.float32"),
    "accumulator not fp32": (
        _replace(ACCS, torch.zeros(4, 3, dtype=torch.bfloat16)), TypeError,
        r"accs\[0\] must be a torch.float32 tensor"),
    "grad shape differs": (
        _replace(GRADS, torch.zeros(3, 4)), ValueError,
        r"grads\[0\] has shape \(3, 4\), expected the param's \(4, 3\)"),
    "accumulator shape differs": (
        _replace(ACCS, torch.zeros(12)), ValueError,
        r"accs\[0\] has shape \(12,\), expected the param's \(4, 3\)"),
    "list lengths differ": (
        _replace(GRADS), ValueError,
        r"params, grads and accs must have the same length, got 1, 0, 1"),
    "grad missing": (
        _replace(GRADS, None), TypeError,
        r"grads\[0\] must be a tensor, got NoneType"),
    "sparse grad": (
        _replace(GRADS, torch.randn(4, 3).to_sparse()), TypeError,
        r"grads\[0\] is sparse; CLASSP needs dense gradients"),
    "complex grad": (
        _replace(GRADS, torch.randn(4, 3, dtype=torch.complex64)), TypeError,
        r"grads\[0\] is complex; CLASSP needs real gradients"),
    "integer params": (
        _replace(PARAMS, torch.zeros(4, 3, dtype=torch.int32)), TypeError,
        r"params\[0\] must be float16, bfloat16, float32 or float64, got torch.int32"),
    "complex params": (
        _replace(PARAMS, torch.zeros(4, 3, dtype=torch.complex64)), TypeError,
        r"params\[0\]: complex parameters are not supported"),
    "sparse params": (
        _replace(PARAMS, torch.zeros(4, 3).to_sparse()), TypeError,
        r"params\[0\]: sparse or non-strided parameters are not supported"),
    "overlapping (expanded) params": (
        _replace(PARAMS, torch.zeros(1, 3).expand(4, 3)), ValueError,
        r"params\[0\]: a parameter with internal overlap"),
    "lr NaN": (
        _with(lr=float("nan")), ValueError, r"lr must be a finite non-negative number, got nan"),
    "lr tensor NaN": (
        _with(lr=torch.tensor(float("nan"))), ValueError,
        r"lr must be a finite non-negative number, got nan"),
    "lr negative": (
        _with(lr=-0.1), ValueError, r"lr must be a finite non-negative number, got -0.1"),
    "lr tensor of two elements": (
        _with(lr=torch.tensor([0.1, 0.2])), ValueError,
        r"lr as a tensor must hold one element, got shape \(2,\)"),
    "lr not a number": (
        _with(lr="fast"), ValueError, r"lr must be a finite non-negative number, got 'fast'"),
    "lr infinite": (
        _with(lr=float("inf")), ValueError, r"lr must be a finite non-negative number, got inf"),
    "lr tensor -inf": (
        _with(lr=torch.tensor(-float("inf"))), ValueError,
        r"lr must be a finite non-negative number, got -inf"),
    "lr a numeric string": (
        _with(lr="0.1"), ValueError, r"lr must be a finite non-negative number, got '0.1'"),
    "lr integer tensor": (
        _with(lr=torch.tensor(1)), TypeError,
        r"lr as a tensor must be floating point, got torch.int64"),
    "power 0": (
        _with(power=0.0), ValueError, r"power must be a finite number > 0, got 0.0"),
    "power inf": (
        _with(power=float("inf")), ValueError, r"power must be a finite number > 0, got inf"),
    "eps negative": (
        _with(eps=-1e-8), ValueError, r"eps must be a finite non-negative number, got -1e-08"),
    "threshold NaN": (
        _with(threshold=float("nan")), ValueError,
        r"threshold must be a finite non-negative number, got nan"),
    "threshold infinite": (
        _with(threshold=float("inf")), ValueError,
        r"threshold must be a finite non-negative number, got inf"),
    "threshold a string": (
        _with(threshold="0.1"), ValueError,
        r"threshold must be a finite non-negative number, got '0.1'"),
    "grad_scale of two elements": (
        _with(grad_scale=torch.ones(2)), ValueError,
        r"grad_scale must be a one-element tensor or None"),
    "found_inf not a tensor": (
        _with(found_inf=1.0), ValueError, r"found_inf must be a one-element tensor or None"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_step_rejects_bad_input(backend, case):
    make, error, message = BAD_INPUTS[case]
    params, grads, accs, kwargs = make()
    kwargs = {"lr": 0.1, **kwargs}
    dense_cpu = [t for t in params + accs if t.device.type == "cpu" and t.layout == torch.strided]
    untouched = [t.clone() for t in dense_cpu]
    with pytest.raises(error, match=message):
        classp_step_(params, grads, accs, backend=backend, **kwargs)
    assert all(torch.equal(t, u) for t, u in zip(dense_cpu, untouched))


# ---------------------------------------------------------------- inputs that must work
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_element_and_zero_dim_tensors_work(backend):
    shapes = [(0,), (), (0, 5), (7,), ()]
    params = [random_like(s) for s in shapes]
    grads = [random_like(s) for s in shapes]
    accs = [torch.rand(s) for s in shapes]
    expected = [[t.clone() for t in ts] for ts in (params, grads, accs)]
    counts = classp_step_(params, grads, accs, lr=0.1, threshold=1e-4, backend=backend)
    expected_counts = reference_step_(*expected, lr=0.1, threshold=1e-4, eps=1e-5, power=1.0,
                                      apply_scaling=True)
    assert counts.shape == (5, 2) and counts.dtype == torch.int64
    assert torch.equal(counts, expected_counts)
    assert counts[0].tolist() == [0, 0] and counts[2].tolist() == [0, 0]
    for p, a, ref_p, ref_a, shape in zip(params, accs, expected[0], expected[2], shapes):
        assert p.shape == shape and a.shape == shape
        torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, ref_a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr", [np.float32(0.1), torch.tensor(0.1), torch.tensor([0.1]),
                                torch.tensor([[0.1]])], ids=["numpy", "()", "(1,)", "(1,1)"])
def test_every_accepted_lr_form_steps_like_a_float(backend, lr):
    params, grads, accs = _inputs()
    expected = [[t.clone() for t in ts] for ts in (params, grads, accs)]
    counts = classp_step_(params, grads, accs, lr=lr, threshold=1e-4, backend=backend)
    expected_counts = reference_step_(*expected, lr=0.1, threshold=1e-4, eps=1e-5, power=1.0,
                                      apply_scaling=True)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(params[0], expected[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(accs[0], expected[2][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_lists_work(backend):
    counts = classp_step_([], [], [], lr=0.1, backend=backend)
    assert counts.shape == (0, 2) and counts.dtype == torch.int64


# ---------------------------------------------------------------- through the optimizer
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_optimizer_rejects_sparse_grads(backend):
    p = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = CLASSP([p], lr=0.1, backend=backend)
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="CLASSP does not support sparse gradients"):
        optimizer.step()
    assert not optimizer.state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key, value, message", [
    ("lr", float("nan"), r"lr must be a finite non-negative number, got nan"),
    ("lr", torch.tensor(-1.0), r"lr must be a finite non-negative number, got -1.0"),
    ("power", 0.0, r"power must be a finite number > 0, got 0.0"),
    ("eps", -1.0, r"eps must be a finite non-negative number, got -1.0"),
    ("threshold", -1.0, r"threshold must be a finite non-negative number, got -1.0"),
])
def test_param_group_edited_to_a_bad_value_fails_the_step(backend, key, value, message):
    p = torch.nn.Parameter(random_like((4, 3)))
    optimizer = CLASSP([p], lr=0.1, backend=backend)
    p.grad = random_like((4, 3))
    optimizer.step()
    before, acc_before = bits(p), bits(optimizer.state[p]["accumulator"])
    optimizer.param_groups[0][key] = value
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert torch.equal(bits(p), before)
    assert torch.equal(bits(optimizer.state[p]["accumulator"]), acc_before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_optimizer_steps_zero_element_and_zero_dim_params(backend):
    empty, scalar = torch.nn.Parameter(torch.zeros(0, 4)), torch.nn.Parameter(torch.tensor(1.5))
    optimizer = CLASSP([empty, scalar], lr=0.1, backend=backend)
    empty.grad, scalar.grad = torch.zeros(0, 4), torch.tensor(0.5)
    optimizer.step()
    # p=1: A = |g| = 0.5, step = lr * g / (eps + A)
    assert scalar.item() == pytest.approx(1.5 - 0.1 * 0.5 / (1e-5 + 0.5), rel=1e-6)
    assert optimizer.state[empty]["accumulator"].shape == (0, 4)
    assert optimizer.state[scalar]["accumulator"].shape == ()
    assert optimizer.last_update_fraction == 1.0 and optimizer.nonfinite_skipped == 0
