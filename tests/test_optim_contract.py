"""The generic torch.optim contract, walked for CLASSP on every CPU backend: state dicts,
copies, tensor lr with schedulers, param-group edits, zero_grad, hooks, closures, duplicate
params, mixed dtypes, deferred initialization, and all-or-nothing state changes (a failing
call leaves every tensor and every group exactly as it was)."""
import copy
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from classp_fused import CLASSP, _extension, optim, validation
from classp_fused.reference import classp_step_ as reference_step_
from classp_fused.validation import FOREIGN_KEYS
from distributed_helpers import requires_gloo
from helpers import CPU_BACKENDS, bits, random_like, tiny_model, train_steps


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


# ------------------------------------------------------------------ all-or-nothing helpers
def _frozen(value):
    if isinstance(value, torch.Tensor):
        value = value.to_dense() if value.is_sparse else value
        return ("tensor", value.dtype, tuple(value.shape), value.device, bits(value).clone())
    if isinstance(value, dict):
        return {key: _frozen(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_frozen(v) for v in value]
    return value


def snapshot(optimizer):
    """Every param and grad, every state entry and every group of ``optimizer``, copied."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "params": [_frozen(p.detach()) for p in params],
        "grads": [None if p.grad is None else _frozen(p.grad) for p in params],
        "state": [(next((i for i, q in enumerate(params) if q is p), id(p)), _frozen(s))
                  for p, s in optimizer.state.items()],
        "groups": [{key: [id(p) for p in value] if key == "params" else _frozen(value)
                    for key, value in group.items()} for group in optimizer.param_groups],
        "telemetry": (optimizer.nonfinite_skipped, optimizer.last_update_fraction),
    }


def assert_unchanged(optimizer, before):
    """``optimizer`` is exactly as ``snapshot`` saw it (tensors compared bit for bit)."""
    after = snapshot(optimizer)
    for key in before:
        assert _same(after[key], before[key]), f"{key} changed"


def _same(a, b):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return isinstance(b, tuple) and a[:4] == b[:4] and (
            a[3].type == "meta" or torch.equal(a[4], b[4]))  # meta tensors hold no values
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or a != a and b != b  # NaN hyperparameters stay NaN


def _stepped_model(backend, steps=2, **kwargs):
    model = tiny_model()
    optimizer = CLASSP([{"params": model[0].parameters()},
                        {"params": model[2].parameters(), "lr": 0.03}],
                       lr=0.05, threshold=1e-5, backend=backend, **kwargs)
    train_steps(model, optimizer, steps)
    model(torch.randn(3, 6)).pow(2).sum().backward()
    return model, optimizer


def _twin(model):
    """A copy of ``model`` with copies of its grads (``deepcopy`` drops them)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("step_form", ["tensor", "float", "int"])
def test_state_dict_loads_into_a_fresh_optimizer_and_continues_identically(backend, step_form):
    model, optimizer = _stepped_model(backend)
    saved = copy.deepcopy(optimizer.state_dict())
    if step_form != "tensor":
        cast = float if step_form == "float" else int
        for entry in saved["state"].values():
            entry["step"] = cast(entry["step"].item())
    twin = _twin(model)
    fresh = CLASSP(twin.parameters(), lr=1.0, backend=backend)  # one group, other lr
    fresh.param_groups[0]["params"] = list(twin[0].parameters())
    fresh.add_param_group({"params": list(twin[2].parameters())})
    fresh.load_state_dict(saved)
    assert [g["lr"] for g in fresh.param_groups] == [0.05, 0.03]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert fresh.state[q]["step"].dtype == torch.float32 and fresh.state[q]["step"].dim() == 0
        assert fresh.state[q]["step"].item() == 2
    optimizer.step()
    fresh.step()
    train_steps(model, optimizer, 2, seed=5)
    train_steps(twin, fresh, 2, seed=5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["accumulator"], fresh.state[q]["accumulator"])
        assert fresh.state[q]["step"].item() == 5


def test_state_dict_is_a_copy_and_keeps_group_options(backend):
    model, optimizer = _stepped_model(backend)
    optimizer.param_groups[1]["name"] = "head"  # user keys travel with the group
    saved = optimizer.state_dict()
    assert saved["param_groups"][1]["name"] == "head"
    assert set(saved["state"]) == set(range(4))
    assert all(set(entry) == {"step", "accumulator"} for entry in saved["state"].values())
    fresh = CLASSP([{"params": list(copy.deepcopy(model)[0].parameters())},
                    {"params": list(copy.deepcopy(model)[2].parameters())}], lr=0.1,
                   backend=backend)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[1]["name"] == "head"
    saved["state"][0]["accumulator"].add_(1.0)
    assert not torch.equal(saved["state"][0]["accumulator"],
                           next(iter(fresh.state.values()))["accumulator"])


def test_named_params_keep_their_names_through_a_state_dict(backend):
    model = tiny_model()
    optimizer = CLASSP(model.named_parameters(), lr=0.05, backend=backend)
    train_steps(model, optimizer, 1)
    names = [name for name, _ in model.named_parameters()]
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == names
    twin = _twin(model)
    fresh = CLASSP(twin.named_parameters(), lr=0.5, backend=backend)
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.param_groups[0]["param_names"] == names and fresh.param_groups[0]["lr"] == 0.05
    assert all(fresh.state[q]["step"].item() == 1 for q in twin.parameters())


# ------------------------------------------------------------------ copies
@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_copies_step_like_the_original(backend, duplicate):
    model, optimizer = _stepped_model(backend)
    twin = duplicate(optimizer)
    assert twin.backend == optimizer.backend and twin.mode == optimizer.mode
    originals = [p for g in optimizer.param_groups for p in g["params"]]
    copies = [p for g in twin.param_groups for p in g["params"]]
    assert not any(p is q for p, q in zip(originals, copies))
    for p, q in zip(originals, copies):
        assert torch.equal(p, q) and q.grad is None  # as for tensors: copies drop grads
        q.grad = p.grad.clone()
    optimizer.step()
    twin.step()
    for p, q in zip(originals, copies):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["accumulator"], twin.state[q]["accumulator"])
        assert (optimizer.state[p]["accumulator"].data_ptr()
                != twin.state[q]["accumulator"].data_ptr())


