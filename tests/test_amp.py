"""CLASSP with torch.amp on the CPU: GradScaler runs match unscaled ones under bf16/fp16
autocast, with fp16 params and with unscale_ + clipping; an overflowing step is skipped
without touching params or state and the run then goes on as if it had not happened.
(The optimizer's grad_scale/found_inf contract itself is tested in test_optim.py.)"""
import pytest
import torch

from classp_fused import CLASSP
from helpers import CPU_BACKENDS, bits, tiny_model

HYPER = dict(lr=0.05, threshold=1e-6)
STEPS = 4


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def _inputs(dtype=torch.float32):
    return torch.randn(STEPS, 8, 6, generator=torch.Generator().manual_seed(2)).to(dtype)


def _train(model, optimizer, inputs, scaler=None, autocast_dtype=None, clip=None):
    for x in inputs:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = model(x).float().pow(2).mean()
        if scaler is None:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()


def _assert_same_run(model, optimizer, ref_model, ref_optimizer, **tolerance):
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tolerance)
        torch.testing.assert_close(optimizer.state[p]["accumulator"],
                                   ref_optimizer.state[q]["accumulator"], **tolerance)
        assert torch.equal(optimizer.state[p]["step"], ref_optimizer.state[q]["step"])


def _run(backend, scaler=None, dtype=torch.float32, **train_kwargs):
    model = tiny_model(dtype)
    optimizer = CLASSP(model.parameters(), backend=backend, **HYPER)
    _train(model, optimizer, _inputs(dtype), scaler=scaler, **train_kwargs)
    return model, optimizer


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_grad_scaler_run_matches_unscaled(backend, autocast_dtype):
    # A power-of-two scale is exact in both directions as long as nothing overflows or
    # underflows; fp16 backward can underflow differently, hence the tolerance.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = _run(backend, scaler, autocast_dtype=autocast_dtype)
    assert scaler.get_scale() == 2.0 ** 12  # no overflow, no growth within STEPS steps
    _assert_same_run(*scaled, *_run(backend, autocast_dtype=autocast_dtype),
                     rtol=1e-4, atol=1e-6)


def test_fp16_params_grad_scaler_run_matches_unscaled(backend):
    scaled = _run(backend, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), dtype=torch.float16)
    _assert_same_run(*scaled, *_run(backend, dtype=torch.float16), rtol=1e-3, atol=1e-3)


def test_unscale_and_clip_then_step_matches_unscaled(backend):
    scaled = _run(backend, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), clip=0.05)
    _assert_same_run(*scaled, *_run(backend, clip=0.05), rtol=1e-5, atol=1e-7)


def test_overflow_step_is_skipped_and_the_run_goes_on(backend):
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), backend=backend, **HYPER)
    inputs = _inputs()
    _train(model, optimizer, inputs[:1])
    params = [bits(p) for p in model.parameters()]
    accs = [bits(optimizer.state[p]["accumulator"]) for p in model.parameters()]

    # fp16 backward of a loss scaled by 2**60 overflows: GradScaler finds inf and backs off
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60, backoff_factor=2.0 ** -50)
    _train(model, optimizer, inputs[1:2], scaler=scaler, autocast_dtype=torch.float16)
    assert scaler.get_scale() == 2.0 ** 10
    assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), params))
    assert all(torch.equal(bits(optimizer.state[p]["accumulator"]), b)
               for p, b in zip(model.parameters(), accs))
    assert all(state["step"].item() == 1 for state in optimizer.state.values())
    assert optimizer.last_update_fraction == 0.0 and optimizer.nonfinite_skipped == 0

    _train(model, optimizer, inputs[2:], scaler=scaler, autocast_dtype=torch.float16)
    reference = tiny_model()
    reference_optimizer = CLASSP(reference.parameters(), backend=backend, **HYPER)
    _train(reference, reference_optimizer, inputs[:1])
    _train(reference, reference_optimizer, inputs[2:], autocast_dtype=torch.float16)
    _assert_same_run(model, optimizer, reference, reference_optimizer, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_takes_one_element_amp_scalars_of_any_shape(backend):
    """grad_scale and found_inf of shape (1, 1) step as their 0-dim values do, on every
    tensor of the list (a broadcast against the first param would fail after changing it)."""
    from classp_fused import classp_step_
    torch.manual_seed(3)
    made = [(torch.randn(5), torch.randn(5) * 4), (torch.randn(3, 2), torch.randn(3, 2) * 4)]
    results = []
    for shape in ((), (1, 1)):
        params = [p.clone() for p, _ in made]
        accs = [torch.zeros_like(p) for p in params]
        counts = classp_step_(params, [g for _, g in made], accs, lr=0.1, backend=backend,
                              grad_scale=torch.full(shape, 4.0),
                              found_inf=torch.zeros(shape))
        results.append((counts, params, accs))
    (counts, params, accs), (counts2, params2, accs2) = results
    assert torch.equal(counts, counts2)
    assert all(torch.equal(a, b) for a, b in zip(params + accs, params2 + accs2))
