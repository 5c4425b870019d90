"""add_penalty_grad_ under torch.amp.GradScaler: the penalty joins the gradients at their
current scale, so adding it before or after scaler.unscale_ (or before backward) takes the
fp32 step, for CLASSP (which unscales inside its kernel) and for SGD and Adam."""
import pytest
import torch

from classp_fused import CLASSP, MAS
from helpers import bits, tiny_model

STEPS = 3
OPTIMIZERS = {
    "classp": lambda params: CLASSP(params, lr=0.05, threshold=1e-8),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}
# Where the penalty gradient is added relative to backward and unscale_.
ORDERS = ("after_backward", "after_unscale", "before_backward")


def _consolidated(seed=0):
    """A model whose parameters have moved away from a MAS anchor with a large importance."""
    model = tiny_model(seed=seed)
    g = torch.Generator().manual_seed(5)
    mas = MAS(model, lam=50.0)
    mas.consolidate([torch.randn(16, 6, generator=g)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    return model, mas


def _inputs():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(8, 6, generator=g) for _ in range(STEPS)]


def _run(optimizer_name, order="after_backward", scaler=None, autocast_dtype=None,
         scaler_aware=True):
    model, mas = _consolidated()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    aware = dict(scaler=scaler, optimizer=optimizer) if scaler_aware and scaler else {}
    for x in _inputs():
        optimizer.zero_grad()
        if order == "before_backward":
            mas.add_penalty_grad_(**aware)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float16,
                            enabled=autocast_dtype is not None):
            loss = model(x).float().pow(2).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None and order == "after_unscale":
            scaler.unscale_(optimizer)
        if order != "before_backward":
            mas.add_penalty_grad_(**aware)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return model


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_scaled_run_takes_the_fp32_steps_bit_for_bit(optimizer_name, order):
    # fp32 model, power-of-two scale: scaling and unscaling are exact, so any difference
    # from the unscaled run (penalty added at the same point) is a penalty at the wrong scale.
    reference = _run(optimizer_name, order)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled = _run(optimizer_name, order, scaler)
    assert scaler.get_scale() == 2.0 ** 10
    for p, q in zip(scaled.parameters(), reference.parameters()):
        assert torch.equal(bits(p), bits(q))


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_penalty_at_the_wrong_scale_is_caught(optimizer_name):
    # Without the scaler, a penalty added to still-scaled gradients is divided by the scale:
    # the comparison above would fail.
    reference = _run(optimizer_name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    unaware = _run(optimizer_name, "after_backward", scaler, scaler_aware=False)
    assert any(not torch.allclose(p, q, rtol=1e-3, atol=1e-5)
               for p, q in zip(unaware.parameters(), reference.parameters()))


@pytest.mark.parametrize("order", ("after_backward", "after_unscale"))
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_fp16_autocast_with_scaler_matches_fp32(optimizer_name, order):
    reference = _run(optimizer_name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = _run(optimizer_name, order, scaler, autocast_dtype=torch.float16)
    error = _max_difference(scaled, reference)
    step = _max_difference(_consolidated()[0], reference)
    assert error < 2e-3 * step
    if order == "after_backward":  # the penalty added to still-scaled gradients without scaler
        unaware = _run(optimizer_name, order, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12),
                       autocast_dtype=torch.float16, scaler_aware=False)
        assert _max_difference(unaware, reference) > 50 * error


def _max_difference(model, other):
    return max(float((p - q).detach().abs().max())
               for p, q in zip(model.parameters(), other.parameters()))


def test_disabled_scaler_adds_the_plain_gradient():
    model, mas = _consolidated()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mas.add_penalty_grad_(torch.amp.GradScaler("cpu", enabled=False), optimizer)
    plain = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()
    mas.add_penalty_grad_()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))


def test_scaler_before_its_first_scale_uses_the_initial_scale():
    model, mas = _consolidated()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mas.add_penalty_grad_()
    plain = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()
    mas.add_penalty_grad_(torch.amp.GradScaler("cpu", init_scale=2.0 ** 5), optimizer)
    assert all(torch.equal(p.grad, 2.0 ** 5 * g) for p, g in zip(model.parameters(), plain))


def test_bad_scaler_arguments_raise_before_any_gradient_changes():
    model, mas = _consolidated()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        mas.add_penalty_grad_(scaler=2.0, optimizer=optimizer)
    with pytest.raises(TypeError, match="optimizer must be"):
        mas.add_penalty_grad_(scaler=scaler)
    with pytest.raises(ValueError, match="optimizer is only used with scaler"):
        mas.add_penalty_grad_(optimizer=optimizer)
    scaler.scale(model(torch.randn(2, 6)).sum().mul(0)).backward()
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="before scaler.step"):
        mas.add_penalty_grad_(scaler, optimizer)
    assert all(bool((p.grad == 0).all()) for p in model.parameters())