# ------------------------------------------------------------------ lr
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_lr_of_every_accepted_shape_matches_float_lr_with_a_scheduler(backend, shape):
    runs = []
    for lr in (0.05, torch.full(shape, 0.05)):
        model = tiny_model()
        optimizer = CLASSP(model.parameters(), lr=lr, threshold=1e-5, backend=backend)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
        train_steps(model, optimizer, 3, scheduler=scheduler)
        runs.append(_params(model))
    assert optimizer.param_groups[0]["lr"].shape == shape
    for p, q in zip(*runs):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_numpy_scalars_for_every_hyperparameter_match_python_numbers(backend):
    runs = []
    for cast, flag in ((float, bool), (np.float32, np.bool_)):
        model = tiny_model()
        optimizer = CLASSP(model.parameters(), lr=cast(0.0625), threshold=cast(0.0001),
                           eps=cast(0.5), power=cast(2.0), apply_scaling=flag(True),
                           backend=backend)
        optimizer.add_param_group({"params": [torch.nn.Parameter(random_like((3,)))],
                                   "lr": np.float64(0.5), "power": np.int64(1)})
        train_steps(model, optimizer, 3)
        runs.append(_params(model))
    for p, q in zip(*runs):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lr, error, message", [
    (float("inf"), ValueError, "lr must be a finite non-negative number, got inf"),
    (-float("inf"), ValueError, "lr must be a finite non-negative number, got -inf"),
    (float("nan"), ValueError, "lr must be a finite non-negative number, got nan"),
    (np.float32("nan"), ValueError, "lr must be a finite non-negative number, got nan"),
    (torch.tensor(float("inf")), ValueError, "lr must be a finite non-negative number, got inf"),
    ("0.1", ValueError, "lr must be a finite non-negative number, got '0.1'"),
    (torch.tensor([[0.1, 0.1]]), ValueError, r"lr as a tensor must hold one element"),
    (torch.tensor(1), TypeError, "lr as a tensor must be floating point"),
])
def test_unusable_lr_is_refused_at_construction(lr, error, message):
    with pytest.raises(error, match=message):
        CLASSP(tiny_model().parameters(), lr=lr)


