"""The C++ CPU ops of the penalty's unfused passes (csrc/classp_penalty_ops.cpp), as the
regularizers reach them through ``classp_fused.regularizers.penalty``: each dtype against the
float64 definition on random data (no zeros), odd and empty sizes, tensors split between
threads, non-contiguous and misaligned layouts, NaN and inf gradients, every form of the
gradient scale and the step size; which path takes a pass; the ops' checks and opcheck; no
temporary the size of the params."""
import itertools

import pytest
import torch

from classp_fused import _extension
from classp_fused.regularizers import penalty as penalty_ops
from helpers import laid_out, peak_extra_bytes

pytestmark = pytest.mark.skipif(not penalty_ops.CPU_KERNELS,
                                reason=f"C++ extension not built: {_extension.LOAD_ERROR}")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# A few roundings of the param dtype (fp32 arithmetic for the three smaller ones).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6),
             torch.float64: dict(rtol=1e-12, atol=1e-12),
             torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
FACTOR = 1.5
# (shape, layout of param and grad, layout of importance and anchor): odd sizes, one larger than
# a work chunk of the op (65536 elements) and than two threads' share, empty and 0-dim tensors,
# misaligned, transposed and gapped views, a penalty laid out unlike its param
LAYOUTS = [((1,), "contiguous", "contiguous"), ((7,), "contiguous", "contiguous"),
           ((33,), "offset", "offset"), ((1000,), "contiguous", "contiguous"),
           ((70001,), "contiguous", "contiguous"), ((0, 3), "contiguous", "contiguous"),
           ((), "contiguous", "contiguous"), ((24, 9), "transposed", "transposed"),
           ((6, 10), "strided", "contiguous"), ((5, 7), "contiguous", "transposed"),
           ((301,), "offset", "contiguous")]


def make_case(dtype, seed, nonfinite=True):
    """Params with .grad, importances > 0 and anchors near the params, in the LAYOUTS; NaN, inf
    and -inf in the first gradients."""
    g = torch.Generator().manual_seed(seed)
    params, importances, anchors = [], [], []
    for shape, layout, penalty_layout in LAYOUTS:
        param = torch.nn.Parameter(laid_out(shape, dtype, g, layout))
        param.grad = laid_out(shape, dtype, g, layout, 0.6)
        params.append(param)
        importances.append(laid_out(shape, dtype, g, penalty_layout).abs() * 2)
        anchors.append((param.detach().double() + laid_out(shape, torch.float64, g,
                                                           penalty_layout, 0.5)).to(dtype))
    if nonfinite:
        values = itertools.cycle([float("nan"), float("inf"), -float("inf")])
        for p in params[3:5]:
            for i in range(0, p.numel(), 11):
                p.grad.view(-1)[i] = next(values)
    return params, importances, anchors


def as_float64(tensors):
    return [t.detach().double() for t in tensors]


def step_sizes(params, g):
    """One step size of each form per param in turn: a float, a 0-dim tensor, a param-shaped
    tensor of the compute dtype, one of float64, one broadcast along the first dim."""
    steps = []
    for i, p in enumerate(params):
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        form = i % 5 if p.dim() else i % 3
        steps.append([0.05, torch.tensor(0.3),
                      torch.rand(p.shape, generator=g, dtype=torch.float64).to(compute) + 0.01,
                      torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.01,
                      torch.rand(p.shape[1:], generator=g) + 0.01][form])
    return steps


