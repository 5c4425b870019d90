"""The relative threshold (unitless sparsity, SPEC section 4a): ``g*g > tau * S`` per element, S
the tensor's mean of ``g*g`` over finite elements at its previous step.

Every CPU backend against a float64 computation of the rule written out here, over consecutive
steps with S carried. Gradients are multiples of 1/16 small enough that every sum of squares is
exact in float32 in any order, so the masks, the counts and S itself must match exactly (S
rounded once, by the division); params and accumulators to float rounding. Then AMP (found_inf
leaves S alone, a scaled step equals the unscaled one), tau = 0, the optimizer's state (created,
carried by its plans, saved and loaded, refused when bad) and the regularizer's proximal step.
"""
import copy
import math

import pytest
import torch

from classp_fused import CLASSP, MAS, classp_step_
from classp_fused.backends.step_spec import Penalty
from helpers import CPU_BACKENDS, bits, random_like, tiny_model, train_steps

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter

# empty, 0-dim, odd sizes, a transposed view, one tensor over several chunks and threads
SHAPES = [(0, 3), (), (1,), (37,), (7, 5), (1001,), (70001,)]
TRANSPOSED = 4  # index in SHAPES of the tensor stepped as a transposed view
NONFINITE = (3, 5)  # tensors with NaN/Inf gradient elements
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float64: dict(rtol=1e-12, atol=0)}
HYPER = dict(lr=0.05, eps=1e-5, threshold=0.05)