# ------------------------------------------------------------------ param groups
def test_param_group_edits_take_effect_at_the_next_step(backend):
    model, optimizer = _stepped_model(backend)
    frozen = _params(model)
    accumulators = [optimizer.state[p]["accumulator"].clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()  # lr 0: params stay, accumulators grow
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen))
    assert all((optimizer.state[p]["accumulator"] > a).any()
               for p, a in zip(model.parameters(), accumulators))
    optimizer.param_groups[1]["threshold"] = 1e9  # nothing passes the threshold in group 1
    optimizer.param_groups[0]["lr"] = 0.05
    optimizer.step()
    assert not torch.equal(model[0].weight, frozen[0])
    assert torch.equal(model[2].weight, frozen[2])


def test_params_appended_to_a_group_are_stepped(backend):
    model, optimizer = _stepped_model(backend)
    extra = torch.nn.Parameter(random_like((4,)))
    optimizer.param_groups[0]["params"].append(extra)
    extra.grad = random_like((4,))
    before = extra.detach().clone()
    optimizer.step()
    assert not torch.equal(extra, before) and optimizer.state[extra]["step"].item() == 1


def test_duplicate_params_are_refused(backend):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"params\[2\] of param group 0 repeats params\[0\]"):
        CLASSP([model[0].weight, model[0].bias, model[0].weight], lr=0.1, backend=backend)
    optimizer = CLASSP(model[0].parameters(), lr=0.1, backend=backend)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [model[0].weight]})
    assert_unchanged(optimizer, before)


# ------------------------------------------------------------------ zero_grad, hooks, closures
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_then_step_changes_no_param(backend, set_to_none):
    model, optimizer = _stepped_model(backend)
    frozen = _params(model)
    optimizer.zero_grad(set_to_none=set_to_none)
    assert all((p.grad is None) == set_to_none for p in model.parameters())
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen))
    # zero grads are stepped (the counter advances) but no element passes g*g > threshold
    assert all(optimizer.state[p]["step"].item() == (2 if set_to_none else 3)
               for p in model.parameters())
    assert optimizer.last_update_fraction == 0.0


def test_step_and_state_dict_hooks_run(backend):
    model, optimizer = _stepped_model(backend)
    calls = []
    pre = optimizer.register_step_pre_hook(lambda o, args, kwargs: calls.append("step-pre"))
    post = optimizer.register_step_post_hook(lambda o, args, kwargs: calls.append("step-post"))
    optimizer.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))

    def rename(o, sd):
        calls.append("load-pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.25
        return sd

    optimizer.register_load_state_dict_pre_hook(rename)
    optimizer.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    optimizer.step()
    pre.remove()
    post.remove()
    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["step-pre", "step-post", "sd-post", "load-pre", "load-post"]
    assert optimizer.param_groups[0]["lr"] == 0.25


def test_global_step_hooks_and_the_profiler_see_the_step(backend):
    """The step skips torch's wrapper only where it has nothing to do: global step hooks run (a
    pre-hook's new arguments reach the step) and a profiler records the step by name."""
    model, optimizer = _stepped_model(backend)
    calls = []

    def pre(o, args, kwargs):
        calls.append("pre")
        return args, {"closure": lambda: calls.append("closure") or 1.5}

    handles = [register_optimizer_step_pre_hook(pre),
               register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("post"))]
    try:
        loss = optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step()
    assert calls == ["pre", "closure", "post"] and loss == 1.5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        optimizer.step()
    assert "Optimizer.step#CLASSP.step" in {event.name for event in profiler.events()}


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(backend):
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, backend=backend)
    x = torch.randn(3, 6)
    losses = []

    def closure():
        optimizer.zero_grad()
        assert torch.is_grad_enabled()
        loss = model(x).pow(2).sum()
        loss.backward()
        losses.append(loss.item())
        return loss

    for _ in range(3):
        loss = optimizer.step(closure)
    assert loss.item() == losses[-1] and losses[-1] < losses[0]


