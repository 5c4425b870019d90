"""The penalty inside the CLASSP step (SPEC section 4a) and ``Regularizer.attach``.

Every CPU backend against the float64 definition element by element; the attached step against
the two passes it replaces (``add_penalty_grad_(); step()`` and ``step(); proximal_step_()``);
attach and detach on CLASSP (the fused kernel) and on other optimizers (step hooks); a step
that raises changes nothing."""
import itertools

import pytest
import torch

from classp_fused import CLASSP, EWC, MAS, classp_step_
from classp_fused.backends.step_spec import Penalty
from classp_fused.reference import classp_step_ as reference_step_
from helpers import CPU_BACKENDS, bits, random_like, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter

FORMS = ("explicit", "proximal")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE = 0.5
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
HYPER = dict(lr=0.05, eps=1e-5, apply_scaling=True)


def _contiguous(shape, dtype, g, scale=1.0):
    return random_like(shape, dtype, g, scale)


def _offset(shape, dtype, g, scale=1.0):
    """A view one element into its storage: misaligned for vector loads."""
    return random_like(torch.Size(shape).numel() + 1, dtype, g, scale)[1:].view(shape)


def _transposed(shape, dtype, g, scale=1.0):
    return random_like(shape[::-1], dtype, g, scale).t()


def _strided(shape, dtype, g, scale=1.0):
    """Every other column of a wider tensor: gaps between the rows."""
    return random_like((shape[0], 2 * shape[1]), dtype, g, scale)[:, ::2]


# (shape, layout of param/grad/accumulator, layout of importance/anchor, covered by the penalty)
LAYOUTS = [((700,), _contiguous, _contiguous, True),
           ((301,), _offset, _offset, True),
           ((24, 9), _transposed, _transposed, True),
           ((5, 7), _contiguous, _transposed, True),   # penalty laid out unlike its param
           ((6, 10), _strided, _contiguous, True),
           ((0, 3), _contiguous, _contiguous, True),
           ((), _contiguous, _contiguous, True),
           ((33,), _contiguous, None, False)]       # no state: steps without the penalty


