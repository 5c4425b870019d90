"""MAS against its definition, closed forms and the guarantees of the Regularizer interface."""
import io

import pytest
import torch
from torch import nn

from classp_fused.regularizers import MAS, Regularizer
from helpers import MixedModel, spy_linear_form

DTYPE = torch.float64


def mlp(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8) if batchnorm else nn.Identity(), nn.Tanh(),
              nn.Dropout(0.3), nn.Linear(8, 4)]
    return nn.Sequential(*layers).to(DTYPE)


def batches(sizes, features=6, classes=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=gen, dtype=DTYPE),
             torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


def naive_per_sample(model, data):
    """Mean over samples of |grad ||F(x_k)||^2|, one backward per sample."""
    model.eval()
    params = dict(model.named_parameters())
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    n_samples = 0
    for x, _ in data:
        for x_k in x:
            grads = torch.autograd.grad(model(x_k[None]).pow(2).sum(), list(params.values()))
            for n, g in zip(params, grads):
                omega[n] += g.abs()
            n_samples += 1
    return {n: o / n_samples for n, o in omega.items()}


def assert_dicts_close(a, b, **kw):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **kw)


def test_is_a_regularizer():
    assert issubclass(MAS, Regularizer)


def test_per_sample_matches_naive_loop():
    model, data = mlp(), batches([5, 7, 3])
    reg = MAS(model, per_sample=True)
    reg.consolidate(data)
    assert_dicts_close(reg.importance, naive_per_sample(model, data))


def test_batch_form_is_abs_of_batch_gradient_over_n():
    model, data = mlp(), batches([5, 7, 3])
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for x, _ in data:
        grads = torch.autograd.grad(model(x).pow(2).sum(), list(params.values()))
        for n, g in zip(params, grads):
            expected[n] += g.abs() / 15
    model.train()
    reg = MAS(model)
    reg.consolidate(data)
    assert_dicts_close(reg.importance, expected)


@pytest.mark.parametrize("layer", [nn.Linear(6, 3), nn.Linear(6, 3, bias=False)],
                         ids=["bias", "no-bias"])
def test_local_equals_global_for_one_linear_layer(layer):
    model = layer.to(DTYPE)
    data = batches([4, 9])
    global_mas, local_mas = MAS(model, per_sample=True), MAS(model, local=True)
    global_mas.consolidate(data)
    local_mas.consolidate(data)
    assert_dicts_close(local_mas.importance, global_mas.importance)
    x = torch.cat([x for x, _ in data])
    y = model(x).detach()
    hebbian = 2 * (y.abs()[:, :, None] * x.abs()[:, None, :]).mean(0)
    torch.testing.assert_close(local_mas.importance["weight"], hebbian)


def test_local_equals_global_for_one_conv_layer():
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 3, padding=1).to(DTYPE)
    data = [torch.randn(4, 2, 5, 5, dtype=DTYPE), torch.randn(3, 2, 5, 5, dtype=DTYPE)]
    global_mas, local_mas = MAS(model, per_sample=True), MAS(model, local=True)
    global_mas.consolidate(data)
    local_mas.consolidate(data)
    assert_dicts_close(local_mas.importance, global_mas.importance)


def test_local_gives_zero_importance_outside_linear_and_conv_layers():
    model = mlp(batchnorm=True)
    reg = MAS(model, local=True)
    reg.consolidate(batches([6]))
    assert torch.all(reg.importance["1.weight"] == 0) and torch.all(reg.importance["1.bias"] == 0)
    assert torch.all(reg.importance["0.weight"] > 0)


@pytest.mark.parametrize("kwargs", [{}, {"per_sample": True}, {"local": True}],
                         ids=["batch", "per-sample", "local"])
def test_labels_are_ignored(kwargs):
    model, data = mlp(), batches([5, 6])
    permuted = [(x, y[torch.randperm(len(y))]) for x, y in data]
    inputs_only = [x for x, _ in data]
    results = []
    for d in (data, permuted, inputs_only):
        reg = MAS(model, **kwargs)
        reg.consolidate(d)
        results.append(reg.importance)
    assert_dicts_close(results[0], results[1], rtol=0, atol=0)
    assert_dicts_close(results[0], results[2], rtol=0, atol=0)