# ------------------------------------------------------------------ dtypes and devices
def test_mixed_dtypes_in_one_group_match_the_reference(backend):
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if backend != "triton":
        dtypes.append(torch.float64)
    params = [torch.nn.Parameter(random_like((5, 7), dtype)) for dtype in dtypes]
    expected = [p.detach().clone() for p in params]
    accs = [torch.zeros(5, 7, dtype=torch.float64 if d == torch.float64 else torch.float32)
            for d in dtypes]
    optimizer = CLASSP(params, lr=0.1, threshold=0.01, power=2.0, backend=backend)
    for seed in range(3):
        grads = [random_like((5, 7), d, torch.Generator().manual_seed(seed)) for d in dtypes]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        reference_step_(expected, grads, accs, lr=0.1, threshold=0.01, eps=1e-5, power=2.0,
                        apply_scaling=True)
    for p, e, a in zip(params, expected, accs):
        assert p.dtype == e.dtype and optimizer.state[p]["accumulator"].dtype == a.dtype
        tol = 1e-6 if p.dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(p.detach(), e, rtol=tol, atol=tol)
        torch.testing.assert_close(optimizer.state[p]["accumulator"], a, rtol=1e-6, atol=1e-7)


def test_deferred_initialization_resolves_the_backend_on_the_materialized_device():
    """A model built on the meta device and materialized by ``to_empty`` keeping its params
    (the FSDP2 path) gets the fastest kernel of the device it lands on."""
    with torch.device("meta"):
        model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no fused kernel for meta" warning
        optimizer = CLASSP(model.parameters(), lr=0.05)
    assert optimizer.backend == "auto"
    weight = model[0].weight
    with _swap_params_on_conversion():
        model.to_empty(device="cpu")
    assert model[0].weight is weight and weight.device.type == "cpu"
    torch.manual_seed(0)
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    train_steps(model, optimizer, 2)
    reference = tiny_model()
    train_steps(reference, CLASSP(reference.parameters(), lr=0.05, backend="torch"), 2)
    assert optimizer.backend == CLASSP(reference.parameters(), lr=0.05).backend
    assert optimizer.backend in ("cpp", "foreach")
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert optimizer.state[p]["accumulator"].device.type == "cpu"


@requires_gloo
def test_fsdp2_model_built_on_meta_gets_the_kernel_of_its_device():
    """The FSDP2 recipe for large models: shard on meta, build the optimizer, ``to_empty``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = tiny_model()
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = CLASSP(model.parameters(), lr=0.05)
        assert optimizer.backend == "auto"
        model.to_empty(device="cpu")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "DTensor random operators")
            for layer in (model[0], model[2]):
                layer.reset_parameters()
        train_steps(model, optimizer, 1)
        assert optimizer.backend == CLASSP([torch.nn.Parameter(torch.ones(1))], lr=0.1).backend
        assert optimizer.last_update_fraction == 1.0
        assert all(s["accumulator"].device.type == "cpu" for s in optimizer.state.values())
    finally:
        dist.destroy_process_group()


class _swap_params_on_conversion:
    """Module conversions (``to``, ``to_empty``) keep the Parameter objects, as FSDP2 does."""

    def __enter__(self):
        self.previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)

    def __exit__(self, *exc):
        torch.__future__.set_swap_module_params_on_conversion(self.previous)


def test_state_follows_params_that_moved():
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=0.05, backend="auto")
    train_steps(model, optimizer, 1)
    with _swap_params_on_conversion():
        model.to("meta")
    model(torch.randn(2, 6, device="meta")).sum().backward()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "classp_fused: no fused kernel for device 'meta'")
        optimizer.step()
    assert optimizer.backend == "foreach"
    assert all(s["accumulator"].device.type == "meta" and s["step"].device.type == "meta"
               for s in optimizer.state.values())


# ------------------------------------------------------------------ all-or-nothing
def _move_bias_to_meta(model, optimizer):
    """Move group 1's last param to the meta device, keeping the object (as ``to`` may)."""
    bias = model[2].bias
    torch.utils.swap_tensors(bias, torch.nn.Parameter(torch.ones(3, device="meta")))
    bias.grad = torch.ones(3, device="meta")


def _swap_in_bad_accumulator(model, optimizer):
    """Give group 1's last param an accumulator of another shape."""
    state = optimizer.state[model[2].bias]
    state["accumulator"] = torch.zeros(7)


