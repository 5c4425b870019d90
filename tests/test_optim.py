"""The torch.optim contract of classp_fused.CLASSP, on every backend available on the CPU."""
import copy
import io
import re
import warnings

import pytest
import torch

import classp_fused
from classp_fused import CLASSP
from classp_fused.validation import FOREIGN_KEYS
from helpers import CPU_BACKENDS, bits, random_like, tiny_model, train_steps
from test_optim_contract import assert_unchanged, snapshot


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    (dict(lr=0.1, power=0.0), "power"),
    (dict(lr=0.1, power=-1.0), "power"),
    (dict(lr=0.1, power=float("inf")), "power"),
    (dict(lr=0.1, eps=-1e-8), "eps"),
    (dict(lr=0.1, threshold=-0.5), "threshold"),
    (dict(lr=0.1, mode="fast"), "mode"),
    (dict(lr=0.1, backend="opencl"), "backend"),
    (dict(lr=0.1, nonfinite="ignore"), "nonfinite"),
    (dict(lr=0.1, mode="legacy", backend="foreach"), "legacy"),
])
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLASSP(tiny_model().parameters(), **kwargs)


def test_constructor_rejects_unusable_params():
    with pytest.raises(TypeError, match="complex"):
        CLASSP([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        CLASSP([torch.zeros(3, dtype=torch.int32)], lr=0.1)
    with pytest.raises(ValueError, match="overlap"):
        CLASSP([torch.zeros(1, 3).expand(4, 3)], lr=0.1)


TORCH_FLAGS_OFF = [("foreach", None), ("foreach", False), ("fused", None), ("fused", False),
                   ("capturable", False), ("differentiable", False), ("maximize", False),
                   ("weight_decay", 0.0)]


@pytest.mark.parametrize("key, value", TORCH_FLAGS_OFF)
def test_options_of_torch_optimizers_set_off_are_ignored_with_a_warning(key, value):
    model, reference = tiny_model(), tiny_model()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        optimizer = CLASSP(model.parameters(), lr=0.05, **{key: value})
    assert [(str(w.message), w.filename) for w in seen] == [
        (f"CLASSP ignores {key}={value!r}: {FOREIGN_KEYS[key]}", __file__)]
    assert key not in optimizer.param_groups[0] and key not in optimizer.defaults
    train_steps(model, optimizer, 2)
    train_steps(reference, CLASSP(reference.parameters(), lr=0.05), 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("key", ["foreach", "fused", "capturable", "differentiable", "maximize"])
def test_options_of_torch_optimizers_set_on_are_refused_naming_them(key):
    with pytest.raises(ValueError, match=rf"^{key}=True is not supported; "
                                         rf"{re.escape(FOREIGN_KEYS[key])}\. Leave it out"):
        CLASSP(tiny_model().parameters(), lr=0.05, **{key: True})


def test_an_unknown_constructor_argument_is_a_type_error():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'momentum_buffer'"):
        CLASSP(tiny_model().parameters(), lr=0.05, momentum_buffer=None)


def test_param_groups_of_a_torch_optimizer_take_one_warning_per_key(backend):
    """SGD's groups hold its constructor flags (foreach, fused, differentiable, ...)."""
    model, reference = tiny_model(), tiny_model()
    groups = torch.optim.SGD(model.parameters(), lr=0.05).param_groups
    sgd_keys = set(groups[0]) - {"params", "lr"}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        optimizer = CLASSP(groups, lr=0.1, backend=backend)
    ignored = {str(w.message).split("=")[0].split()[-1] for w in seen}
    assert ignored == sgd_keys
    assert {"foreach", "fused", "differentiable"} <= ignored
    train_steps(model, optimizer, 2)
    train_steps(reference, CLASSP(reference.parameters(), lr=0.05, backend=backend), 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    with pytest.raises(ValueError, match=r"param group 0: fused=True is not supported"):
        CLASSP(torch.optim.SGD(tiny_model().parameters(), lr=0.05, fused=True).param_groups,
               lr=0.1)


def test_bad_param_group_hyperparameter_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="power"):
        CLASSP([{"params": model[0].parameters()},
                {"params": model[2].parameters(), "power": 0}], lr=0.1)


def test_auto_backend_and_available_backends():
    assert {"torch", "foreach"} <= set(classp_fused.available_backends("cpu"))
    opt = CLASSP(tiny_model().parameters(), lr=0.1)
    expected = "cpp" if "cpp" in CPU_BACKENDS else "foreach"
    assert opt.backend == expected
    with pytest.raises(RuntimeError, match="not available"):
        CLASSP(tiny_model().parameters(), lr=0.1, backend="cuda")


def test_backends_agree_on_a_training_run():
    results = []
    for name in CPU_BACKENDS:
        model = tiny_model()
        train_steps(model, CLASSP(model.parameters(), lr=0.05, threshold=1e-4, backend=name), 8)
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-6)


def test_param_groups_keep_their_own_hyperparameters(backend):
    model = tiny_model()
    reference = copy.deepcopy(model)
    opt = CLASSP([{"params": model[0].parameters(), "lr": 0.1, "power": 2.0},
                  {"params": model[2].parameters(), "threshold": 1e-3, "apply_scaling": False}],
                 lr=0.02, backend=backend)
    train_steps(model, opt, 4)
    # the same run as two separate optimizers, one per group
    first = CLASSP(reference[0].parameters(), lr=0.1, power=2.0, backend=backend)
    second = CLASSP(reference[2].parameters(), lr=0.02, threshold=1e-3, apply_scaling=False,
                    backend=backend)

    class Both:
        def zero_grad(self):
            first.zero_grad()
            second.zero_grad()

        def step(self):
            first.step()
            second.step()

    train_steps(reference, Both(), 4)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_add_param_group_mid_run(backend):
    model = tiny_model()
    opt = CLASSP(model[0].parameters(), lr=0.05, backend=backend)
    last = [p.clone() for p in model[2].parameters()]
    train_steps(model, opt, 2)
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), last))
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.2})
    train_steps(model, opt, 2)
    assert not any(torch.equal(p, q) for p, q in zip(model[2].parameters(), last))
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[1]["power"] == 1.0


