"""MAS and EWC never get into a bad state: values are checked where state enters
(load_state_dict, consolidate), every public state change is all or nothing, frozen parameters
keep their state, and non-finite importance is refused naming the batch. Each refusal is
checked against a bit-for-bit snapshot of every attribute of the regularizer and of the
model's parameters and gradients."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from classp_fused.regularizers import EWC, MAS
from distributed_helpers import WORLD_SIZE, requires_gloo, run_ranks

DTYPE = torch.float64
METHODS = {
    "mas-sum": (MAS, {}),
    "mas-ema": (MAS, {"accumulate": "ema", "alpha": 0.25}),
    "ewc-separate": (EWC, {"lam": 2.0}),
    "ewc-online": (EWC, {"lam": 2.0, "mode": "online", "gamma": 0.6}),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DTYPE)


def batches(sizes=(5, 3), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=gen, dtype=DTYPE),
             torch.randint(0, 4, (n,), generator=gen)) for n in sizes]


def perturb_(model, scale=0.3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def consolidated(name, tasks=2, keep=False):
    """A regularizer of ``METHODS[name]`` after ``tasks`` task boundaries, with .grad set."""
    method, kwargs = METHODS[name]
    model = mlp()
    extra = {"keep_task_importances": True} if keep else {}
    reg = method(model, **kwargs, **extra)
    for t in range(tasks):
        reg.consolidate(batches(seed=t + 1))
        perturb_(model, seed=t + 10)
    model(batches()[0][0]).pow(2).sum().backward()
    return reg


def snapshot(value):
    """``value`` as plain comparable data: tensors as (dtype, shape, raw bytes), modules as
    their parameters, gradients, buffers and flags, objects as their attributes."""
    if isinstance(value, torch.Tensor):
        t = value.to_local() if hasattr(value, "to_local") else value
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", type(value).__name__, str(t.dtype), tuple(value.shape),
                bytes(raw.numpy()))
    if isinstance(value, nn.Module):
        return ("module", id(value), value.training,
                [(n, snapshot(p), p.requires_grad, None if p.grad is None else snapshot(p.grad))
                 for n, p in value.named_parameters()],
                [(n, snapshot(b)) for n, b in value.named_buffers()])
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return ("object", type(value).__name__, id(value))


def state_of(reg):
    """Every attribute of the regularizer, the model's parameters and gradients included."""
    return {name: snapshot(value) for name, value in sorted(vars(reg).items())}


def refused(reg, error, match, operation):
    """Run ``operation``; it must raise ``error`` matching ``match`` and change nothing."""
    before = state_of(reg)
    with pytest.raises(error, match=match):
        operation()
    assert state_of(reg) == before


def edited(state, key, name, value):
    """A deep copy of ``state`` with ``state[key][name] = value`` (``name`` None: the key)."""
    state = copy.deepcopy(state)
    if name is None:
        state[key] = value
    else:
        state[key][name] = value
    return state


def with_element(t, value):
    t = t.clone()
    t.view(-1)[0] = value
    return t


# ---------------------------------------------------------------------------------------------
# 1. Values checked where state enters