@pytest.mark.parametrize("spoil, error, message", [
    (lambda m, o: o.param_groups[1].__setitem__("lr", -1.0), ValueError,
     r"param group 1: lr must be a finite non-negative number, got -1.0"),
    (lambda m, o: o.param_groups[1].__setitem__("power", float("nan")), ValueError,
     r"param group 1: power must be a finite number > 0, got nan"),
    (lambda m, o: o.param_groups[1].__setitem__("apply_scaling", "yes"), ValueError,
     r"param group 1: apply_scaling must be a bool, got 'yes'"),
    (_swap_in_bad_accumulator, ValueError,
     r"the accumulator of param group 1, param 1 has shape \(7,\), expected the param's \(3,\)"),
    (lambda m, o: setattr(m[2].bias, "grad", torch.ones(3).to_sparse()), TypeError,
     r"CLASSP does not support sparse gradients \(param group 1, param 1\)"),
    # .data swaps keep the Parameter object: a step after them checks the tensors again
    (lambda m, o: setattr(m[2].bias, "data", torch.zeros(7)), ValueError,
     r"the grad of param group 1, param 1 has shape \(3,\), expected the param's \(7,\)"),
    (lambda m, o: setattr(m[2].bias, "data", m[2].bias.data.half()), TypeError,
     r"the grad of param group 1, param 1 has dtype torch.float32, expected the param's "
     r"torch.float16"),
    (lambda m, o: setattr(m[2].weight, "data", m[2].weight.data.view(-1)), ValueError,
     r"the grad of param group 1, param 0 has shape \(3, 8\), expected the param's \(24,\)"),
    (_move_bias_to_meta, RuntimeError,
     r"param group 1, param 1 is on meta but the group's first stepped param is on cpu"),
    (lambda m, o: o.state.__setitem__(m[2].bias, {"step": torch.tensor(2.0),
                                                  "accumulator": torch.zeros(7)}), ValueError,
     r"the accumulator of param group 1, param 1 has shape \(7,\), expected the param's \(3,\)"),
])
def test_a_bad_later_group_fails_the_step_before_any_group_changes(backend, spoil, error,
                                                                   message):
    model, optimizer = _stepped_model(backend)
    fresh = torch.nn.Parameter(random_like((4,)))  # stateless: no state may be created
    fresh.grad = random_like((4,))
    optimizer.param_groups[0]["params"].append(fresh)
    spoil(model, optimizer)
    before = snapshot(optimizer)
    with pytest.raises(error, match=message):
        optimizer.step()
    assert_unchanged(optimizer, before)
    assert fresh not in optimizer.state


def _replace_accumulator(optimizer, p):
    optimizer.state[p]["accumulator"] = torch.full_like(optimizer.state[p]["accumulator"], 0.5)


def _replace_state_entry(optimizer, p):
    entry = optimizer.state[p]
    optimizer.state[p] = {"step": entry["step"].clone(), "accumulator": entry["accumulator"] + 1}


def _replace_param(optimizer, p):
    group = optimizer.param_groups[1]
    index = next(i for i, q in enumerate(group["params"]) if q is p)
    group["params"][index] = fresh = torch.nn.Parameter(random_like(tuple(p.shape)))
    fresh.grad = p.grad
    return fresh


def _swap_data_and_reset(optimizer, p):
    """``p.data`` to another shape, with a grad of that shape and its state dropped."""
    p.data = random_like((5,))
    p.grad = random_like((5,))
    del optimizer.state[p]


def _new_grad(optimizer, p):
    p.grad = random_like(tuple(p.shape))


@pytest.mark.parametrize("change", [_replace_accumulator, _replace_state_entry, _replace_param,
                                    _swap_data_and_reset, _new_grad])
def test_a_step_uses_the_tensors_the_group_and_state_hold_now(backend, change):
    """What a step found at earlier steps is not reused once the group or its state changed:
    the next step updates the param and accumulator they hold now, as the reference does."""
    model, optimizer = _stepped_model(backend, steps=3)
    p = model[2].bias
    replaced = change(optimizer, p)
    p = p if replaced is None else replaced
    state = optimizer.state.get(p)
    expected = p.detach().clone()
    acc = state["accumulator"].clone() if state else torch.zeros_like(p)
    step = float(state["step"]) if state else 0.0
    reference_step_([expected], [p.grad], [acc], lr=0.03, threshold=1e-5, eps=1e-5, power=1.0,
                    apply_scaling=True)
    optimizer.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(optimizer.state[p]["accumulator"], acc, rtol=1e-6, atol=1e-7)
    assert float(optimizer.state[p]["step"]) == step + 1


