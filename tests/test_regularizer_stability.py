"""Stiffness bound of the explicit penalty step and the proximal step, for MAS and EWC."""
import math
import warnings

import pytest
import torch
from torch import nn

from classp_fused import CLASSP
from classp_fused.regularizers import EWC, MAS, StiffnessWarning

DTYPE = torch.float64


def mlp(seed=0, dtype=DTYPE):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batches(sizes, seed=1, dtype=DTYPE):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen))
            for n in sizes]


def perturb_(model, scale=0.3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def consolidated(method, lam, seed=0, **kwargs):
    model = mlp(seed)
    reg = method(model, lam=lam, **kwargs)
    reg.consolidate(batches([6, 5]))
    perturb_(model)
    return model, reg


def curvature(reg):
    """2 * scale * Omega per parameter, scale = lam (MAS) or lam / 2 (EWC)."""
    scale = reg.lam / 2 if isinstance(reg, EWC) else reg.lam
    return {n: 2 * scale * t for n, t in reg.importance.items()}


@pytest.mark.parametrize("method", [MAS, EWC])
def test_bound_for_a_plain_lr_is_two_over_the_largest_curvature(method):
    model, reg = consolidated(method, lam=3.0)
    bounds = reg.stability_bounds(lr=0.1)
    assert bounds.keys() == dict(model.named_parameters()).keys()
    for name, k in curvature(reg).items():
        b = bounds[name]
        assert b.param == name
        assert math.isclose(b.stiffness, 0.1 * k.max().item(), rel_tol=1e-12)
        assert math.isclose(b.max_lr, 2 / k.max().item(), rel_tol=1e-12)
        assert math.isclose(b.max_lam, 3.0 * 2 / b.stiffness, rel_tol=1e-12)
    assert reg.max_stable_lr(lr=0.1) == min(b.max_lr for b in bounds.values())
    assert math.isinf(MAS(mlp()).max_stable_lr(lr=0.1))  # nothing consolidated yet


@pytest.mark.parametrize("factor, grows", [(0.95, False), (1.05, True)])
def test_explicit_steps_diverge_exactly_beyond_the_bound(factor, grows):
    model, reg = consolidated(MAS, lam=2.0)
    lr = factor * reg.max_stable_lr(lr=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    start = reg.penalty().item()
    for _ in range(300):  # penalty alone: theta - theta* scales by (1 - lr * k) per step
        optimizer.zero_grad()
        reg.add_penalty_grad_()
        optimizer.step()
    assert (reg.penalty().item() > start) == grows


def test_consolidate_warns_once_naming_the_stiffest_param_and_safe_values():
    model = mlp()
    reg = MAS(model, lam=50.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.warns(StiffnessWarning) as record:
        reg.consolidate(batches([6, 5]), optimizer=optimizer)
    assert len(record) == 1
    bounds = reg.stability_bounds(optimizer)
    worst = max(bounds.values(), key=lambda b: b.stiffness)
    message = str(record[0].message)
    assert repr(worst.param) in message and f"{worst.max_lr:.3g}" in message
    assert f"{worst.max_lam:.3g}" in message and "proximal_step_" in message
    assert "penalty='proximal'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.consolidate(batches([6, 5]), lr=1e-4)
        reg.consolidate(batches([6, 5]))  # no optimizer, no check


def test_classp_step_size_is_lr_over_root_of_accumulator():
    model, reg = consolidated(EWC, lam=4.0)
    optimizer = CLASSP(model.parameters(), lr=0.05, threshold=0.0, eps=1e-3, power=2.0,
                       backend="torch")
    for seed in range(3):
        optimizer.zero_grad()
        model(batches([4], seed=seed)[0][0]).pow(2).sum().backward()
        optimizer.step()
    bounds = reg.stability_bounds(optimizer)
    for (name, p), k in zip(model.named_parameters(), curvature(reg).values()):
        eta = 0.05 / (1e-3 + optimizer.state[p]["accumulator"]).sqrt()
        assert math.isclose(bounds[name].stiffness, (eta * k).max().item(), rel_tol=1e-9)
    optimizer.param_groups[0]["apply_scaling"] = False
    assert reg.stability_bounds(optimizer) == reg.stability_bounds(lr=0.05)


def test_bound_arguments_are_checked():
    model, reg = consolidated(MAS, lam=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="give optimizer=, lr= or both"):
        reg.stability_bounds()
    for kwargs in ({}, {"optimizer": optimizer, "lr": 0.1}):
        with pytest.raises(ValueError, match="exactly one of optimizer= and lr="):
            reg.proximal_step_(**kwargs)
    with pytest.raises(ValueError, match="lr"):
        reg.proximal_step_(lr=-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        reg.stability_bounds("sgd")
    with pytest.raises(ValueError, match="without optimizer="):
        reg.stability_bounds(lr=[0.1])
    with pytest.raises(ValueError, match=r"one lr per param group \(1\), got 2"):
        reg.stability_bounds(optimizer, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"lr\[0\] must be a finite number"):
        reg.stability_bounds(optimizer, lr=[float("nan")])
    other = torch.optim.SGD(mlp(1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="regularized parameter"):
        reg.proximal_step_(other)
    before = reg.importance
    with pytest.raises(ValueError, match="one lr per param group"):  # checked before any work
        reg.consolidate(batches([3]), optimizer=optimizer, lr=[0.1, 0.1])
    assert all(torch.equal(before[n], t) for n, t in reg.importance.items())


def test_an_lr_with_the_optimizer_replaces_its_groups_lrs():
    model, reg = consolidated(EWC, lam=4.0)
    optimizer = CLASSP([{"params": model[0].parameters()},
                        {"params": model[2].parameters()}],
                       lr=0.0, threshold=0.0, eps=1e-3, power=2.0, backend="torch")
    optimizer.zero_grad()
    model(batches([4], seed=5)[0][0]).pow(2).sum().backward()
    optimizer.step()  # an accumulator to scale by
    assert all(b.stiffness == 0 for b in reg.stability_bounds(optimizer).values())
    bounds = reg.stability_bounds(optimizer, lr=[0.05, 0.2])
    for (name, p), k in zip(model.named_parameters(), curvature(reg).values()):
        lr = 0.05 if name.startswith("0.") else 0.2
        eta = lr / (1e-3 + optimizer.state[p]["accumulator"]).sqrt()
        assert math.isclose(bounds[name].stiffness, (eta * k).max().item(), rel_tol=1e-9)
        assert math.isclose(bounds[name].max_lr, 2 * lr / bounds[name].stiffness, rel_tol=1e-12)
    for group in optimizer.param_groups:
        group["lr"] = 0.2
    assert reg.stability_bounds(optimizer, lr=0.2) == reg.stability_bounds(optimizer)
    assert reg.max_stable_lr(optimizer, lr=0.2) == reg.max_stable_lr(optimizer)


def test_consolidate_checks_the_lr_given_with_the_optimizer_not_its_decayed_one():
    model = mlp()
    reg = MAS(model, lam=50.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a schedule's end
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.consolidate(batches([6, 5]), optimizer=optimizer)
    with pytest.warns(StiffnessWarning, match="explicit penalty step is unstable"):
        reg.consolidate(batches([6, 5]), optimizer=optimizer, lr=[1.0])


def test_stability_bounds_is_a_dict_by_parameter_name_of_those_holding_state():
    model, reg = consolidated(MAS, lam=1.0)
    model[0].weight.requires_grad_(False)
    bounds = reg.stability_bounds(lr=0.1)
    assert isinstance(bounds, dict)
    assert list(bounds) == ["0.bias", "2.weight", "2.bias"]
    assert MAS(mlp()).stability_bounds(lr=0.1) == {}


@pytest.mark.parametrize("method, kwargs", [(MAS, {}), (EWC, {}), (EWC, {"mode": "online"})])
def test_proximal_step_is_the_closed_form_minimiser(method, kwargs):
    model, reg = consolidated(method, lam=7.0, **kwargs)
    for seed in (2, 3):  # a second task boundary: EWC separate has a weighted anchor
        reg.consolidate(batches([4], seed=seed))
        perturb_(model, seed=seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.proximal_step_(lr=0.3)
    for name, p in model.named_parameters():
        c = 0.3 * curvature(reg)[name]
        theta, m = before[name], reg.anchor[name]
        torch.testing.assert_close(p.detach(), (theta + c * m) / (1 + c), rtol=1e-12, atol=0)
        # It minimises scale * Omega (x - m)^2 + (x - theta)^2 / (2 * lr): zero gradient.
        gradient = curvature(reg)[name] * (p.detach() - m) + (p.detach() - theta) / 0.3
        torch.testing.assert_close(gradient, torch.zeros_like(gradient), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", [MAS, EWC])
def test_proximal_matches_explicit_step_to_first_order_at_small_lam(method):
    errors = []
    for lam in (1e-3, 1e-4):
        model, reg = consolidated(method, lam=lam)
        theta = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        reg.add_penalty_grad_()
        explicit = [t - 0.5 * p.grad for t, p in zip(theta, model.parameters())]
        reg.proximal_step_(lr=0.5)
        moved = torch.cat([(e - t).flatten() for e, t in zip(explicit, theta)])
        gap = torch.cat([(p.detach() - e).flatten() for p, e in zip(model.parameters(), explicit)])
        errors.append(gap.norm() / moved.norm())
    # The relative gap is O(c): ten times smaller lam, ten times smaller gap.
    assert errors[0] < 1e-3 and 8 < errors[0] / errors[1] < 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", [MAS, EWC])
def test_lam_1e6_with_proximal_steps_stays_finite_and_never_raises_the_penalty(method, dtype):
    model = mlp(dtype=dtype)
    reg = method(model, lam=1e6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for task in range(3):
        for step in range(10):
            optimizer.zero_grad()
            x, y = batches([8], seed=10 * task + step, dtype=dtype)[0]
            nn.functional.cross_entropy(model(x).float(), y).backward()
            optimizer.step()
            before = reg.penalty().item()
            reg.proximal_step_(optimizer)
            after = reg.penalty().item()
            assert after <= before * (1 + 1e-2) + 1e-6, (task, step, before, after)
            assert all(torch.isfinite(p).all() for p in model.parameters())
        reg.consolidate(batches([6, 5], seed=task, dtype=dtype))
    assert math.isfinite(reg.penalty().item())


def test_proximal_step_with_classp_moves_only_updated_elements():
    model, reg = consolidated(MAS, lam=5.0)
    optimizer = CLASSP(model.parameters(), lr=0.05, threshold=0.5, eps=1e-2, power=1.0,
                       backend="torch")
    optimizer.zero_grad()
    model(batches([4], seed=9)[0][0]).pow(2).sum().backward()
    optimizer.step()
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.proximal_step_(optimizer)
    masks = []
    for (name, p), k in zip(model.named_parameters(), curvature(reg).values()):
        mask = p.grad.square() > 0.5
        masks.append(mask)
        acc = optimizer.state[p]["accumulator"]
        c = torch.where(mask, 0.05 / (1e-2 + acc) * k, 0.0)
        expected = (stepped[name] + c * reg.anchor[name]) / (1 + c)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)
        assert torch.equal(p.detach()[~mask], stepped[name][~mask])
    assert any(m.any() for m in masks) and any((~m).any() for m in masks)


@pytest.mark.parametrize("method", [MAS, EWC])
def test_in_the_proximal_form_the_warning_says_elements_freeze_not_to_go_proximal(method):
    reg = method(mlp(), lam=50.0, penalty="proximal")
    optimizer = torch.optim.SGD(reg.model.parameters(), lr=1.0)
    with pytest.warns(StiffnessWarning) as record:
        reg.consolidate(batches([6, 5]), optimizer=optimizer)
    message = str(record[0].message)
    assert "stays stable" in message and "stop learning" in message
    assert "apply the penalty in proximal form" not in message
    assert "proximal_step_()" not in message
    worst = max(reg.stability_bounds(optimizer).values(), key=lambda b: b.stiffness)
    assert f"{worst.max_lam:.3g}" in message and repr(worst.param) in message