@pytest.mark.parametrize("grad_scale", [None, 512.0, torch.tensor(0.25)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_penalty_grad_tracks_the_float64_definition(dtype, grad_scale):
    params, importances, anchors = make_case(dtype, seed=1)
    expected = []
    scale = 1.0 if grad_scale is None else float(grad_scale)
    for p, w, m in zip(params, as_float64(importances), as_float64(anchors)):
        expected.append(p.grad.double() + FACTOR * w * (p.detach().double() - m) * scale)
    penalty_ops.add_penalty_grad_(params, importances, anchors, FACTOR, grad_scale)
    for p, want in zip(params, expected):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, want.to(dtype), equal_nan=True, **TOLERANCE[dtype])
    assert any(torch.isnan(p.grad).any() for p in params)  # NaN gradients stay NaN


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_penalty_grad_creates_a_missing_grad(dtype):
    params, importances, anchors = make_case(dtype, seed=2, nonfinite=False)
    params[3].grad = None
    penalty_ops.add_penalty_grad_(params, importances, anchors, FACTOR)
    want = FACTOR * importances[3].double() * (params[3].detach().double()
                                               - anchors[3].double())
    torch.testing.assert_close(params[3].grad, want.to(dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_proximal_step_tracks_the_float64_definition(dtype):
    params, importances, anchors = make_case(dtype, seed=3)
    steps = step_sizes(params, torch.Generator().manual_seed(4))
    expected = []
    for p, w, m, eta in zip(params, as_float64(importances), as_float64(anchors), steps):
        theta = p.detach().double()
        c = FACTOR * w * (eta.double() if isinstance(eta, torch.Tensor) else eta)
        expected.append(theta + c / (1 + c) * (m - theta))
    before = [(p.detach().clone(), p.stride()) for p in params]
    penalty_ops.proximal_step_(params, importances, anchors, steps, FACTOR)
    for p, (old, stride), want in zip(params, before, expected):
        assert p.dtype == dtype and p.stride() == stride
        torch.testing.assert_close(p.detach(), want.to(dtype), **TOLERANCE[dtype])
        if p.numel() > 1:  # one element may move by less than half its ulp
            assert not torch.equal(p.detach(), old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_proximal_step_pulls_to_the_anchor_where_c_overflows_and_stays_put_at_zero_eta(dtype):
    params, importances, anchors = make_case(dtype, seed=5, nonfinite=False)
    eta = [torch.where(torch.arange(p.numel()).view(p.shape) % 2 == 0, 0.0, 1e38)
           .to(torch.float64 if dtype == torch.float64 else torch.float32) for p in params]
    before = [p.detach().clone() for p in params]
    penalty_ops.proximal_step_(params, [w * 1e3 for w in importances], anchors, eta, 1e30)
    for p, old, m, e in zip(params, before, anchors, eta):
        assert torch.equal(p.detach()[e == 0], old[e == 0])  # theta + 0 * (m - theta)
        torch.testing.assert_close(p.detach()[e > 0], m[e > 0], **TOLERANCE[dtype])


def test_each_pass_takes_the_cpu_op_on_the_cpu_and_the_chunked_ops_elsewhere(monkeypatch):
    """The chunked multi-tensor ops run only where the op does not: off the CPU (meta tensors
    here, standing in for a GPU) or without the extension's kernels."""
    chunked = []
    real_batches = penalty_ops.batches
    monkeypatch.setattr(penalty_ops, "batches",
                        lambda *args: chunked.append(1) or real_batches(*args))
    for device, built, expect_chunked in [("cpu", True, False), ("meta", True, True),
                                          ("cpu", False, True)]:
        monkeypatch.setattr(penalty_ops, "CPU_KERNELS", built)
        params = [torch.nn.Parameter(torch.ones(5, device=device))]
        terms = [torch.ones(5, device=device)], [torch.zeros(5, device=device)]
        chunked.clear()
        penalty_ops.add_penalty_grad_(params, *terms, 2.0)
        penalty_ops.proximal_step_(params, *terms, [0.5], 2.0)
        assert chunked == ([1, 1] if expect_chunked else [])
        if device == "cpu":
            assert torch.equal(params[0].grad, torch.full((5,), 2.0))
            assert torch.equal(params[0].detach(), torch.full((5,), 0.5))
        penalty_ops.add_penalty_grad_([], [], [], 2.0)  # no tensors: nothing to do
        penalty_ops.proximal_step_([], [], [], [], 2.0)


def test_the_op_and_the_chunked_ops_agree(monkeypatch):
    """Same inputs through both paths: within the float32 roundings of the chunked ops."""
    results = []
    for built in (True, False):
        monkeypatch.setattr(penalty_ops, "CPU_KERNELS", built)
        params, importances, anchors = make_case(torch.float32, seed=6)
        steps = step_sizes(params, torch.Generator().manual_seed(7))
        penalty_ops.add_penalty_grad_(params, importances, anchors, FACTOR, torch.tensor(2.0))
        penalty_ops.proximal_step_(params, importances, anchors, steps, FACTOR)
        results.append([t.detach() for p in params for t in (p, p.grad)])
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, equal_nan=True, **TOLERANCE[torch.float32])


def test_the_passes_allocate_nothing_on_dense_params():
    """Peak extra memory of each pass on 1e6 dense float32 elements in 201 tensors: none
    (bounded by a tenth of the params' bytes)."""
    g = torch.Generator().manual_seed(8)
    sizes = [2 ** 19 + 3] + [1 + 37 * i % 4000 for i in range(200)]
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    importances = [torch.rand(n, generator=g) for n in sizes]
    anchors = [torch.randn(n, generator=g) for n in sizes]
    steps = [1e-3 if i % 2 else torch.rand(p.shape, generator=g) for i, p in enumerate(params)]
    grad_scale = torch.tensor(0.5)
    bound = 0.1 * sum(p.numel() * p.element_size() for p in params)
    peaks = [peak_extra_bytes(lambda: penalty_ops.add_penalty_grad_(
                 params, importances, anchors, 2.0, grad_scale)),
             peak_extra_bytes(lambda: penalty_ops.proximal_step_(
                 params, importances, anchors, steps, 2.0))]
    assert max(peaks) <= bound
    assert peaks == [0, 0]


def _op_arguments(n=3):
    params = [torch.randn(4) for _ in range(n)]
    return params, [torch.rand(4) for _ in params], [torch.randn(4) for _ in params]


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(grads=a["grads"][:2]), "must have the same length"),
    (lambda a: a["importances"].__setitem__(1, torch.rand(4, dtype=torch.float64)),
     r"importances\[1\] has dtype"),
    (lambda a: a["anchors"].__setitem__(2, torch.randn(5)), r"anchors\[2\] has shape"),
    (lambda a: a["params"].__setitem__(0, torch.randn(4, dtype=torch.bfloat16)),
     r"importances\[0\] has dtype"),
    (lambda a: a["params"].__setitem__(0, torch.arange(4)), r"params\[0\] must be float16"),
    (lambda a: a["grads"].__setitem__(1, torch.randn(1).expand(4)),
     r"grads\[1\] must not have internal overlap"),
    (lambda a: a.update(grad_scale=torch.ones(2)), "grad_scale must hold one element")])