def test_per_sample_dominates_batch_and_equals_it_for_batch_size_one():
    model, data = mlp(), batches([8, 8])
    per_sample, batch = MAS(model, per_sample=True), MAS(model)
    per_sample.consolidate(data)
    batch.consolidate(data)
    for name, omega in per_sample.importance.items():
        assert torch.all(omega >= batch.importance[name] - 1e-12)
    singles = [(x[k:k + 1], y[k:k + 1]) for x, y in data for k in range(len(x))]
    batch_of_one = MAS(model)
    batch_of_one.consolidate(singles)
    assert_dicts_close(batch_of_one.importance, per_sample.importance)


def test_penalty_value_and_its_gradient_added_after_backward():
    model, data = mlp(), batches([5, 5])
    reg = MAS(model, lam=3.0, per_sample=True)
    assert reg.penalty().item() == 0.0
    reg.consolidate(data)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = sum((reg.importance[n] * (p - anchors[n]).pow(2)).sum()
                   for n, p in model.named_parameters())
    penalty = reg.penalty()
    torch.testing.assert_close(penalty, 3.0 * expected)
    autograd = torch.autograd.grad(penalty, list(model.parameters()))

    x = torch.randn(4, 6, dtype=DTYPE)
    model(x).sum().backward()
    loss_grads = [p.grad.clone() for p in model.parameters()]
    model[0].bias.grad = None  # a missing .grad is created
    reg.add_penalty_grad_()
    for name_p, g_loss, g_pen in zip(model.named_parameters(), loss_grads, autograd):
        name, p = name_p
        base = 0 if name == "0.bias" else g_loss
        torch.testing.assert_close(p.grad, base + g_pen)


def test_consolidate_leaves_model_state_untouched():
    model = mlp(batchnorm=True)
    model[1].running_mean.normal_()
    model.train()
    model[3].eval()  # mixed per-module flags
    model[4].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b for b in model.buffers()]
    flags = [m.training for m in model.modules()]
    for kwargs in ({}, {"per_sample": True}, {"local": True}):
        MAS(model, **kwargs).consolidate(batches([5, 4]))
        assert [m.training for m in model.modules()] == flags
        assert [p.requires_grad for p in model.parameters()] == [True] * 5 + [False]
        assert all(a is b for a, b in zip(model.buffers(), buffers))
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


def test_only_params_requiring_grad_are_regularized():
    model = mlp()
    model[0].weight.requires_grad_(False)
    reg = MAS(model)
    reg.consolidate(batches([5]))
    assert set(reg.importance) == {"0.bias", "4.weight", "4.bias"}
    assert reg.state_bytes() == 2 * 8 * (8 + 4 * 8 + 4)


def test_sum_and_ema_accumulation_across_tasks():
    model = mlp()
    first, second = batches([6], seed=1), batches([6], seed=2)
    omega_1 = naive_per_sample(model, first)  # each task's importance, by the definition
    summed, ema = MAS(model, per_sample=True), MAS(model, accumulate="ema", alpha=0.25,
                                                     per_sample=True)
    for reg in (summed, ema):
        reg.consolidate(first)
    assert_dicts_close(ema.importance, omega_1)  # the first task takes the new importance
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    omega_2 = naive_per_sample(model, second)
    for reg in (summed, ema):
        reg.consolidate(second)
    assert_dicts_close(summed.importance, {n: omega_1[n] + omega_2[n] for n in omega_1})
    assert_dicts_close(ema.importance, {n: 0.25 * omega_1[n] + 0.75 * omega_2[n]
                                        for n in omega_1})
    for reg in (summed, ema):  # theta* is reset at each task boundary
        assert reg.tasks_seen == 2
        assert_dicts_close(reg.anchor, dict(model.named_parameters()), rtol=0, atol=0)
        assert reg.penalty().item() == 0.0


