"""EWC and online EWC against closed forms, naive loops and the Regularizer interface."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classp_fused.regularizers import EWC
from helpers import MixedModel, spy_linear_form

DTYPE = torch.float64
FEATURES, CLASSES = 5, 4


def softmax_regression(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, CLASSES).to(DTYPE)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(7, CLASSES)).to(DTYPE)


def batches(sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, FEATURES, generator=gen, dtype=DTYPE),
             torch.randint(0, CLASSES, (n,), generator=gen)) for n in sizes]


def assert_dicts_close(a, b, **kw):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **kw)


def perturb_(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_exact_fisher_of_softmax_regression_equals_closed_form():
    model, data = softmax_regression(), batches([6, 5])
    reg = EWC(model, lam=1.0, fisher="exact", per_sample=True)
    reg.consolidate(data)
    x = torch.cat([x for x, _ in data])
    p = torch.softmax(model(x), -1).detach()                      # (N, C)
    # d log p_c / dz = e_c - p, so d log p_c / dW = (e_c - p) x^T and d log p_c / db = e_c - p.
    residual = torch.eye(CLASSES, dtype=DTYPE)[None] - p[:, None, :]   # (N, c, C)
    grad_w = residual[..., None] * x[:, None, None, :]                  # (N, c, C, F)
    fisher_w = (p[:, :, None, None] * grad_w.pow(2)).sum(1).mean(0)
    fisher_b = (p[:, :, None] * residual.pow(2)).sum(1).mean(0)
    torch.testing.assert_close(reg.importance["weight"], fisher_w)
    torch.testing.assert_close(reg.importance["bias"], fisher_b)


def test_exact_fisher_needs_no_labels_and_ignores_them():
    model, data = mlp(), batches([6, 3])
    with_labels, inputs_only = (EWC(model, 1.0, fisher="exact", per_sample=True)
                                for _ in range(2))
    with_labels.consolidate(data)
    inputs_only.consolidate([x for x, _ in data])
    assert_dicts_close(with_labels.importance, inputs_only.importance, rtol=0, atol=0)


def test_empirical_fisher_equals_one_backward_per_sample():
    model, data = mlp(), batches([6, 5])
    reg = EWC(model, lam=1.0, per_sample=True)
    reg.consolidate(data)
    model.eval()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in data:
        for x_k, y_k in zip(x, y):
            loss = -F.log_softmax(model(x_k[None]), -1)[0, y_k]
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                expected[n] += g.pow(2) / 11
    assert_dicts_close(reg.importance, expected)


def test_batched_empirical_fisher_squares_the_batch_mean_gradient():
    model, data = mlp(), batches([6, 4])
    reg = EWC(model, lam=1.0)
    reg.consolidate(data)
    model.eval()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in data:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
        for n, g in zip(params, grads):
            expected[n] += len(x) * g.pow(2) / 10
    assert_dicts_close(reg.importance, expected)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_per_sample_dominates_batched_and_equals_it_for_batch_size_one(fisher):
    model, data = mlp(), batches([8, 7])
    per_sample, batched = EWC(model, 1.0, fisher=fisher, per_sample=True), EWC(model, 1.0,
                                                                               fisher=fisher)
    per_sample.consolidate(data)
    batched.consolidate(data)
    for name, f in per_sample.importance.items():
        assert torch.all(f >= batched.importance[name] - 1e-12)
    singles = [(x[k:k + 1], y[k:k + 1]) for x, y in data for k in range(len(x))]
    batch_of_one = EWC(model, 1.0, fisher=fisher)
    batch_of_one.consolidate(singles)
    assert_dicts_close(batch_of_one.importance, per_sample.importance)


def test_separate_and_online_modes_across_tasks():
    model = mlp()
    first, second = batches([6], seed=1), batches([6], seed=2)
    separate = EWC(model, lam=4.0, per_sample=True, keep_task_importances=True)
    online = EWC(model, lam=4.0, mode="online", gamma=0.5, per_sample=True)
    online_sum = EWC(model, lam=4.0, mode="online", gamma=1.0, per_sample=True)
    regs = (separate, online, online_sum)
    for reg in regs:
        reg.consolidate(first)
    anchor_1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb_(model, 0.3)
    for reg in regs:
        reg.consolidate(second)
    anchor_2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher_1, fisher_2 = separate.task_importances
    assert separate.tasks_seen == 2 and online.task_importances is None
    assert_dicts_close(online.importance, {n: 0.5 * fisher_1[n] + fisher_2[n] for n in fisher_1})
    assert_dicts_close(online_sum.importance, separate.importance)
    assert_dicts_close(online.anchor, anchor_2, rtol=0, atol=0)

    perturb_(model)
    params = dict(model.named_parameters())
    expected = sum((f[n] * (params[n] - a[n]).pow(2)).sum()
                   for f, a in ((fisher_1, anchor_1), (fisher_2, anchor_2)) for n in f)
    torch.testing.assert_close(separate.penalty(), 2.0 * expected)
    latest = sum((online.importance[n] * (params[n] - anchor_2[n]).pow(2)).sum()
                 for n in params)
    torch.testing.assert_close(online.penalty(), 2.0 * latest)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_added_gradient_equals_autograd_of_penalty(mode):
    model = mlp()
    reg = EWC(model, lam=3.0, mode=mode, gamma=0.7)
    for seed in (1, 2):
        reg.consolidate(batches([5, 5], seed=seed))
        perturb_(model)
    expected = torch.autograd.grad(reg.penalty(), list(model.parameters()))
    for p in model.parameters():
        p.grad = None
    reg.add_penalty_grad_()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_consolidate_leaves_model_state_untouched():
    model = mlp()
    model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    model[4].eval()
    model[0].bias.requires_grad_(False)
    model[4].weight.grad = torch.randn_like(model[4].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad = model[4].weight.grad.clone()
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    for fisher in ("empirical", "exact"):
        for per_sample in (False, True):
            EWC(model, 1.0, fisher=fisher, per_sample=per_sample).consolidate(batches([4, 3]))
            assert [m.training for m in model.modules()] == flags
            assert [p.requires_grad for p in model.parameters()] == requires
            assert model[0].weight.grad is None and torch.equal(model[4].weight.grad, grad)
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_and_state_bytes():
    model = mlp()
    n_bytes = 8 * sum(p.numel() for p in model.parameters())
    reg = EWC(model, lam=2.0, fisher="exact")
    online = EWC(model, lam=2.0, mode="online", fisher="exact")
    assert reg.state_bytes() == 0
    for seed in (1, 2):
        for r in (reg, online):
            r.consolidate(batches([5], seed=seed))
        perturb_(model)
    residuals = 8 * len(list(model.parameters()))  # one float64 scalar per parameter
    assert reg.state_bytes() == 2 * n_bytes + residuals  # sum of F and weighted anchor
    assert online.state_bytes() == 2 * n_bytes
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = EWC(model, lam=2.0, fisher="exact")
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.penalty(), reg.penalty(), rtol=0, atol=0)
    assert restored.state_bytes() == reg.state_bytes()
    with pytest.raises(ValueError, match="EWC-separate"):
        EWC(model, lam=2.0, mode="online").load_state_dict(state)
    with pytest.raises(ValueError, match="EWC"):
        restored.load_state_dict({**state, "method": "MAS"})
    with pytest.raises(ValueError, match="parameter"):
        EWC(nn.Linear(3, 2).to(DTYPE), 1.0).load_state_dict(state)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lam": -0.5}, ValueError, "lam"),
    ({"lam": None}, TypeError, "lam"),
    ({"mode": "joint"}, ValueError, "mode"),
    ({"fisher": "true"}, ValueError, "fisher"),
    ({"gamma": 0.0}, ValueError, "gamma"),
    ({"gamma": 1.01}, ValueError, "gamma"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        EWC(mlp(), **{"lam": 1.0, **kwargs})


def test_bad_data_raises():
    reg = EWC(mlp(), lam=1.0)
    with pytest.raises(ValueError, match="label"):
        reg.consolidate([x for x, _ in batches([3])])
    with pytest.raises(ValueError, match="data is empty"):
        reg.consolidate(iter([]))


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_linear_fast_path_equals_vmap_path_on_a_mixed_model(monkeypatch, fisher):
    torch.manual_seed(0)
    model = MixedModel(CLASSES).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 1, 5, 5, generator=gen, dtype=DTYPE),
             torch.randint(0, CLASSES, (n,), generator=gen)) for n in (5, 3)]
    results = []
    for enabled in (True, False):
        with monkeypatch.context() as m:
            handled = spy_linear_form(m, enabled)
            reg = EWC(model, lam=1.0, fisher=fisher, per_sample=True)
            reg.consolidate(data)
        results.append(reg.importance)
        assert handled == ({"mid.weight", "mid.bias"} if enabled else set())
    assert_dicts_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def per_task_penalty(model, tasks):
    """sum_t sum F_t * (theta - theta*_t)^2 over remembered (F_t, theta*_t)."""
    return sum((f[n] * (p - a[n]).pow(2)).sum()
               for f, a in tasks for n, p in model.named_parameters())


def test_separate_mode_in_constant_memory_equals_per_task_form_over_ten_tasks():
    model = mlp()
    reg = EWC(model, lam=3.0, keep_task_importances=True)
    lean = EWC(model, lam=3.0)
    tasks, sizes = [], []
    for t in range(10):
        data = batches([4, 3], seed=t)
        reg.consolidate(data)
        lean.consolidate(data)
        tasks.append((reg.task_importances[-1], {n: p.detach().clone()
                                                 for n, p in model.named_parameters()}))
        sizes.append(lean.state_bytes())
        perturb_(model, 0.2)
    assert len(set(sizes)) == 1 and reg.tasks_seen == lean.tasks_seen == 10
    assert reg.state_bytes() == sizes[0] + sum(
        t.numel() * 8 for f, _ in tasks for t in f.values())
    expected = per_task_penalty(model, tasks)
    torch.testing.assert_close(lean.penalty(), 1.5 * expected, rtol=1e-12, atol=0)
    expected_grads = torch.autograd.grad(1.5 * expected, list(model.parameters()))
    for p in model.parameters():
        p.grad = None
    lean.add_penalty_grad_()
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_per_task_state_dicts_of_earlier_versions_still_load():
    model = mlp()
    reg = EWC(model, lam=2.0, keep_task_importances=True)
    tasks = []
    for seed in (1, 2, 3):
        reg.consolidate(batches([5], seed=seed))
        tasks.append({"importance": reg.task_importances[-1],
                      "anchor": {n: p.detach().clone() for n, p in model.named_parameters()}})
        perturb_(model)
    old = {"method": "EWC", "tasks": tasks}
    restored = EWC(model, lam=2.0)
    restored.load_state_dict(old)
    torch.testing.assert_close(restored.penalty(), reg.penalty(), rtol=1e-12, atol=0)
    assert restored.tasks_seen == 3
    online = EWC(model, lam=2.0, mode="online")
    with pytest.raises(ValueError, match="keeps one task, the state has 3"):
        online.load_state_dict(old)
    online.load_state_dict({"method": "EWC", "tasks": tasks[-1:]})
    assert_dicts_close(online.anchor, tasks[-1]["anchor"], rtol=0, atol=0)