def test_params_without_grad_are_untouched(backend):
    model = tiny_model()
    frozen = model[2].weight
    opt = CLASSP(model.parameters(), lr=0.1, backend=backend)
    model(torch.randn(2, 6)).sum().backward()
    frozen.grad = None
    before = frozen.clone()
    opt.step()
    assert torch.equal(before, frozen) and frozen not in opt.state


def test_grads_under_threshold_leave_param_and_accumulator_bit_identical(backend):
    p = torch.nn.Parameter(random_like((37, 5)))
    opt = CLASSP([p], lr=0.5, threshold=0.04, backend=backend)
    p.grad = random_like((37, 5))
    opt.step()
    p_before, acc_before = p.detach().clone(), opt.state[p]["accumulator"].clone()
    p.grad = random_like((37, 5), scale=0.1)
    small = p.grad * p.grad <= 0.04
    assert small.any() and (~small).any()
    opt.step()
    assert torch.equal(bits(p)[small], bits(p_before)[small])
    assert torch.equal(opt.state[p]["accumulator"][small], acc_before[small])
    assert not torch.equal(p.detach()[~small], p_before[~small])
    assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_elements_are_skipped_and_counted(backend, bad):
    p = torch.nn.Parameter(random_like((10, 10)))
    opt = CLASSP([p], lr=0.1, backend=backend)
    grad = random_like((10, 10))
    grad[3, 4] = bad
    grad[7, 0] = bad
    p.grad = grad
    before = p.detach().clone()
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["accumulator"]).all()
    assert p[3, 4] == before[3, 4] and opt.state[p]["accumulator"][3, 4] == 0
    assert opt.nonfinite_skipped == 2
    assert opt.last_update_fraction == pytest.approx(98 / 100)
    opt.step()
    assert opt.nonfinite_skipped == 4