BAD_STATES = {
    "negative importance": (lambda s: edited(s, "importance", "0.weight",
                                             -s["importance"]["0.weight"]),
                            ValueError, r"state importance '0.weight' must be finite and >= 0, "
                                        r"got \d+ negative"),
    "NaN importance": (lambda s: edited(s, "importance", "2.bias",
                                        with_element(s["importance"]["2.bias"], math.nan)),
                       ValueError, r"importance '2.bias' must be finite and >= 0, got 1 NaN"),
    "inf anchor": (lambda s: edited(s, "anchor", "0.bias",
                                    with_element(s["anchor"]["0.bias"], -math.inf)),
                   ValueError, r"state anchor '0.bias' must be finite, got 1 inf"),
    "list importance": (lambda s: edited(s, "importance", "0.weight",
                                         s["importance"]["0.weight"].tolist()),
                        TypeError, r"state importance '0.weight' must be a floating-point tensor "
                                   r"\(or uint8 8-bit codes\), got list"),
    "integer anchor": (lambda s: edited(s, "anchor", "2.weight",
                                        s["anchor"]["2.weight"].long()),
                       TypeError, r"state anchor '2.weight' must be a floating-point tensor"),
    "wrong shape": (lambda s: edited(s, "anchor", "0.bias", torch.zeros(7, dtype=DTYPE)),
                    ValueError, r"state anchor '0.bias' has shape \(7,\), its parameter \(8,\)"),
    "unknown parameter": (lambda s: edited(edited(s, "importance", "9.weight", torch.zeros(1)),
                                           "anchor", "9.weight", torch.zeros(1)),
                          ValueError, r"state importance '9.weight' matches no parameter"),
    "missing anchor": (lambda s: {**s, "anchor": {n: t for n, t in s["anchor"].items()
                                                  if n != "2.bias"}},
                       ValueError, r"\['2.bias'\] lack their pair"),
    "importance not a dict": (lambda s: edited(s, "importance", None, [1.0]),
                              TypeError, r"state importance must be a dict"),
    "list state": (lambda s: [s], TypeError, r"state must be a mapping .* got list"),
    "string tasks_seen": (lambda s: edited(s, "tasks_seen", None, "2"),
                          TypeError, r"state tasks_seen must be an int >= 0, got str"),
    "negative tasks_seen": (lambda s: edited(s, "tasks_seen", None, -1),
                            ValueError, r"state tasks_seen must be an int >= 0, got -1"),
    "bool tasks_seen": (lambda s: edited(s, "tasks_seen", None, True),
                        TypeError, r"tasks_seen must be an int >= 0, got bool"),
}
SEPARATE_BAD_STATES = {
    "float residual": (lambda s: edited(s, "residual", "0.weight", 0.5),
                       TypeError, r"state residual '0.weight' must be a floating-point scalar "
                                  r"tensor, got float"),
    "negative residual": (lambda s: edited(s, "residual", "2.bias",
                                           torch.tensor(-1e-3, dtype=torch.float64)),
                          ValueError, r"state residual '2.bias' must be finite and >= 0"),
    "NaN residual": (lambda s: edited(s, "residual", "2.bias",
                                      torch.tensor(math.nan, dtype=torch.float64)),
                     ValueError, r"state residual '2.bias' must be finite and >= 0, got 1 NaN"),
    "NaN task importance": (
        lambda s: edited(s, "task_importances", None,
                         [s["task_importances"][0],
                          {**s["task_importances"][1],
                           "0.bias": with_element(s["task_importances"][1]["0.bias"],
                                                  math.nan)}]),
        ValueError, r"state task_importances\[1\] '0.bias' must be finite and >= 0"),
}


MAS_BAD_STATES = {
    "MAS residual": (lambda s: edited(s, "residual", "0.bias",
                                      torch.zeros((), dtype=torch.float64)),
                     ValueError, r"state residual '0.bias': MAS keeps no residual"),
}
LOAD_CASES = ([(name, case) for name in METHODS for case in BAD_STATES]
              + [("ewc-separate", case) for case in SEPARATE_BAD_STATES]
              + [(name, case) for name in ("mas-sum", "mas-ema") for case in MAS_BAD_STATES])


@pytest.mark.parametrize("name, case", LOAD_CASES)
def test_load_refuses_bad_values_naming_the_entry_and_changes_nothing(name, case):
    source = consolidated(name, keep=name == "ewc-separate")
    good = source.state_dict()
    make, error, match = {**BAD_STATES, **SEPARATE_BAD_STATES, **MAS_BAD_STATES}[case]
    target = consolidated(name, tasks=1, keep=name == "ewc-separate")
    refused(target, error, match, lambda: target.load_state_dict(make(good)))
    target.load_state_dict(good)  # the unedited state loads
    assert state_of(target)["_importance"] == state_of(source)["_importance"]