def test_the_explaining_checks_run_only_for_groups_that_changed(backend, monkeypatch):
    """Unchanged groups (new grad objects included) skip the per-tensor Python checks where the
    extension is built; a changed group is checked again."""
    if _extension.LOAD_ERROR is not None:
        pytest.skip("the C++ extension is not built")
    model, optimizer = _stepped_model(backend, steps=2)
    checked = []
    monkeypatch.setattr(optim, "check_stepped_group",
                        lambda index, *args: checked.append(index) or
                        validation.check_stepped_group(index, *args))
    train_steps(model, optimizer, 2)
    assert checked == []
    model[2].bias.data = random_like((3,))  # steppable as it is: no check needed
    optimizer.step()
    assert checked == []
    _replace_accumulator(optimizer, model[2].bias)
    optimizer.step()
    optimizer.param_groups[0]["params"].append(torch.nn.Parameter(random_like((2,))))
    optimizer.step()
    optimizer.step()
    assert checked == [1, 0]


def test_a_step_keeps_no_grad_alive(backend):
    """Grads set to None are freed: what a step keeps for the next one holds no grad."""
    model, optimizer = _stepped_model(backend, steps=3)
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert all(grad() is None for grad in grads)


def test_a_replaced_step_counter_is_the_one_advanced(backend):
    model, optimizer = _stepped_model(backend, steps=3)
    optimizer.state[model[2].bias]["step"] = torch.tensor(10.0)
    optimizer.step()
    optimizer.step()
    assert float(optimizer.state[model[2].bias]["step"]) == 12.0
    assert float(optimizer.state[model[2].weight]["step"]) == 5.0


def test_a_group_on_two_devices_fails_the_step_before_anything_changes():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("the cpp backend is not built")
    cpu = torch.nn.Parameter(random_like((3,)))
    meta = torch.nn.Parameter(torch.ones(3, device="meta"))
    other = torch.nn.Parameter(random_like((2,)))
    optimizer = CLASSP([{"params": [other]}, {"params": [cpu, meta]}], lr=0.1, backend="cpp")
    for p in (cpu, meta, other):
        p.grad = torch.ones_like(p)
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"param group 1, param 1 is on meta but the group's "
                                           r"first stepped param is on cpu"):
        optimizer.step()
    assert_unchanged(optimizer, before)
    assert not optimizer.state


def test_a_dtype_the_backend_cannot_step_fails_before_anything_changes():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("the triton backend is not available")
    first = torch.nn.Parameter(random_like((3,)))
    wide = torch.nn.Parameter(random_like((3,), torch.float64))
    optimizer = CLASSP([{"params": [first]}, {"params": [wide]}], lr=0.1, backend="triton")
    first.grad, wide.grad = random_like((3,)), random_like((3,), torch.float64)
    before = snapshot(optimizer)
    with pytest.raises(TypeError, match=r"param group 1, param 0 is torch.float64; this group's "
                                        r"backend steps torch.float32"):
        optimizer.step()
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("group, error, message", [
    ({"params": [torch.zeros(3, dtype=torch.int64)]}, TypeError,
     r"params\[0\] of param group 1 must be float16, bfloat16, float32 or float64"),
    ({"params": [torch.zeros(3, requires_grad=True)], "lr": -0.5}, ValueError,
     r"param group 1: lr must be a finite non-negative number, got -0.5"),
    ({"params": [torch.zeros(3, requires_grad=True)], "lr": float("inf")}, ValueError,
     r"param group 1: lr must be a finite non-negative number, got inf"),
    ({"params": [torch.zeros(3, requires_grad=True)], "threshold": "high"}, ValueError,
     r"param group 1: threshold must be a finite non-negative number, got 'high'"),
    ({"params": [torch.zeros(3, requires_grad=True)], "momentum": 0.9}, ValueError,
     r"param group 1: momentum=0.9 is not supported; CLASSP has no momentum"),
    ({"params": {torch.zeros(3, requires_grad=True)}}, TypeError, "ordered collections"),
    ({"lr": 0.1}, TypeError, r"param_group must be a dict with a 'params' entry"),
    ([torch.zeros(3)], TypeError, r"param_group must be a dict with a 'params' entry"),
])
def test_add_param_group_refuses_a_bad_group_and_keeps_working(backend, group, error, message):
    model = tiny_model()
    optimizer = CLASSP(model[0].parameters(), lr=0.05, backend=backend)
    train_steps(model, optimizer, 1)
    before = snapshot(optimizer)
    with pytest.raises(error, match=message):
        optimizer.add_param_group(group)
    assert_unchanged(optimizer, before)
    optimizer.step()  # later steps work
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.1})  # not "two groups"
    train_steps(model, optimizer, 1)
    assert optimizer.state[model[2].weight]["step"].item() == 1