def wide(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def backends_for(dtype):
    return [b for b in CPU_BACKENDS if not (b == "triton" and dtype == torch.float64)]


def _view(t, i):
    return t.t().contiguous().t() if i == TRANSPOSED else t


def make_state(dtype, seed):
    """Params and accumulators in SHAPES, and gradient means S = 0 (their first step)."""
    g = torch.Generator().manual_seed(seed)
    params = [_view(random_like(s, dtype, g), i) for i, s in enumerate(SHAPES)]
    accs = [_view(torch.rand(s, generator=g, dtype=wide(dtype)) + 1e-3, i)
            for i, s in enumerate(SHAPES)]
    means = [torch.zeros((), dtype=wide(dtype)) for _ in SHAPES]
    return params, accs, means


def make_grads(dtype, seed, nonfinite=True, scale=1.0):
    """Gradients k/16 (times ``scale``, a power of two), |k| small enough that the squares of
    a tensor sum exactly in float32; NaN and +-Inf in the tensors of NONFINITE."""
    g = torch.Generator().manual_seed(1000 + seed)
    grads = []
    for i, shape in enumerate(SHAPES):
        numel = math.prod(shape)
        kmax = min(64, math.isqrt((1 << 24) // max(numel, 1)))
        k = torch.randint(-kmax, kmax + 1, shape, generator=g, dtype=torch.float64)
        grads.append((k / 16 * scale).to(dtype))  # laid out unlike the transposed param
    if nonfinite:
        values = [float("nan"), float("inf"), -float("inf")]
        for i in NONFINITE:
            for j in range(0, grads[i].numel(), 7):
                grads[i].view(-1)[j] = values[j % 3]
    return grads


def clone(tensors, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype) for t in tensors]


def definition_step(params, grads, accs, means, *, lr, threshold, eps, power, apply_scaling,
                    tau, grad_scale=None, found_inf=None, penalty=None, dtype=torch.float64):
    """The rule in float64, in place on float64 tensors, each new param rounded to ``dtype``
    (as a step writes it); returns the ``[updated, nonfinite]`` counts. ``penalty`` is
    ``(scale, importances, anchors)`` of the explicit form."""
    counts = torch.zeros(len(params), 2, dtype=torch.int64)
    if found_inf is not None and float(found_inf) != 0:
        return counts
    for i, (p, g, a) in enumerate(zip(params, grads, accs)):
        g = g / (1.0 if grad_scale is None else float(grad_scale))
        if penalty is not None:
            scale, importances, anchors = penalty
            g = g + 2 * scale * importances[i] * (p - anchors[i])
        finite = torch.isfinite(g)
        square = g * g
        mask = finite & (square > threshold)
        if tau > 0:
            mask &= square > tau * means[i]
        if g.numel():
            means[i] = torch.where(finite, square, 0).sum() / g.numel()
        g = torch.where(mask, g, 0)
        new_a = a + g.abs() ** power
        step = g / (eps + new_a) ** (1 / power) if apply_scaling else g
        p.copy_(torch.where(mask, (p - lr * step).to(dtype).double(), p))
        a.copy_(torch.where(mask, new_a, a))
        counts[i] = torch.stack([mask.sum(), (~finite).sum()])
    return counts


def assert_tracks(dtype, params, accs, means, counts, ref):
    ref_params, ref_accs, ref_means, ref_counts = ref
    assert torch.equal(counts.cpu(), ref_counts)
    for s, rs in zip(means, ref_means):
        assert s.dtype == wide(dtype) and s.dim() == 0
        assert torch.equal(s, rs.to(s.dtype)), (s, rs)  # S rounded once, like the definition
    for p, rp in zip(params, ref_params):
        torch.testing.assert_close(p, rp.to(dtype), **TOLERANCE[dtype])
    for a, ra in zip(accs, ref_accs):
        torch.testing.assert_close(a, ra.to(a.dtype), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("power,tau", [(1.0, 1.0), (2.0, 0.5), (1.5, 2.0)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_tracks_the_float64_rule_over_steps(backend, dtype, power, tau):
    if dtype not in [d for d in DTYPES if backend in backends_for(d)]:
        pytest.skip(f"{backend} steps no {dtype}")
    hyper = dict(HYPER, power=power, apply_scaling=power != 1.5)
    params, accs, means = make_state(dtype, seed=int(power * 10))
    ref_params, ref_accs, ref_means = (clone(ts, torch.float64)
                                       for ts in (params, accs, means))
    updated = []
    for step in range(4):
        grads = make_grads(dtype, step)
        counts = classp_step_(params, grads, accs, **hyper, relative_threshold=tau,
                              grad_sq_means=means, backend=backend)
        ref_counts = definition_step(ref_params, clone(grads, torch.float64), ref_accs,
                                     ref_means, **hyper, tau=tau, dtype=dtype)
        assert_tracks(dtype, params, accs, means, counts,
                      (ref_params, ref_accs, ref_means, ref_counts))
        updated.append(int(counts[:, 0].sum()))
    assert max(updated[1:]) < updated[0]  # S = 0 at first: the absolute threshold alone


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explicit_penalty_gradient_is_what_the_mean_measures(backend):
    dtype = torch.float32
    hyper = dict(HYPER, power=1.0, apply_scaling=True)
    params, accs, means = make_state(dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    importances = [random_like(p.shape, dtype, g).abs() for p in params]
    anchors = [p + random_like(p.shape, dtype, g, 0.5) for p in params]
    ref_params, ref_accs, ref_means = (clone(ts, torch.float64) for ts in (params, accs, means))
    ref_penalty = (0.5, clone(importances, torch.float64), clone(anchors, torch.float64))
    for step in range(3):
        grads = make_grads(dtype, step)
        counts = classp_step_(params, grads, accs, **hyper, relative_threshold=1.0,
                              grad_sq_means=means, backend=backend,
                              penalty=Penalty("explicit", 0.5, importances, anchors))
        ref_counts = definition_step(ref_params, clone(grads, torch.float64), ref_accs,
                                     ref_means, **hyper, tau=1.0, penalty=ref_penalty)
        assert torch.equal(counts, ref_counts)
        for s, rs in zip(means, ref_means):
            torch.testing.assert_close(s, rs.float(), rtol=1e-4, atol=0)  # sums of 70001
        for p, rp in zip(params, ref_params):
            torch.testing.assert_close(p, rp.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scaled_step_equals_unscaled_and_found_inf_changes_nothing(backend, dtype):
    hyper = dict(HYPER, power=2.0, apply_scaling=True)
    plain = make_state(dtype, seed=5)
    scaled = tuple(clone(ts) for ts in plain)
    scale = torch.tensor(1024.0)
    for step in range(3):
        classp_step_(plain[0], make_grads(dtype, step), plain[1], **hyper,
                     relative_threshold=1.0, grad_sq_means=plain[2], backend=backend)
        before = [clone(ts) for ts in scaled]
        counts = classp_step_(scaled[0], make_grads(dtype, step, scale=1024.0), scaled[1],
                              **hyper, relative_threshold=1.0, grad_sq_means=scaled[2],
                              grad_scale=scale, found_inf=torch.ones(1), backend=backend)
        assert not counts.any()
        for old, new in zip(before, scaled):
            assert all(torch.equal(bits(o), bits(n)) for o, n in zip(old, new))
        classp_step_(scaled[0], make_grads(dtype, step, scale=1024.0), scaled[1], **hyper,
                     relative_threshold=1.0, grad_sq_means=scaled[2], grad_scale=scale,
                     found_inf=torch.zeros(1), backend=backend)
        for mine, theirs in zip(scaled, plain):
            assert all(torch.equal(bits(m), bits(t)) for m, t in zip(mine, theirs))
    assert plain[2][-1] > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_tau_ignores_the_means_and_still_refreshes_them(backend):
    """tau = 0 steps exactly as without means, also with means that would block every element
    (S = inf); given means are refreshed all the same."""
    hyper = dict(HYPER, power=1.0, apply_scaling=True)
    plain = make_state(torch.float32, seed=6)
    other = tuple(clone(ts) for ts in plain)
    means = [torch.full((), float("inf")) for _ in SHAPES]
    grads = make_grads(torch.float32, 0)
    counts = classp_step_(plain[0], grads, plain[1], **hyper, backend=backend)
    assert torch.equal(classp_step_(other[0], grads, other[1], **hyper, relative_threshold=0.0,
                                    grad_sq_means=means, backend=backend), counts)
    for mine, theirs in zip(other[:2], plain[:2]):
        assert all(torch.equal(bits(m), bits(t)) for m, t in zip(mine, theirs))
    ref_means = [torch.zeros((), dtype=torch.float64) for _ in SHAPES]
    definition_step(clone(plain[0], torch.float64), clone(grads, torch.float64),
                    clone(plain[1], torch.float64), ref_means, **hyper, tau=0.0)
    assert means[0] == float("inf")  # the empty tensor's S is left as it was
    assert counts[:, 0].sum() > 0
    assert all(torch.equal(s, rs.float()) for s, rs in zip(means[1:], ref_means[1:]))


def test_means_are_checked():
    params, accs, _ = make_state(torch.float32, seed=0)
    grads = make_grads(torch.float32, 0)
    with pytest.raises(ValueError, match="grad_sq_means must be a list"):
        classp_step_(params, grads, accs, **HYPER, relative_threshold=1.0)
    with pytest.raises(TypeError, match=r"grad_sq_means\[1\] must be a 0-dim torch.float32"):
        classp_step_(params, grads, accs, **HYPER, relative_threshold=1.0,
                     grad_sq_means=[torch.zeros(())] + [torch.zeros(1)] * (len(SHAPES) - 1))
    for bad in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="relative_threshold must be a finite non-negative"):
            classp_step_(params, grads, accs, **HYPER, relative_threshold=bad,
                         grad_sq_means=[torch.zeros(()) for _ in SHAPES])


# ----- the optimizer -----

def _grads_scaled(model, factor):
    for p in model.parameters():
        p.grad = p.grad * factor


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_optimizer_density_does_not_depend_on_the_gradients_scale(backend):
    """The same model and data with the gradients scaled by 2**-14 or 2**14: the relative
    threshold updates the same elements at every scale."""
    fractions = []
    for factor in (2.0 ** -14, 1.0, 2.0 ** 14):
        model = tiny_model()
        optimizer = CLASSP(model.parameters(), lr=0.01, threshold=0.0, eps=0.0,
                           relative_threshold=1.0, backend=backend)  # eps 0: scale-free steps
        g = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
            _grads_scaled(model, factor)
            optimizer.step()
            steps.append(optimizer.last_update_fraction)
        fractions.append(steps)
    assert fractions[0] == fractions[1] == fractions[2]
    assert fractions[1][0] == 1.0 and fractions[1][1] < 0.7


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_optimizer_steps_as_the_op_and_switches_the_threshold(backend):
    """CLASSP (its first step, then its cached plans) against the op on copies; switching tau
    on creates S at zero, switching it off leaves S as it was."""
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, threshold=0.0, relative_threshold=0.8,
                       backend=backend)
    params = [p.detach().clone() for p in model.parameters()]
    accs = [torch.zeros_like(p) for p in params]
    means = [torch.zeros(()) for _ in params]
    g = torch.Generator().manual_seed(1)
    for tau in (0.0, 0.8, 0.8, 0.8, 0.0, 0.0, 1.5, 1.5):
        optimizer.param_groups[0]["relative_threshold"] = tau
        optimizer.zero_grad()
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        kept = [s.clone() for s in means]
        optimizer.step()
        classp_step_(params, grads, accs, lr=0.05, threshold=0.0, eps=1e-5, power=1.0,
                     relative_threshold=tau, grad_sq_means=means if tau else None,
                     backend=backend)
        states = [optimizer.state[p] for p in model.parameters()]
        for p, mine, acc, s, state in zip(model.parameters(), params, accs, means, states):
            assert torch.equal(p, mine) and torch.equal(state["accumulator"], acc)
            if "grad_sq_mean" in state:
                assert torch.equal(state["grad_sq_mean"], s)
            else:
                assert s == 0  # never stepped with tau > 0
        if tau == 0:
            assert all(torch.equal(s, k) for s, k in zip(means, kept))
    assert all("grad_sq_mean" in state for state in states)


def test_optimizer_without_tau_has_no_means():
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, optimizer, steps=2)
    assert all(set(state) == {"step", "accumulator"} for state in optimizer.state.values())
    assert optimizer.param_groups[0]["relative_threshold"] == 0.0


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_state_dict_round_trip(dtype):
    model = tiny_model(dtype)
    optimizer = CLASSP(model.parameters(), lr=0.05, relative_threshold=1.0)
    train_steps(model, optimizer, steps=3)
    saved = optimizer.state_dict()
    twin = tiny_model(dtype)
    twin.load_state_dict(model.state_dict())
    loaded = CLASSP(twin.parameters(), lr=0.05)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["relative_threshold"] == 1.0
    for p in twin.parameters():
        mean = loaded.state[p]["grad_sq_mean"]
        assert mean.dtype == torch.float32 and mean.dim() == 0 and mean > 0
        assert mean.data_ptr() != saved["state"][0]["grad_sq_mean"].data_ptr()
    train_steps(model, optimizer, steps=2, seed=7)
    train_steps(twin, loaded, steps=2, seed=7)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["grad_sq_mean"], loaded.state[q]["grad_sq_mean"])


def test_state_dict_saved_before_the_relative_threshold_loads():
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, optimizer, steps=1)
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["relative_threshold"]
    fresh = CLASSP(tiny_model().parameters(), lr=0.05, relative_threshold=2.0)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["relative_threshold"] == 0.0


@pytest.mark.parametrize("bad,error", [
    (torch.tensor(float("nan")), ValueError), (torch.tensor(-1.0), ValueError),
    (torch.tensor(float("inf")), ValueError), (torch.zeros(2), TypeError),
    (torch.tensor(1), TypeError), (1.0, TypeError)])
def test_bad_saved_mean_is_refused_and_changes_nothing(bad, error):
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, relative_threshold=1.0)
    train_steps(model, optimizer, steps=2)
    saved = optimizer.state_dict()
    saved["state"][1]["grad_sq_mean"] = bad
    other = tiny_model(seed=1)
    target = CLASSP(other.parameters(), lr=0.05, relative_threshold=1.0)
    train_steps(other, target, steps=1)
    before = {key: dict(entry) for key, entry in target.state_dict()["state"].items()}
    with pytest.raises(error, match=r"state_dict\['state'\]\[1\]\['grad_sq_mean'\]"):
        target.load_state_dict(saved)
    after = target.state_dict()["state"]
    assert all(after[key][name] is value for key, entry in before.items()
               for name, value in entry.items())


def test_a_mean_assigned_in_another_form_is_settled_before_the_step():
    """A mean set by hand as a (1,) float64 tensor steps as the 0-dim fp32 mean it holds."""
    model, twin = tiny_model(), tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, relative_threshold=1.0)
    settled = CLASSP(twin.parameters(), lr=0.05, relative_threshold=1.0)
    for m, o in ((model, optimizer), (twin, settled)):
        train_steps(m, o, steps=2)
    weight, twin_weight = model[0].weight, twin[0].weight
    optimizer.state[weight]["grad_sq_mean"] = torch.tensor([0.25], dtype=torch.float64)
    settled.state[twin_weight]["grad_sq_mean"] = torch.tensor(0.25)
    train_steps(model, optimizer, steps=1, seed=3)
    train_steps(twin, settled, steps=1, seed=3)
    mean = optimizer.state[weight]["grad_sq_mean"]
    assert mean.dtype == torch.float32 and mean.dim() == 0
    assert torch.equal(mean, settled.state[twin_weight]["grad_sq_mean"])
    assert torch.equal(weight, twin_weight)