def test_load_refuses_values_that_overflow_the_param_dtype():
    reg = MAS(mlp().float())
    reg.consolidate([torch.randn(3, 6)])
    state = reg.state_dict()
    state["importance"] = {n: t.double() for n, t in state["importance"].items()}
    state["importance"]["2.weight"][1, 2] = 1e300  # finite in float64, inf in float32
    refused(reg, ValueError, r"state importance '2.weight' must be finite and >= 0, got 1 inf",
            lambda: reg.load_state_dict(state))


def test_loaded_tensors_are_copies_the_caller_cannot_change():
    reg = consolidated("mas-sum")
    state = reg.state_dict()
    restored = MAS(reg.model)
    restored.load_state_dict(state)
    before = state_of(restored)
    for tensors in (state["importance"], state["anchor"]):
        for t in tensors.values():
            t.fill_(-1.0)
    assert state_of(restored) == before


# ---------------------------------------------------------------------------------------------
# 2. All or nothing


@pytest.mark.parametrize("name", METHODS)
def test_load_with_a_bad_tasks_seen_changes_nothing(name):
    other = consolidated(name, tasks=3).state_dict()
    reg = consolidated(name, tasks=1)
    refused(reg, ValueError, "tasks_seen", lambda: reg.load_state_dict(
        {**other, "tasks_seen": -3}))


@pytest.mark.parametrize("name", METHODS)
def test_every_penalty_operation_refuses_a_param_that_changed_shape(name):
    reg = consolidated(name)
    model = reg.model
    model[0].weight.grad = None  # a missing .grad must not be created either
    with torch.no_grad():
        model[2].bias.data = torch.zeros(5, dtype=DTYPE)
    match = r"parameter '2.bias' \(shape \(5,\).*no longer fits its importance \(shape \(4,\)"
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    refused(reg, ValueError, match, lambda: reg.add_penalty_grad_())
    refused(reg, ValueError, match, lambda: reg.proximal_step_(sgd))
    refused(reg, ValueError, match, lambda: reg.proximal_step_(lr=0.1))
    refused(reg, ValueError, match, lambda: reg.penalty())
    refused(reg, ValueError, match, lambda: reg.stability_bounds(lr=0.1))
    refused(reg, ValueError, match, lambda: reg.consolidate(batches()))


def test_a_param_that_changed_dtype_is_refused_until_the_state_is_laid_out_again():
    reg = consolidated("ewc-separate")
    reg.model.float()
    refused(reg, ValueError, r"'0.weight' \(shape \(8, 6\), torch.float32.*float64.*"
                             r"reg.load_state_dict\(reg.state_dict\(\)\)",
            lambda: reg.add_penalty_grad_())
    reg.load_state_dict(reg.state_dict())
    assert all(t.dtype == torch.float32 for t in reg.importance.values())
    reg.add_penalty_grad_()


@pytest.mark.parametrize("name", METHODS)
def test_consolidate_refuses_an_optimizer_without_every_param_before_the_pass(name):
    reg = consolidated(name)
    partial = torch.optim.SGD(reg.model[0].parameters(), lr=0.1)
    refused(reg, ValueError, "optimizer does not hold every regularized parameter",
            lambda: reg.consolidate(batches(seed=7), optimizer=partial))


def test_per_task_state_with_a_bad_later_task_changes_nothing():
    reg = consolidated("ewc-separate", keep=True)
    tasks = [{"importance": t, "anchor": reg.anchor} for t in reg.task_importances]
    bad = copy.deepcopy(tasks)
    bad[1]["importance"]["2.weight"] = -bad[1]["importance"]["2.weight"]
    refused(reg, ValueError, r"state tasks\[1\] importance '2.weight' must be finite and >= 0",
            lambda: reg.load_state_dict({"method": "EWC", "tasks": bad}))
    refused(reg, TypeError, r"state tasks must be a list",
            lambda: reg.load_state_dict({"method": "EWC", "tasks": tasks[0]}))