def test_nonfinite_count_stays_exact_over_many_steps_and_reads(backend):
    """The counts of CPU steps join the total in batches: every read is exact, before and after
    a batch, and the counts waiting are bounded."""
    batch = classp_fused.telemetry.PENDING_COUNTS
    params = [torch.nn.Parameter(random_like((7,))), torch.nn.Parameter(random_like((3, 4)))]
    opt = CLASSP([{"params": params[:1]}, {"params": params[1:], "lr": 0.2}], lr=0.1,
                 backend=backend)
    expected = 0
    for step in range(1, batch + 40):
        for i, p in enumerate(params):
            grad = random_like(tuple(p.shape))
            grad.view(-1)[:(step + i) % 4] = float("nan")
            p.grad = grad
            expected += (step + i) % 4
        opt.step()
        if step in (1, batch // 2 + 5, batch + 30):  # two groups: a batch fills in between
            assert opt.nonfinite_skipped == expected
        assert len(opt._telemetry._entries["pending"]) < batch
    assert opt.nonfinite_skipped == expected


def test_nonfinite_raise_changes_nothing(backend):
    model = tiny_model()
    opt = CLASSP(model.parameters(), lr=0.1, backend=backend, nonfinite="raise")
    train_steps(model, opt, 1)
    snapshot = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 6)).sum().backward()
    model[2].bias.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient in param group 0, param 3"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    for key, value in opt.state_dict()["state"].items():
        assert torch.equal(value["accumulator"], snapshot["state"][key]["accumulator"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_accumulators(backend, dtype):
    model = tiny_model(dtype)
    opt = CLASSP(model.parameters(), lr=0.01, backend=backend)
    train_steps(model, opt, 3)
    assert all(s["accumulator"].dtype == torch.float32 for s in opt.state.values())
    fresh = tiny_model(dtype)
    reloaded = CLASSP(fresh.parameters(), lr=0.01, backend=backend)
    reloaded.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert reloaded.state[q]["accumulator"].dtype == torch.float32
        assert torch.equal(reloaded.state[q]["accumulator"], opt.state[p]["accumulator"])


def test_fp32_accumulator_does_not_stall_for_bf16_params():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = CLASSP([p], lr=0.0, backend="torch")
    for _ in range(10_000):
        p.grad = torch.full((4,), 1e-2, dtype=torch.bfloat16)
        opt.step()
    # bf16 accumulation would stall at 4; fp32 reaches ~100 (bf16 1e-2 is 0.010009765625)
    assert opt.state[p]["accumulator"][0].item() == pytest.approx(100.1, rel=1e-3)


def _state_dict_round_trip(opt_factory, serialize):
    model = tiny_model()
    opt = opt_factory(model.parameters())
    train_steps(model, opt, 3)
    clone_model = copy.deepcopy(model)
    clone_opt = opt_factory(clone_model.parameters())
    clone_opt.load_state_dict(serialize(opt.state_dict()))
    train_steps(model, opt, 3, seed=7)
    train_steps(clone_model, clone_opt, 3, seed=7)
    for p, q in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(opt.state[p]["accumulator"], clone_opt.state[q]["accumulator"])
        assert torch.equal(opt.state[p]["step"], clone_opt.state[q]["step"])


def _save_load_weights_only(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("serialize", [copy.deepcopy, _save_load_weights_only],
                         ids=["in-memory", "torch.save-weights_only"])
def test_state_dict_round_trip_continues_identically(backend, serialize):
    _state_dict_round_trip(
        lambda params: CLASSP(params, lr=0.05, threshold=1e-4, power=2.0, backend=backend),
        serialize)


def test_amp_found_inf_step_is_a_no_op(backend):
    model = tiny_model()
    opt = CLASSP(model.parameters(), lr=0.05, backend=backend)
    train_steps(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 6)).sum().backward()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    for key, value in opt.state_dict()["state"].items():
        assert torch.equal(value["accumulator"], state["state"][key]["accumulator"])
        assert value["step"].item() == 2
    assert opt.last_update_fraction == 0.0


def test_amp_grad_scale_unscales_inside_the_step(backend):
    runs = []
    for scale in (None, 512.0):
        model = tiny_model()
        opt = CLASSP(model.parameters(), lr=0.05, threshold=1e-4, backend=backend)
        model(torch.randn(5, 6, generator=torch.Generator().manual_seed(3))).pow(2).sum().backward()
        if scale is not None:
            for p in model.parameters():
                p.grad.mul_(scale)
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


BAD_AMP_SCALARS = {
    "a float": (2.0, TypeError, r"must be None or a floating-point tensor, got float"),
    "an integer tensor": (torch.tensor(2), TypeError, r"floating-point tensor, got a torch.int64"),
    "a bool tensor": (torch.tensor(False), TypeError, r"floating-point tensor, got a torch.bool"),
    "two elements": (torch.ones(2), ValueError, r"must be of shape \(\) or \(1,\), got shape "
                                                r"\(2,\)"),
    "shape (1, 1)": (torch.ones(1, 1), ValueError, r"must be of shape \(\) or \(1,\)"),
    "on the meta device": (torch.ones((), device="meta"), RuntimeError,
                           r"is a tensor on meta; it must be on the CPU or on the params' "
                           r"device cpu"),
}


@pytest.mark.parametrize("steps", [0, 2], ids=["first step", "later step"])
@pytest.mark.parametrize("name", ["grad_scale", "found_inf"])
@pytest.mark.parametrize("case", BAD_AMP_SCALARS)
def test_amp_scalars_of_a_wrong_kind_fail_the_step_before_anything_changes(backend, steps,
                                                                          name, case):
    """What the optimizer reads from a GradScaler (or from code standing in for one)."""
    value, error, message = BAD_AMP_SCALARS[case]
    model = tiny_model()
    opt = CLASSP([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                 lr=0.05, backend=backend)
    train_steps(model, opt, steps)
    model(torch.randn(2, 6)).sum().backward()
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    setattr(opt, name, value)
    before = snapshot(opt)
    with pytest.raises(error, match=rf"param group 0: optimizer.{name} .*{message}"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_amp_scalars_of_shape_1_and_16_bit_step_as_gradscalers(backend, found_inf):
    runs = []
    for shape, dtype in (((), torch.float32), ((1,), torch.float16)):
        model = tiny_model()
        opt = CLASSP(model.parameters(), lr=0.05, backend=backend)
        train_steps(model, opt, 1)
        model(torch.randn(2, 6, generator=torch.Generator().manual_seed(2))).sum().backward()
        opt.grad_scale = torch.full(shape, 2.0, dtype=dtype)
        opt.found_inf = torch.full(shape, found_inf, dtype=dtype)
        opt.step()
        runs.append([bits(t).clone() for t in [*model.parameters(), *(
            s[key] for s in opt.state.values() for key in ("accumulator", "step"))]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert {float(s["step"]) for s in opt.state.values()} == {2.0 - found_inf}


def test_grad_scaler_integration(backend):
    model = tiny_model()
    opt = CLASSP(model.parameters(), lr=0.05, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(4, 6)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert all(s["step"].item() == 2 for s in opt.state.values())
    assert scaler.get_scale() == 2.0 ** 9


def test_state_bytes_counts_accumulators_and_steps(backend):
    model = tiny_model()
    opt = CLASSP(model.parameters(), lr=0.05, backend=backend)
    assert opt.state_bytes() == 0
    train_steps(model, opt, 1)
    numel = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() == 4 * numel + 4 * len(list(model.parameters()))


def test_legacy_mode_reproduces_the_tensor_gate():
    p = torch.nn.Parameter(random_like((6,)))
    opt = CLASSP([p], lr=0.2, threshold=0.5, mode="legacy", backend="torch")
    p.grad = random_like((6,), scale=1e-3)   # every g*g << 0.5, yet the tensor gate opens
    before = p.detach().clone()
    opt.step()
    assert (p != before).all()
    torch.testing.assert_close(opt.state[p]["accumulator"], p.grad.abs())
    blocked = CLASSP([p], lr=0.2, threshold=1.0, mode="legacy", backend="torch")
    before = p.detach().clone()
    blocked.step()
    assert torch.equal(p, before)


def test_step_counters_follow_which_params_have_grads(backend):
    a, b, c = (torch.nn.Parameter(random_like((5,))) for _ in range(3))
    opt = CLASSP([a, b, c], lr=0.1, backend=backend)
    pattern = [(a, b, c), (a, c), (a, c), (a, b, c), (b,)]
    for with_grad in pattern:
        for p in (a, b, c):
            p.grad = random_like((5,)) if any(p is q for q in with_grad) else None
        opt.step()
    assert [opt.state[p]["step"].item() for p in (a, b, c)] == [4, 3, 4]
    reloaded = CLASSP([a, b, c], lr=0.1, backend=backend)
    reloaded.load_state_dict(opt.state_dict())
    opt.step()  # stepping the source must not move the loaded counters or accumulators
    assert [reloaded.state[p]["step"].item() for p in (a, b, c)] == [4, 3, 4]
    assert not torch.equal(reloaded.state[b]["accumulator"], opt.state[b]["accumulator"])