@pytest.mark.parametrize("bad,error,message", [
    (torch.tensor([float("nan")]), ValueError, "must be a finite mean >= 0"),
    (torch.zeros(2), TypeError, "must be a one-element floating-point tensor")])
def test_a_bad_mean_assigned_by_hand_fails_the_step_before_anything_changes(bad, error,
                                                                           message):
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, relative_threshold=1.0)
    train_steps(model, optimizer, steps=2)
    optimizer.state[model[0].weight]["grad_sq_mean"] = bad
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=r"the grad_sq_mean of param group 0, param 0 " + message):
        train_steps(model, optimizer, steps=1, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_a_copied_optimizer_with_a_bad_mean_is_refused():
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, relative_threshold=1.0)
    train_steps(model, optimizer, steps=2)
    twin = copy.deepcopy(optimizer)  # state with means passes the checks of entering state
    assert all("grad_sq_mean" in state for state in twin.state.values())
    optimizer.state[model[0].weight]["grad_sq_mean"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match=r"param group 0, param 0: state\['grad_sq_mean'\]"):
        copy.deepcopy(optimizer)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), True, "1"])
def test_bad_relative_threshold_is_refused(bad):
    with pytest.raises(ValueError, match="relative_threshold must be a finite non-negative"):
        CLASSP(tiny_model().parameters(), lr=0.05, relative_threshold=bad)
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, optimizer, steps=1)
    optimizer.param_groups[0]["relative_threshold"] = bad
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="param group 0: relative_threshold"):
        train_steps(model, optimizer, steps=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_legacy_mode_refuses_the_relative_threshold():
    with pytest.raises(ValueError, match="relative_threshold needs mode='paper'"):
        CLASSP(tiny_model().parameters(), lr=0.05, mode="legacy", backend="torch",
               relative_threshold=1.0)
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, mode="legacy", backend="torch")
    optimizer.param_groups[0]["relative_threshold"] = 1.0
    with pytest.raises(ValueError, match="param group 0: relative_threshold needs mode='paper'"):
        train_steps(model, optimizer, steps=1)