@pytest.mark.parametrize("name", METHODS)
def test_empty_state_dict_round_trip_includes_frozen_params_with_state(name):
    reg = consolidated(name)
    reg.model[0].weight.requires_grad_(False)
    reg.consolidate(batches(seed=5))
    template = reg.empty_state_dict()
    assert template["importance"].keys() == reg.importance.keys()
    saved = reg.state_dict()
    for key in ("importance", "anchor", "residual"):  # as torch.distributed.checkpoint loads
        for param, t in template[key].items():
            t.copy_(saved[key][param])
    template["tasks_seen"] = saved["tasks_seen"]
    restored = type(reg)(reg.model, **METHODS[name][1])
    restored.load_state_dict(template)
    assert state_of(restored) == state_of(reg)
    fresh = type(reg)(mlp(), **METHODS[name][1])
    fresh.load_state_dict(fresh.empty_state_dict())  # the template itself loads
    assert fresh.tasks_seen == 0


# ---------------------------------------------------------------------------------------------
# 3. Frozen parameters keep what they learned


@pytest.mark.parametrize("name", METHODS)
def test_a_param_frozen_between_tasks_keeps_its_anchor_and_merges_zero_importance(name):
    method, kwargs = METHODS[name]
    model = mlp()
    reg = method(model, **kwargs)
    reg.consolidate(batches(seed=1))
    perturb_(model)
    reg.consolidate(batches(seed=2))
    frozen = model[0].weight
    importance, anchor = reg.importance["0.weight"].clone(), reg.anchor["0.weight"].clone()
    residual = reg.state_dict()["residual"].get("0.weight")
    frozen.requires_grad_(False)
    perturb_(model, seed=3)  # trains the rest; the frozen weight stays put
    reg.consolidate(batches(seed=3))

    decay = {"mas-ema": 0.25, "ewc-online": 0.6}.get(name, 1.0)
    assert torch.equal(reg.importance["0.weight"], importance * decay)
    assert torch.equal(reg.anchor["0.weight"], anchor)
    if residual is not None:
        assert torch.equal(reg.state_dict()["residual"]["0.weight"], residual)
    assert reg.tasks_seen == 3

    restored = method(model, **kwargs)  # the state loads back, frozen entry included
    restored.load_state_dict(reg.state_dict())
    assert state_of(restored)["_importance"] == state_of(reg)["_importance"]
    refused(reg, ValueError, "batch 0 of data",
            lambda: reg.consolidate([(torch.full((2, 6), math.nan, dtype=DTYPE),
                                      torch.zeros(2, dtype=torch.long))]))

    frozen.requires_grad_(True)  # unfrozen, it is protected again (penalty scale 1 here)
    before, gap = reg.penalty().detach(), frozen.detach() - anchor
    with torch.no_grad():
        frozen.add_(0.5)
    expected = (importance * decay * ((gap + 0.5) ** 2 - gap ** 2)).sum()
    assert expected.abs() > 0.01
    torch.testing.assert_close(reg.penalty().detach() - before, expected)


# ---------------------------------------------------------------------------------------------
# 4. Garbage in is refused, not averaged