def test_add_penalty_grad_op_refuses_bad_input_and_changes_nothing(change, match):
    params, importances, anchors = _op_arguments()
    args = dict(params=params, importances=importances, importance_scales=[],
                anchors=anchors,
                grads=[torch.randn(4) for _ in params], factor=2.0, grad_scale=None)
    change(args)
    before = [g.clone() for g in args["grads"]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.classp_fused.add_penalty_grad_(*args.values())
    assert all(torch.equal(g, b) for g, b in zip(args["grads"], before))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(step_values=[0.1]), "must have the same length"),
    (lambda a: a.update(step_tensors=[None]), "step_tensors must be empty or have one entry"),
    (lambda a: a["step_tensors"].__setitem__(1, torch.rand(3)),
     r"step_tensors\[1\] of shape \[3\] does not broadcast"),
    (lambda a: a["step_tensors"].__setitem__(0, torch.arange(4)),
     r"step_tensors\[0\] must be a floating-point tensor"),
    (lambda a: a["params"].__setitem__(2, torch.randn(1).expand(4)),
     r"params\[2\] must not have internal overlap")])
def test_proximal_step_op_refuses_bad_input_and_changes_nothing(change, match):
    params, importances, anchors = _op_arguments()
    args = dict(params=params, importances=importances, importance_scales=[],
                anchors=anchors,
                step_tensors=[None] * 3, step_values=[0.1] * 3, factor=2.0)
    change(args)
    before = [p.clone() for p in args["params"]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.classp_fused.proximal_step_(*args.values())
    assert all(torch.equal(p, b) for p, b in zip(args["params"], before))


def test_opcheck():
    params, importances, anchors = _op_arguments()
    grads = [torch.randn(4) for _ in params]
    torch.library.opcheck(torch.ops.classp_fused.add_penalty_grad_.default,
                          (params, importances, [], anchors, grads, 2.0, torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.classp_fused.proximal_step_.default,
                          (params, importances, [], anchors,
                           [None, torch.rand(4), torch.tensor(0.2)],
                           [0.1, 0.0, 0.0], 2.0))