def test_state_dict_round_trip_through_torch_load_weights_only():
    model, data = mlp(), batches([5])
    reg = MAS(model, lam=2.0, per_sample=True)
    reg.consolidate(data)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    restored = MAS(model, lam=2.0, per_sample=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_dicts_close(restored.importance, reg.importance, rtol=0, atol=0)
    torch.testing.assert_close(restored.penalty(), reg.penalty(), rtol=0, atol=0)
    assert restored.state_bytes() == reg.state_bytes() == 2 * 8 * (6 * 8 + 8 + 8 * 4 + 4)
    with pytest.raises(ValueError, match="MAS"):
        restored.load_state_dict({**reg.state_dict(), "method": "EWC"})


def test_state_bytes_is_zero_before_consolidate_and_follows_dtype():
    model = mlp().float()
    reg = MAS(model)
    assert reg.state_bytes() == 0
    reg.consolidate([torch.randn(3, 6)])
    assert reg.state_bytes() == 2 * 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lam": -1.0}, ValueError, "lam"),
    ({"lam": "1"}, TypeError, "lam"),
    ({"lam": float("nan")}, ValueError, "lam"),
    ({"lam": float("inf")}, ValueError, "lam"),
    ({"accumulate": "mean"}, ValueError, "accumulate"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"alpha": -0.1}, ValueError, "alpha"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        MAS(mlp(), **kwargs)


def test_bad_model_and_data_raise():
    with pytest.raises(TypeError, match="model"):
        MAS("not a module")
    reg = MAS(mlp())
    with pytest.raises(ValueError, match="data is empty"):
        reg.consolidate([])
    with pytest.raises(TypeError, match="data"):
        reg.consolidate([{torch.randn(2, 6)}])  # a set: neither tensor, sequence nor mapping
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        MAS(frozen).consolidate(batches([2]))


def mixed_model(seed=0):
    torch.manual_seed(seed)
    return MixedModel(4).to(DTYPE)


def test_linear_fast_path_equals_vmap_path_on_a_mixed_model(monkeypatch):
    model = mixed_model()
    data = [torch.randn(n, 1, 5, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(n))
            for n in (5, 3)]
    results = []
    for enabled in (True, False):
        with monkeypatch.context() as m:
            handled = spy_linear_form(m, enabled)
            reg = MAS(model, per_sample=True)
            reg.consolidate(data)
        results.append(reg.importance)
        assert handled == ({"mid.weight", "mid.bias"} if enabled else set())
    assert_dicts_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    assert_dicts_close(results[0], naive_per_sample(model, [(x, None) for x in data]))


@pytest.mark.parametrize("empty", [
    [torch.empty(0, 6, dtype=DTYPE)],  # a batch without samples
    iter([]),                          # a loader that yields nothing
])
def test_consolidate_without_samples_raises_and_keeps_the_importance(empty):
    model = mlp()
    reg = MAS(model, per_sample=True)
    reg.consolidate(batches([4]))
    importance, anchor = reg.importance, reg.anchor
    with pytest.raises(ValueError, match="no samples"):
        reg.consolidate(empty)
    assert reg.tasks_seen == 1
    assert_dicts_close(reg.importance, importance, rtol=0, atol=0)
    assert_dicts_close(reg.anchor, anchor, rtol=0, atol=0)


def test_load_refuses_a_state_with_a_missing_anchor_and_keeps_its_own():
    model = mlp()
    reg = MAS(model)
    reg.consolidate(batches([4]))
    own = reg.importance
    other = MAS(model)
    other.consolidate(batches([4], seed=5))
    state = other.state_dict()
    del state["anchor"]["0.bias"]
    with pytest.raises(ValueError, match="'0.bias'.*anchor|anchor.*'0.bias'|lack their pair"):
        reg.load_state_dict(state)
    assert_dicts_close(reg.importance, own, rtol=0, atol=0)


def test_model_without_parameters_raises():
    with pytest.raises(ValueError, match="ReLU.*no parameters"):
        MAS(nn.ReLU())


def test_per_task_state_dict_of_earlier_versions_loads_and_is_checked():
    model = mlp()
    reg = MAS(model, lam=2.0)
    reg.consolidate(batches([4]))
    old = {"method": "MAS", "tasks": [{"importance": reg.importance, "anchor": reg.anchor}]}
    restored = MAS(model, lam=2.0)
    restored.load_state_dict(old)
    assert restored.tasks_seen == 1
    assert_dicts_close(restored.importance, reg.importance, rtol=0, atol=0)
    assert_dicts_close(restored.anchor, reg.anchor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keeps one task, the state has 2"):
        MAS(model).load_state_dict({**old, "tasks": old["tasks"] * 2})
    del old["tasks"][0]["anchor"]["4.weight"]
    with pytest.raises(ValueError, match="lack their pair"):
        MAS(model).load_state_dict(old)