FORMS = {
    "mas-batch": (MAS, {}), "mas-per-sample": (MAS, {"per_sample": True}),
    "mas-local": (MAS, {"local": True}),
    "ewc-empirical": (EWC, {"lam": 1.0}),
    "ewc-exact-per-sample": (EWC, {"lam": 1.0, "fisher": "exact", "per_sample": True}),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_input_is_refused_naming_the_batch(form, bad):
    method, kwargs = FORMS[form]
    model = mlp()
    reg = method(model, **kwargs)
    reg.consolidate(batches(seed=1))
    perturb_(model)
    model(batches()[0][0]).pow(2).sum().backward()
    data = batches(sizes=(4, 3, 5), seed=4)
    data.insert(1, (torch.empty(0, 6, dtype=DTYPE), torch.empty(0, dtype=torch.long)))
    data[2][0][1, 3] = bad  # the third batch; the second is empty
    refused(reg, ValueError, r"batch 2 of data gives a non-finite importance for '0.weight' "
                             r"\(its input holds NaN or inf\); the state is left as it was",
            lambda: reg.consolidate(data))
    reg.consolidate(data[:2] + data[3:])  # the same data without that batch is taken


def test_a_non_finite_param_is_named():
    reg = consolidated("mas-sum")
    with torch.no_grad():
        reg.model[2].bias[1] = math.inf
    refused(reg, ValueError, r"batch 0 of data .* \(parameter '2.bias' is not finite\)",
            lambda: reg.consolidate(batches()))


def test_a_merged_importance_that_overflows_the_param_dtype_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).half()
    reg = MAS(model)
    x = torch.randn(6, 4).half()
    reg.consolidate([x])
    state = reg.state_dict()
    state["importance"]["2.bias"] = torch.full((3,), 6e4, dtype=torch.float16)
    reg.load_state_dict(state)
    with torch.no_grad():
        model[2].bias.fill_(5000.0)  # a new importance of about 2 * 5000 per bias element
    refused(reg, ValueError, r"consolidate: importance of '2.bias' after this task must be "
                             r"finite and >= 0, got 3 inf element\(s\); the state is left",
            lambda: reg.consolidate([x]))


# ---------------------------------------------------------------------------------------------
# Sharded and all-reduced paths: every rank refuses together and changes nothing


def distributed_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def refused_on_every_rank(reg, own_match, operation):
        before = state_of(reg)
        try:
            operation()
        except ValueError as error:
            message = str(error)
        else:
            raise AssertionError(f"rank {rank}: not refused")
        assert state_of(reg) == before, f"rank {rank}: state changed"
        match = own_match if own_match is not None else "another rank"
        import re
        assert re.search(match, message), f"rank {rank}: {message!r} lacks {match!r}"

    def nan_batch_on(bad_rank, index):
        data = batches(seed=20 + rank)
        if rank == bad_rank:
            data[index][0][0, 0] = math.nan
        return data

    # All-reduced importance (a plain model on every rank): rank 1's second batch holds NaN.
    reg = MAS(mlp(), per_sample=True)
    reg.consolidate(batches(seed=20 + rank))
    refused_on_every_rank(reg, "batch 1 of data" if rank == 1 else None,
                          lambda: reg.consolidate(nan_batch_on(1, 1)))

    # FSDP2: the importance of each shard; rank 0's first batch holds NaN.
    model = mlp()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    for kwargs in ({"lam": 1.0}, {"lam": 1.0, "per_sample": True, "mode": "online"}):
        reg = EWC(model, **kwargs)
        reg.consolidate(batches(seed=20 + rank))
        refused_on_every_rank(reg, "batch 0 of data" if rank == 0 else None,
                              lambda: reg.consolidate(nan_batch_on(0, 0)))

    # Loading a DCP-style state whose shard on rank 1 holds a negative importance.
    state = reg.state_dict()
    imp = state["importance"]["2.weight"]
    assert isinstance(imp, DTensor)
    shard = imp.to_local().clone()
    if rank == 1 and shard.numel():
        shard.view(-1)[0] = -1.0
    bad = {**state, "importance": {**state["importance"], "2.weight": DTensor.from_local(
        shard, imp.device_mesh, imp.placements, shape=imp.shape, stride=imp.stride())}}
    refused_on_every_rank(reg, "state importance '2.weight' must be finite and >= 0"
                          if rank == 1 else None, lambda: reg.load_state_dict(bad))
    dist.barrier()


@requires_gloo
def test_every_rank_refuses_together_and_keeps_its_state():
    run_ranks(distributed_worker, timeout_s=300)