def make_case(dtype, seed, *, nonfinite=True, grad_scale=1.0):
    """Params, grads, accumulators, importances and anchors in the layouts of LAYOUTS."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    params, grads, accs, importances, anchors = [], [], [], [], []
    for shape, layout, penalty_layout, covered in LAYOUTS:
        param = layout(shape, dtype, g)
        params.append(param)
        grads.append(layout(shape, dtype, g, 0.6 * grad_scale))
        accs.append(layout(shape, wide, g).abs())
        if covered:
            importances.append(penalty_layout(shape, dtype, g).abs() * 2)
            # anchors near the params: theta - m comparable to the gradient
            anchors.append((param.to(wide) + penalty_layout(shape, wide, g, 0.5)).to(dtype))
        else:
            importances.append(None)
            anchors.append(None)
    if nonfinite:
        values = itertools.cycle([float("nan"), float("inf"), -float("inf")])
        for grad in grads[:2]:
            for i in range(0, grad.numel(), 11):
                grad.view(-1)[i] = next(values)
    return params, grads, accs, importances, anchors


def clone(tensors, dtype=None):
    return [None if t is None else t.detach().clone().to(dtype or t.dtype) for t in tensors]


def step_float64(case, form, hyper, **amp):
    """The float64 definition: the reference on float64 copies of every input."""
    params, grads, accs, importances, anchors = (clone(ts, torch.float64) for ts in case)
    counts = reference_step_(params, grads, accs, **hyper, **amp,
                             penalty=Penalty(form, SCALE, importances, anchors))
    return params, accs, counts


def step_backend(backend, case, form, hyper, **amp):
    params, grads, accs, importances, anchors = (clone(ts) for ts in case)
    counts = classp_step_(params, grads, accs, **hyper, **amp, backend=backend,
                          penalty=Penalty(form, SCALE, importances, anchors))
    return params, accs, counts


def assert_tracks(mine, definition, dtype):
    params, accs, counts = mine
    ref_params, ref_accs, ref_counts = definition
    assert torch.equal(counts.cpu(), ref_counts)
    for p, rp in zip(params, ref_params):
        torch.testing.assert_close(p.cpu(), rp.to(dtype), **TOLERANCE[dtype])
    for a, ra in zip(accs, ref_accs):
        torch.testing.assert_close(a.cpu(), ra.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_every_backend_tracks_the_float64_definition(backend, form, dtype, power, threshold):
    case = make_case(dtype, seed=int(power * 10) + (threshold > 0))
    hyper = dict(HYPER, power=power, threshold=threshold)
    mine = step_backend(backend, case, form, hyper)
    definition = step_float64(case, form, hyper)
    assert_tracks(mine, definition, dtype)
    updated, nonfinite = mine[2][:, 0], mine[2][:, 1]
    assert 0 < int(updated.sum()) < sum(p.numel() for p in case[0])
    assert int(nonfinite[:2].sum()) > 0 and int(nonfinite[2:].sum()) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_scale_divides_the_gradient_before_the_penalty_joins(backend, form, dtype):
    case = make_case(dtype, seed=3, grad_scale=1024.0)
    hyper = dict(HYPER, power=2.0, threshold=0.01)
    amp = dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    assert_tracks(step_backend(backend, case, form, hyper, **amp),
                  step_float64(case, form, hyper, **amp), dtype)
    # the penalty is not scaled: without the division the result would differ
    unscaled = (case[0], [g / 1024 for g in case[1]], *case[2:])
    assert_tracks(step_backend(backend, case, form, hyper, **amp),
                  step_float64(unscaled, form, hyper), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_without_scaling_the_step_size_is_lr(backend, form):
    case = make_case(torch.float32, seed=4)
    hyper = dict(HYPER, power=1.0, threshold=0.01, apply_scaling=False)
    assert_tracks(step_backend(backend, case, form, hyper), step_float64(case, form, hyper),
                  torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_found_inf_skips_the_step_and_the_penalty(backend, form):
    case = make_case(torch.float32, seed=5)
    before = [bits(t).clone() for ts in case for t in ts if t is not None]
    params, grads, accs, importances, anchors = case
    counts = classp_step_(params, grads, accs, **HYPER, power=1.0, threshold=0.0,
                          grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0),
                          penalty=Penalty(form, SCALE, importances, anchors), backend=backend)
    assert not counts.any()
    assert all(torch.equal(b, bits(t)) for b, t in zip(
        before, [t for ts in case for t in ts if t is not None]))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fast_paths_equal_the_reference_bit_for_bit(backend, form, dtype, power):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton kernel steps no float64")
    case = make_case(dtype, seed=6)
    hyper = dict(HYPER, power=power, threshold=0.02)
    mine = step_backend(backend, case, form, hyper)
    ref = step_backend("torch", case, form, hyper)
    exact = backend != "triton"  # the interpreter's numpy rounds some operations differently
    assert torch.equal(mine[2].cpu(), ref[2])
    for t, r in zip(mine[0] + mine[1], ref[0] + ref[1]):
        if exact:
            assert torch.equal(bits(t.cpu()), bits(r))
        else:
            torch.testing.assert_close(t.cpu(), r, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_overflowing_penalty_is_counted_and_a_huge_proximal_one_lands_on_the_anchor(backend):
    param = torch.tensor([1.0, 2.0, 3.0, -4.0])
    anchor = torch.tensor([0.0, -1e30, 0.5, 0.25])
    importance = torch.tensor([0.5, 3e38, 3e38, float("inf")])
    grad = torch.tensor([0.3, 0.3, 0.3, 0.3])
    explicit = [param.clone()], [torch.zeros(4)]
    counts = classp_step_(explicit[0], [grad], explicit[1], **HYPER, power=1.0, threshold=0.0,
                          penalty=Penalty("explicit", 1.0, [importance], [anchor]),
                          backend=backend)
    # the penalty gradients of elements 1 to 3 overflow: skipped and counted
    assert counts.tolist() == [[1, 3]]
    assert torch.equal(explicit[0][0][1:], param[1:]) and explicit[0][0][0] != param[0]
    proximal = [param.clone()], [torch.zeros(4)]
    classp_step_(proximal[0], [grad], proximal[1], **HYPER, power=1.0, threshold=0.0,
                 penalty=Penalty("proximal", 1.0, [importance], [anchor]), backend=backend)
    # c capped: w = 1, every element with an overflowing c lands on its anchor
    torch.testing.assert_close(proximal[0][0][1:], anchor[1:], rtol=1e-6, atol=1e-6)
    assert proximal[0][0][0] != param[0] and torch.isfinite(proximal[0][0]).all()


def codes(importance):
    """``importance`` (shape kept) as 8-bit codes, without its block scales."""
    return torch.zeros(importance.shape, dtype=torch.uint8)


def test_penalty_lists_are_checked_before_anything_changes():
    case = make_case(torch.float32, seed=7, nonfinite=False)
    params, grads, accs, importances, anchors = case
    before = [bits(t).clone() for ts in case for t in ts if t is not None]
    bad = {
        "dtype": (TypeError, r"penalty.importances\[0\] has dtype torch.float64",
                  lambda w, m: ([w[0].double()] + w[1:], m)),
        "shape": (ValueError, r"penalty.anchors\[2\] has shape",
                  lambda w, m: (w, m[:2] + [m[2][:3]] + m[3:])),
        "pair": (ValueError, r"params\[1\] has an importance but no anchor",
                 lambda w, m: (w, [m[0], None] + m[2:])),
        "length": (ValueError, "one entry per param", lambda w, m: (w[:-1], m)),
        "device": (RuntimeError, r"penalty.importances\[0\] is on meta",
                   lambda w, m: ([torch.empty_like(w[0], device="meta")] + w[1:], m)),
        "anchor dtype": (TypeError, r"penalty.anchors\[0\] has dtype torch.bfloat16",
                         lambda w, m: (w, [m[0].bfloat16()] + m[1:])),
        "codes without scales": (TypeError, r"penalty.importance_scales\[0\] must be a "
                                 r"contiguous float32 tensor",
                                 lambda w, m: ([codes(w[0])] + w[1:], m)),
        "scales of a float importance": (ValueError, r"importance_scales\[1\] must be None",
                                         lambda w, m: (w, m, [None, torch.ones(1)]
                                                       + [None] * (len(w) - 2))),
        "scales length": (ValueError, "importance_scales must be None or a list with one "
                          "entry per param", lambda w, m: (w, m, [None])),
        "scales shape": (TypeError, r"importance_scales\[0\] must be a contiguous float32 "
                         r"tensor of shape", lambda w, m: ([codes(w[0])] + w[1:], m,
                                                            [torch.ones(1)]
                                                            + [None] * (len(w) - 1))),
    }
    for error, message, corrupt in bad.values():
        w, m, *scales = corrupt(importances, anchors)
        with pytest.raises(error, match=message):
            classp_step_(params, grads, accs, **HYPER, power=1.0,
                         penalty=Penalty("explicit", SCALE, w, m, *scales))
    with pytest.raises(ValueError, match="form must be one of"):
        classp_step_(params, grads, accs, **HYPER, penalty=Penalty("both", SCALE, importances,
                                                                    anchors))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        classp_step_(params, grads, accs, **HYPER, penalty=Penalty("explicit", -1.0, importances,
                                                                    anchors))
    assert all(torch.equal(b, bits(t)) for b, t in zip(
        before, [t for ts in case for t in ts if t is not None]))


# The optimizer and the regularizers: attach against the two passes it replaces.

def _regularizer(kind, model, form):
    if kind == "mas":
        return MAS(model, lam=3.0, penalty=form)
    return EWC(model, lam=6.0, mode=kind, fisher="exact", penalty=form)


def _consolidated(kind, form, dtype=torch.float32, seed=0):
    """A model moved away from the anchor of a consolidated regularizer."""
    model = tiny_model(dtype, seed=seed)
    g = torch.Generator().manual_seed(5)
    reg = _regularizer(kind, model, form)
    reg.consolidate([torch.randn(16, 6, generator=g).to(dtype)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(dtype), alpha=0.2)
    return model, reg


def _batches(dtype, steps=4):
    g = torch.Generator().manual_seed(9)
    return [torch.randn(8, 6, generator=g).to(dtype) for _ in range(steps)]


def _backward(model, x, optimizer):
    optimizer.zero_grad()
    model(x).float().pow(2).mean().backward()


def _train_attached(model, reg, optimizer, batches, scaler=None):
    reg.attach(optimizer)
    counts = []
    for x in batches:
        optimizer.zero_grad()
        loss = model(x).float().pow(2).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        if isinstance(optimizer, CLASSP):
            counts.append(optimizer.last_step_counts[0].clone())
    return counts


def _train_manual(model, reg, optimizer, batches):
    counts = []
    for x in batches:
        _backward(model, x, optimizer)
        if reg.penalty_form == "explicit":
            reg.add_penalty_grad_()
        optimizer.step()
        if reg.penalty_form == "proximal":
            reg.proximal_step_(optimizer)
        if isinstance(optimizer, CLASSP):
            counts.append(optimizer.last_step_counts[0].clone())
    return counts


def _assert_models_close(a, b, dtype, exact=False):
    for p, q in zip(a.parameters(), b.parameters()):
        if exact:
            assert torch.equal(bits(p), bits(q))
        else:
            torch.testing.assert_close(p, q, **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["mas", "separate", "online"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attached_classp_equals_the_two_passes(backend, form, kind, dtype):
    # bf16: the two passes round the penalized gradient (explicit) or the pull (proximal) to
    # bf16 first; a threshold would turn those roundings into different masks
    threshold = 1e-3 if dtype == torch.float32 else 0.0
    runs = []
    for train in (_train_attached, _train_manual):
        model, reg = _consolidated(kind, form, dtype)
        optimizer = CLASSP(model.parameters(), lr=0.05, threshold=threshold, power=2.0,
                           backend=backend)
        runs.append((model, train(model, reg, optimizer, _batches(dtype))))
    (fused, fused_counts), (manual, manual_counts) = runs
    _assert_models_close(fused, manual, dtype)
    numel = sum(p.numel() for p in fused.parameters())
    for mine, theirs in zip(fused_counts, manual_counts):  # telemetry of the penalized step
        if dtype == torch.float32:
            assert torch.equal(mine, theirs)
            assert 0 < int(mine[:, 0].sum()) < numel  # the threshold masks some elements
        else:  # a penalized gradient that rounds to zero in bf16 is not updated there
            assert int((mine - theirs).abs().sum()) <= numel // 50


@pytest.mark.parametrize("name", ["sgd", "adam", "adam-fused"])
@pytest.mark.parametrize("form", FORMS)
def test_attached_hooks_equal_the_manual_calls(name, form):
    build = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
             "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
             "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True)}[name]
    runs = []
    for train in (_train_attached, _train_manual):
        model, reg = _consolidated("mas", form)
        train(model, reg, build(model.parameters()), _batches(torch.float32))
        runs.append(model)
    _assert_models_close(*runs, torch.float32, exact=True)


@pytest.mark.parametrize("form", FORMS)
def test_a_closure_gets_the_penalty_after_its_backward(form):
    runs = []
    for attached in (True, False):
        model, reg = _consolidated("mas", form)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        if attached:
            reg.attach(optimizer)
        for x in _batches(torch.float32):
            def closure():
                _backward(model, x, optimizer)
                if not attached and form == "explicit":
                    reg.add_penalty_grad_()
                return 0.0
            optimizer.step(closure)
            if not attached and form == "proximal":
                reg.proximal_step_(optimizer)
        runs.append(model)
    _assert_models_close(*runs, torch.float32, exact=True)


@pytest.mark.parametrize("name", ["classp", "sgd", "adam-fused"])
@pytest.mark.parametrize("form", FORMS)
def test_under_a_grad_scaler_the_attached_step_is_the_unscaled_one(name, form):
    build = {"classp": lambda ps: CLASSP(ps, lr=0.05, threshold=1e-6),
             "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
             "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True)}[name]
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        model, reg = _consolidated("mas", form)
        _train_attached(model, reg, build(model.parameters()), _batches(torch.float32), scaler)
        runs.append(model)
    # power-of-two scale on fp32: any difference is a penalty taken at the wrong scale
    _assert_models_close(*runs, torch.float32, exact=True)


@pytest.mark.parametrize("name", ["classp", "sgd", "adam-fused"])
@pytest.mark.parametrize("form", FORMS)
def test_an_overflowed_scaled_step_applies_no_penalty(name, form):
    build = {"classp": lambda ps: CLASSP(ps, lr=0.05),
             "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
             "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True)}[name]
    model, reg = _consolidated("mas", form)
    optimizer = build(model.parameters())
    reg.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [bits(p).clone() for p in model.parameters()]
    optimizer.zero_grad()
    scaler.scale(model(_batches(torch.float32)[0]).pow(2).mean()).backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(optimizer)
    assert all(torch.equal(b, bits(p)) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("backend", ["cpp", "foreach"])
def test_a_later_consolidate_or_load_takes_effect_at_the_next_step(backend):
    """The step's plan keeps the penalty terms until the regularizer's state is replaced."""
    runs = []
    for attached in (True, False):
        model, reg = _consolidated("mas", "explicit")
        optimizer = CLASSP(model.parameters(), lr=0.05, backend=backend)
        if attached:
            reg.attach(optimizer)
        saved = None
        for step, x in enumerate(_batches(torch.float32, steps=6)):
            if step == 2:
                saved = reg.state_dict()
                reg.consolidate([x * 3])
            if step == 4:
                reg.load_state_dict(saved)
            _backward(model, x, optimizer)
            if not attached:
                reg.add_penalty_grad_()
            optimizer.step()
        runs.append(model)
    _assert_models_close(*runs, torch.float32)


def test_the_penalty_form_and_lam_are_read_at_every_step():
    runs = []
    for attached in (True, False):
        model, reg = _consolidated("mas", "explicit")
        optimizer = CLASSP(model.parameters(), lr=0.05, threshold=1e-6)
        if attached:
            reg.attach(optimizer)
        for step, x in enumerate(_batches(torch.float32, steps=4)):
            if step == 2:
                reg.penalty_form, reg.lam = "proximal", 7.0
            _backward(model, x, optimizer)
            if not attached and reg.penalty_form == "explicit":
                reg.add_penalty_grad_()
            optimizer.step()
            if not attached and reg.penalty_form == "proximal":
                reg.proximal_step_(optimizer)
        runs.append(model)
    _assert_models_close(*runs, torch.float32)
    with pytest.raises(ValueError, match="penalty must be one of"):
        reg.penalty_form = "implicit"


def _optimizer_snapshot(optimizer):
    return (dict(vars(optimizer)), list(optimizer._optimizer_step_pre_hooks),
            list(optimizer._optimizer_step_post_hooks))


@pytest.mark.parametrize("name", ["classp", "sgd"])
def test_detach_restores_the_optimizer(name):
    model, reg = _consolidated("mas", "explicit")
    build = {"classp": lambda ps: CLASSP(ps, lr=0.05), "sgd": lambda ps: torch.optim.SGD(ps, 0.05)}
    optimizer = build[name](model.parameters())
    _backward(model, _batches(torch.float32)[0], optimizer)
    optimizer.step()  # a plan exists before attach
    snapshot = _optimizer_snapshot(optimizer)
    reg.attach(optimizer)
    assert reg.attached_to is optimizer
    _train_attached_steps(model, optimizer, 2)
    reg.detach()
    assert reg.attached_to is None
    after = _optimizer_snapshot(optimizer)
    assert after[1:] == snapshot[1:] and set(after[0]) == set(snapshot[0])
    if name == "classp":
        assert optimizer._penalty_source is None
        assert all(plan.terms is None and plan.penalty_source is None
                   for plan in optimizer._plans.values())
    # and it steps as one never attached
    twin, _ = _consolidated("mas", "explicit")
    twin.load_state_dict(model.state_dict())
    twin_optimizer = build[name](twin.parameters())
    twin_optimizer.load_state_dict(optimizer.state_dict())
    _train_attached_steps(model, optimizer, 2)
    _train_attached_steps(twin, twin_optimizer, 2)
    _assert_models_close(model, twin, torch.float32, exact=True)
    reg.detach()  # detaching again does nothing


def _train_attached_steps(model, optimizer, steps):
    for x in _batches(torch.float32, steps):
        _backward(model, x, optimizer)
        optimizer.step()


def test_attach_refuses_and_changes_nothing():
    model, mas = _consolidated("mas", "explicit")
    optimizer = CLASSP(model.parameters(), lr=0.05)
    snapshot = _optimizer_snapshot(optimizer)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        mas.attach(object())
    partial = CLASSP(list(model.parameters())[:2], lr=0.05)
    with pytest.raises(ValueError, match=r"does not hold the regularized parameter\(s\) "
                                         r"\['2.weight', '2.bias'\]"):
        mas.attach(partial)
    assert partial._penalty_source is None and mas.attached_to is None
    mas.attach(optimizer)
    with pytest.raises(RuntimeError, match="attached to an optimizer already"):
        mas.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    other = MAS(model, lam=1.0)
    with pytest.raises(RuntimeError, match="takes the penalty of another MAS already"):
        other.attach(optimizer)
    assert optimizer._penalty_source is mas and other.attached_to is None
    mas.detach()
    assert _optimizer_snapshot(optimizer)[1:] == snapshot[1:]
    # state on another device than the parameters
    moved, ewc = _consolidated("separate", "explicit")
    ewc._anchor["0.bias"] = ewc._anchor["0.bias"].to("meta")
    sgd = torch.optim.SGD(moved.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="EWC's anchor of '0.bias' is on meta"):
        ewc.attach(sgd)
    assert not sgd._optimizer_step_pre_hooks and ewc.attached_to is None


def test_a_step_that_raises_changes_nothing():
    model, mas = _consolidated("mas", "explicit")
    params = list(model.parameters())
    optimizer = CLASSP([{"params": params[:2]}, {"params": params[2:]}], lr=0.05)
    mas.attach(optimizer)
    _train_attached_steps(model, optimizer, 1)
    _backward(model, _batches(torch.float32)[1], optimizer)

    def everything():
        tensors = [*params, *(p.grad for p in params), *mas.importance.values(),
                   *mas.anchor.values()]
        tensors += [t for state in optimizer.state.values() for t in state.values()]
        return [bits(t).clone() for t in tensors]

    before = everything()
    good = mas._importance
    mas._importance = {**good, "2.weight": good["2.weight"].double()}  # the second group's
    with pytest.raises(TypeError, match=r"the penalty of MAS on param group 1.importances\[0\] "
                                        r"has dtype torch.float64"):
        optimizer.step()
    mas._importance = good
    mas.lam = float("nan")
    with pytest.raises(ValueError, match="MAS: penalty scale must be a finite number"):
        optimizer.step()
    mas.lam = 3.0
    assert all(torch.equal(b, a) for b, a in zip(before, everything()))


def test_nonfinite_raise_sees_the_penalized_gradient():
    model, mas = _consolidated("mas", "explicit")
    optimizer = CLASSP(model.parameters(), lr=0.05, nonfinite="raise")
    mas.attach(optimizer)
    _backward(model, _batches(torch.float32)[0], optimizer)
    before = [bits(p).clone() for p in model.parameters()]
    mas._importance = {**mas._importance,
                       "2.bias": torch.full_like(mas._importance["2.bias"], float("inf"))}
    with pytest.raises(FloatingPointError, match="param group 0, param 3"):
        optimizer.step()
    assert all(torch.equal(b, bits(p)) for b, p in zip(before, model.parameters()))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("form", FORMS)
def test_opcheck_of_the_cpp_op_with_a_penalty(form):
    params, grads, accs, importances, anchors = make_case(torch.float32, seed=8)
    lr = torch.tensor(0.05, dtype=torch.float64)
    torch.library.opcheck(torch.ops.classp_fused.classp_step_.default,
                          (params, grads, accs, lr, 0.01, 1e-5, 2.0, True, None, None,
                           importances, anchors, form, SCALE, [], 0.0, [], [], None, []))


@pytest.mark.parametrize("backend", [b for b in ("cpp", "foreach") if b in CPU_BACKENDS])
@pytest.mark.parametrize("form", FORMS)
def test_the_attached_step_traces_as_one_graph(backend, form):
    torch._dynamo.reset()
    model, mas = _consolidated("mas", form)
    optimizer = CLASSP(model.parameters(), lr=torch.tensor(0.05), backend=backend)
    mas.attach(optimizer)
    _backward(model, _batches(torch.float32)[0], optimizer)
    explanation = torch._dynamo.explain(optimizer.step)()
    torch._dynamo.reset()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, \
        explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_compiled_attached_training_matches_eager(form):
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, mas = _consolidated("mas", form)
        optimizer = CLASSP(model.parameters(), lr=torch.tensor(0.05), threshold=1e-4,
                           backend="foreach")
        mas.attach(optimizer)
        step = torch.compile(optimizer.step) if compiled else optimizer.step
        for x in _batches(torch.float32):
            _backward(model, x, optimizer)
            step()
        runs.append(model)
    torch._dynamo.reset()
    _assert_models_close(*runs, torch.float32)
