"""Every available backend matches the reference element by element on fresh random data."""
import itertools

import pytest
import torch

from classp_fused import CLASSP, classp_step_
from classp_fused.reference import classp_step_ as reference_step_
from helpers import CPU_BACKENDS, bits, random_like

FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def _make_case(shapes, dtype, seed, nonfinite=False, grad_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [random_like(s, dtype, g) for s in shapes]
    grads = [random_like(s, dtype, g, scale=0.6 * grad_scale) for s in shapes]
    accs = [torch.rand(s, generator=g) for s in shapes]
    if nonfinite:
        for grad in grads:
            flat = grad.view(-1)
            for i, value in zip(range(0, flat.numel(), 7), itertools.cycle(
                    [float("nan"), float("inf"), -float("inf")])):
                flat[i] = value
    return params, grads, accs


def _run_both(backend, shapes, dtype, hyper, seed=0, nonfinite=False, steps=3, **extra):
    ours = _make_case(shapes, dtype, seed, nonfinite, extra.get("grad_scale_value", 1.0))
    theirs = tuple([t.clone() for t in ts] for ts in ours)
    kwargs = {k: v for k, v in extra.items() if k != "grad_scale_value"}
    for _ in range(steps):
        counts = classp_step_(*ours, backend=backend, **hyper, **kwargs)
        expected = reference_step_(*theirs, **hyper, **kwargs)
        assert torch.equal(counts.cpu(), expected.cpu())
    for mine, ref in zip(ours[0], theirs[0]):
        torch.testing.assert_close(mine, ref, **TOLERANCE[dtype])
    for mine, ref in zip(ours[2], theirs[2]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    return ours, theirs


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("threshold", [0.0, 0.09, 1e30])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_masks_powers_and_scaling(backend, power, threshold, apply_scaling):
    hyper = dict(lr=0.05, threshold=threshold, eps=1e-5, power=power, apply_scaling=apply_scaling)
    _run_both(backend, [(257,), (3, 41)], torch.float32, hyper)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_param_dtypes(backend, dtype, power):
    hyper = dict(lr=0.05, threshold=0.01, eps=1e-5, power=power, apply_scaling=True)
    _run_both(backend, [(1000,), (7, 9)], dtype, hyper)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shapes", [[(0,)], [(1,)], [()], [(0,), (5,), (0, 3)], [(4099,)],
                                    [(2 ** 20 + 3,)]],
                         ids=["empty", "one", "0-dim", "with-empty", "odd", "2^20+3"])
def test_sizes(backend, shapes):
    hyper = dict(lr=0.05, threshold=0.01, eps=1e-5, power=1.0, apply_scaling=True)
    _run_both(backend, shapes, torch.float32, hyper, steps=2 if shapes[0] != (2 ** 20 + 3,) else 1)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_many_tensors_in_one_step(backend):
    g = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 300, (150,), generator=g)] + [(33, 65), (2, 3, 4)]
    hyper = dict(lr=0.02, threshold=0.05, eps=1e-5, power=2.0, apply_scaling=True)
    _run_both(backend, shapes, torch.float32, hyper)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_elements_skipped_and_counted(backend, dtype):
    hyper = dict(lr=0.05, threshold=0.0, eps=1e-5, power=1.0, apply_scaling=True)
    ours, _ = _run_both(backend, [(300,), (13, 7)], dtype, hyper, nonfinite=True)
    assert all(torch.isfinite(p).all() for p in ours[0])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_members(backend):
    g = torch.Generator().manual_seed(9)
    base_p, base_g = random_like((40, 30), generator=g), random_like((40, 30), generator=g)
    params = [base_p.t(), base_p.clone()[:, ::3]]
    grads = [base_g.t().contiguous().t().t(), base_g[:, 1::3]]
    assert not params[0].is_contiguous() and not grads[1].is_contiguous()
    accs = [torch.rand(30, 40, generator=g), torch.rand(40, 10, generator=g)]
    ref = ([p.clone() for p in params], [x.clone() for x in grads], [a.clone() for a in accs])
    hyper = dict(lr=0.05, threshold=0.02, eps=1e-5, power=1.0, apply_scaling=True)
    assert torch.equal(classp_step_(params, grads, accs, backend=backend, **hyper),
                       reference_step_(*ref, **hyper))
    for mine, theirs in zip(params + accs, ref[0] + ref[2]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_p.t(), ref[0][0], rtol=1e-5, atol=1e-6)  # written through


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_grad_scale_and_found_inf(backend):
    hyper = dict(lr=0.05, threshold=0.01, eps=1e-5, power=2.0, apply_scaling=True)
    _run_both(backend, [(500,), (9, 9)], torch.float32, hyper, grad_scale=torch.tensor(256.0),
              grad_scale_value=256.0)
    ours, _ = _run_both(backend, [(500,)], torch.float32, hyper, grad_scale=torch.tensor(8.0),
                        found_inf=torch.tensor(1.0))
    fresh = _make_case([(500,)], torch.float32, 0)
    assert torch.equal(bits(ours[0][0]), bits(fresh[0][0]))
    assert torch.equal(ours[2][0], fresh[2][0])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_tensor_lr(backend):
    hyper = dict(lr=torch.tensor(0.05), threshold=0.01, eps=1e-5, power=1.0, apply_scaling=True)
    _run_both(backend, [(700,)], torch.float32, hyper)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_masked_out_elements_are_bit_identical(backend):
    g = torch.Generator().manual_seed(2)
    param = random_like((1031,), generator=g)
    param[::5] = -0.0
    grad = random_like((1031,), generator=g, scale=0.3)
    acc = torch.rand(1031, generator=g)
    masked_out = grad * grad <= 0.09
    before_p, before_a = bits(param).clone(), bits(acc).clone()
    classp_step_([param], [grad], [acc], lr=0.1, threshold=0.09, backend=backend)
    assert torch.equal(bits(param)[masked_out], before_p[masked_out])
    assert torch.equal(bits(acc)[masked_out], before_a[masked_out])
    assert (bits(param)[~masked_out] != before_p[~masked_out]).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_several_param_groups_through_the_optimizer(backend):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(17, 13), torch.nn.Linear(13, 5), torch.nn.Linear(5, 3)]
    copies = [torch.nn.Linear(17, 13), torch.nn.Linear(13, 5), torch.nn.Linear(5, 3)]
    for a, b in zip(layers, copies):
        b.load_state_dict(a.state_dict())
    groups = lambda ls: [{"params": ls[0].parameters(), "power": 2.0},  # noqa: E731
                         {"params": ls[1].parameters(), "threshold": 1e-3, "lr": 0.2},
                         {"params": ls[2].parameters(), "apply_scaling": False, "power": 0.5}]
    fused = CLASSP(groups(layers), lr=0.05, backend=backend)
    reference = CLASSP(groups(copies), lr=0.05, backend="torch")
    x = torch.randn(8, 17)
    for _ in range(5):
        for ls, opt in ((layers, fused), (copies, reference)):
            opt.zero_grad()
            ls[2](torch.tanh(ls[1](torch.tanh(ls[0](x))))).pow(2).mean().backward()
            opt.step()
    for a, b in zip(layers, copies):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert fused.last_update_fraction == reference.last_update_fraction