def _adagrad(model):
    return torch.optim.Adagrad([{"params": model[0].parameters()},
                                {"params": model[2].parameters()}], lr=0.1)


def _adam(model):
    return torch.optim.Adam([{"params": model[0].parameters()},
                             {"params": model[2].parameters()}], lr=0.1)


def _sgd(model):
    return torch.optim.SGD([{"params": model[0].parameters()},
                            {"params": model[2].parameters()}], lr=0.1, momentum=0.9)


def _edited(edit):
    def make(model, optimizer):
        saved = copy.deepcopy(optimizer.state_dict())
        edit(saved)
        return saved
    return make


def _foreign(make_optimizer):
    def make(model, optimizer):
        other = make_optimizer(model)
        other.step()  # state like {"step", "sum"} / {"exp_avg", ...} / {"momentum_buffer"}
        return other.state_dict()
    return make


BAD_STATE_DICTS = {
    "Adagrad": (_foreign(_adagrad), r"state_dict\['param_groups'\]\[0\] lacks \['threshold', "
                                    r"'power', 'apply_scaling'\]: not a CLASSP state dict"),
    "Adam": (_foreign(_adam), r"state_dict\['param_groups'\]\[0\] lacks"),
    "SGD": (_foreign(_sgd), r"state_dict\['param_groups'\]\[0\] lacks \['threshold', 'eps'"),
    "Adagrad state under CLASSP groups": (
        _edited(lambda sd: sd["state"][1].update(sum=sd["state"][1].pop("accumulator"))),
        r"state_dict\['state'\]\[1\] must hold exactly \['step', 'accumulator'\], got "
        r"\['step', 'sum'\]"),
    "step missing": (_edited(lambda sd: sd["state"][3].pop("step")),
                     r"state_dict\['state'\]\[3\] must hold exactly"),
    "lr -5": (_edited(lambda sd: sd["param_groups"][1].update(lr=-5)),
              r"state_dict\['param_groups'\]\[1\]: lr must be a finite non-negative number"),
    "power 0": (_edited(lambda sd: sd["param_groups"][0].update(power=0)),
                r"state_dict\['param_groups'\]\[0\]: power must be a finite number > 0"),
    "weight decay": (_edited(lambda sd: sd["param_groups"][0].update(weight_decay=0.1)),
                     r"param group 0: weight_decay=0.1 is not supported"),
    "accumulator shape": (
        _edited(lambda sd: sd["state"][2].update(accumulator=torch.zeros(3, 7))),
        r"state_dict\['state'\]\[2\]\['accumulator'\] has shape \(3, 7\), expected the "
        r"param's \(3, 8\)"),
    "accumulator dtype": (
        _edited(lambda sd: sd["state"][0].update(accumulator=torch.zeros(8, 6, dtype=torch.int32))),
        r"state_dict\['state'\]\[0\]\['accumulator'\] must be a floating-point tensor"),
    "step not a count": (_edited(lambda sd: sd["state"][0].update(step="3")),
                         r"state_dict\['state'\]\[0\]\['step'\] must be a finite non-negative"),
    "step of two elements": (_edited(lambda sd: sd["state"][0].update(step=torch.ones(2))),
                             r"state_dict\['state'\]\[0\]\['step'\] must be a one-element"),
    "state of no param": (_edited(lambda sd: sd["state"].update({9: sd["state"][0]})),
                          r"state_dict\['state'\]\[9\] belongs to no param"),
    "group missing": (_edited(lambda sd: sd["param_groups"].pop()),
                      r"state_dict has 1 param groups, this optimizer 2"),
    "param missing": (_edited(lambda sd: sd["param_groups"][1]["params"].pop()),
                      r"state_dict\['param_groups'\]\[1\] has 1 params, this optimizer's "
                      r"group 1 has 2"),
    "not a dict": (lambda model, optimizer: [1, 2], r"state_dict must be a dict with keys"),
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_load_state_dict_refuses_a_bad_dict_and_changes_nothing(backend, case):
    make, message = BAD_STATE_DICTS[case]
    model, optimizer = _stepped_model(backend)
    state_dict = make(model, optimizer)
    before = snapshot(optimizer)
    with pytest.raises((ValueError, TypeError), match=message):
        optimizer.load_state_dict(state_dict)
    assert_unchanged(optimizer, before)
    optimizer.step()


# ------------------------------------------------------------------ keys of other optimizers
def test_keys_of_other_optimizers_set_off_are_ignored_with_one_warning(backend):
    """As Hugging Face's Trainer builds groups: weight_decay on every group, 0.0 here."""
    model = tiny_model()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        optimizer = CLASSP([{"params": model[0].parameters(), "weight_decay": 0.0},
                            {"params": model[2].parameters(), "weight_decay": 0.0,
                             "nesterov": False}], lr=0.05, backend=backend)
    messages = [str(w.message) for w in seen if "CLASSP ignores" in str(w.message)]
    assert messages == [
        "CLASSP ignores the param group key weight_decay=0.0 (param group 0): " + FOREIGN_KEYS[
            "weight_decay"],
        "CLASSP ignores the param group key nesterov=False (param group 1): CLASSP has no momentum"]
    reference = tiny_model()
    train_steps(model, optimizer, 2)
    train_steps(reference, CLASSP(reference.parameters(), lr=0.05, backend=backend), 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert optimizer.state_dict()["param_groups"][0]["weight_decay"] == 0.0


def _action_setting_weight_decay_off(path):
    """A one-line call that makes CLASSP meet ``weight_decay=0.0`` on ``path``, all else set
    up (no warning yet)."""
    model = tiny_model()
    if path == "constructor":
        return lambda: CLASSP([{"params": model.parameters(), "weight_decay": 0.0}], lr=0.05)
    optimizer = CLASSP(model[0].parameters(), lr=0.05)
    if path == "add_param_group":
        return lambda: optimizer.add_param_group({"params": model[2].parameters(),
                                                  "weight_decay": 0.0})
    if path == "load_state_dict":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = CLASSP([{"params": model[0].parameters(), "weight_decay": 0.0}],
                           lr=0.05).state_dict()
        return lambda: optimizer.load_state_dict(saved)
    train_steps(model, optimizer, 1)
    optimizer.param_groups[0]["weight_decay"] = 0.0
    loss = model[0](torch.randn(3, 6)).pow(2).sum()
    if path == "step":
        loss.backward()
        return lambda: optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # steps through torch's amp code
    scaler.scale(loss).backward()
    return lambda: scaler.step(optimizer)


@pytest.mark.parametrize("path", ["constructor", "add_param_group", "load_state_dict", "step",
                                  "GradScaler step"])
def test_the_ignored_key_warning_points_at_the_callers_line(path):
    """Not at torch's optimizer.py (the constructor and load_state_dict pass through it) nor at
    torch's amp code."""
    action = _action_setting_weight_decay_off(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        action()
    ignored = [w for w in seen if "CLASSP ignores the param group key weight_decay=0.0" in
               str(w.message)]
    assert [(w.filename, w.lineno) for w in ignored] == [(__file__,
                                                          action.__code__.co_firstlineno)]


@pytest.mark.parametrize("key, value", [("weight_decay", 0.01), ("momentum", 0.9),
                                        ("betas", (0.9, 0.999)), ("maximize", True)])
def test_keys_of_other_optimizers_set_on_are_refused(key, value):
    model = tiny_model()
    with pytest.raises(ValueError, match=rf"param group 1: {key}=.* is not supported"):
        CLASSP([{"params": model[0].parameters()},
                {"params": model[2].parameters(), key: value}], lr=0.05)