def test_separate_proximal_step_refuses_the_relative_threshold():
    model = tiny_model()
    mas = MAS(model, lam=1.0)
    mas.consolidate([torch.randn(4, 6)])
    optimizer = CLASSP(model.parameters(), lr=0.05, relative_threshold=1.0)
    train_steps(model, optimizer, steps=1)
    with pytest.raises(ValueError, match="relative_threshold > 0"):
        mas.proximal_step_(optimizer)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_op_schema_and_fake_impl():
    """opcheck of the C++ op with gradient means: the schema says they are written."""
    params, accs, means = make_state(torch.float32, seed=8)
    grads = make_grads(torch.float32, 0, nonfinite=False)
    means = [torch.full((), 0.3) for _ in means]
    torch.library.opcheck(torch.ops.classp_fused.classp_step_.default,
                          (params, grads, accs, torch.tensor(0.05), 0.0, 1e-5, 1.0, True, None,
                           None, [], [], "none", 0.0, [], 1.0, means, [], None, []))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed")
def test_triton_traced_form_refreshes_the_means():
    """The triton op's traceable body (what torch.compile runs) steps as its eager kernel."""
    from classp_fused.backends import triton as triton_backend
    eager = make_state(torch.float32, seed=9)
    traced = tuple(clone(ts) for ts in eager)
    op = triton_backend.classp_step_triton
    for step in range(2):
        grads = make_grads(torch.float32, step)
        args = (torch.tensor(0.05), 0.05, 1e-5, 1.0, True, None, None, [], [], "none", 0.0, [], 1.0)
        counts = op(eager[0], grads, eager[1], *args, eager[2], [], None, [])
        with op.set_kernel_enabled("cpu", False):
            assert torch.equal(op(traced[0], grads, traced[1], *args, traced[2], [], None, []),
                               counts)
        for mine, theirs in zip(traced, eager):
            assert all(torch.equal(m, t) for m, t in zip(mine, theirs))
    assert eager[2][-1] > 0
    torch.library.opcheck(op, (eager[0], grads, eager[1], *args, eager[2], [], None, []))
