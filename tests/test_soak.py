"""Soak: 10,000 steps with NaN/Inf injected into 1% of the gradient elements never let a
non-finite value into a parameter or accumulator, and every injected element is counted."""
import pytest
import torch
from torch import nn

from classp_fused import CLASSP
from helpers import CPU_BACKENDS

STEPS = 10_000
INJECTED_FRACTION = 0.01
FASTEST_CPU_BACKEND = "cpp" if "cpp" in CPU_BACKENDS else "foreach"


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from threads, and on a loaded machine thread hand-offs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_ten_thousand_steps_with_injected_nonfinite_gradients(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    optimizer = CLASSP(model.parameters(), lr=0.01, threshold=1e-10, power=2.0,
                       backend=FASTEST_CPU_BACKEND)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, 16, generator=generator)
    targets = torch.randn(64, 8, 4, generator=generator)
    bad_values = torch.tensor([float("nan"), float("inf"), -float("inf")])
    injected = torch.zeros((), dtype=torch.int64)
    finite = torch.ones((), dtype=torch.bool)
    first_loss = None

    for step in range(STEPS):
        optimizer.zero_grad()
        loss = (model(inputs[step % 64]) - targets[step % 64]).pow(2).mean()
        loss.backward()
        first_loss = loss.item() if first_loss is None else first_loss
        with torch.no_grad():
            for p in params:
                hit = torch.rand(p.shape, generator=generator) < INJECTED_FRACTION
                choice = torch.randint(0, 3, p.shape, generator=generator)
                p.grad.copy_(torch.where(hit, bad_values[choice], p.grad))
                injected += hit.sum()
        optimizer.step()
        for p in params:
            finite &= torch.isfinite(p).all()
            finite &= torch.isfinite(optimizer.state[p]["accumulator"]).all()

    assert bool(finite)
    expected_injected = INJECTED_FRACTION * STEPS * sum(p.numel() for p in params)
    assert abs(int(injected) - expected_injected) < 0.05 * expected_injected
    assert optimizer.nonfinite_skipped == int(injected)
    assert all(state["step"].item() == STEPS for state in optimizer.state.values())
    assert 0.9 < optimizer.last_update_fraction < 1.0
    with torch.no_grad():
        final_loss = (model(inputs) - targets).pow(2).mean().item()
    assert final_loss < first_loss  # the finite gradient elements kept training the model
