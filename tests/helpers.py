"""Shared test data and models: fresh random tensors (with or without exact zeros, in several
memory layouts), bitwise comparison."""
import torch
from torch import nn

import classp_fused
import oracle
from benchmarks.memory import peak_extra_bytes  # noqa: F401 (the tests' memory bound)
from classp_fused.regularizers import Regularizer

CPU_BACKENDS = classp_fused.available_backends("cpu")
# A backend's distance from the scalar oracle, relative: a few roundings of the param dtype
# (float32 arithmetic for the three smaller ones; rsqrt, exp2 and log2 may be ulps off).
ORACLE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10,
               torch.float64: 1e-13}


def random_like(shape, dtype=torch.float32, generator=None, scale=1.0):
    """Normal random values scaled by ``scale``, with no exact zeros."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x.to(dtype)


def laid_out(shape, dtype, generator, layout, scale=1.0):
    """Random values of ``shape`` as a contiguous tensor, a view one element into its storage,
    a transposed view or every other column of a wider tensor."""
    if layout == "transposed":
        return random_like(shape[::-1], dtype, generator, scale).t()
    if layout == "strided":
        return random_like((shape[0], 2 * shape[1]), dtype, generator, scale)[:, ::2]
    if layout == "offset":
        return random_like(torch.Size(shape).numel() + 1, dtype, generator, scale)[1:].view(shape)
    return random_like(shape, dtype, generator, scale)


def random_with_zeros(shape, dtype=torch.float32, generator=None, scale=1.0):
    """Normal random values scaled by ``scale`` with every third element an exact zero,
    alternately +0.0 and -0.0: gradients a step must not apply."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator).mul(scale).to(dtype)
    flat = x.view(-1)
    flat[0::6], flat[3::6] = 0.0, -0.0
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of ``t``, for bit-identity checks that also hold for NaN and -0.0."""
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_dtype)


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).to(dtype)


def train_steps(model, optimizer, steps=5, seed=1, scheduler=None):
    """Run ``steps`` steps of a squared-output loss on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g).to(dtype)
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


class MixedModel(nn.Module):
    """Conv2d, a Linear on 4-D input, a single-use Linear, a Linear called twice and a Linear
    whose weight is also used outside its call: every route of per-sample importance."""

    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.rows = nn.Linear(3, 3)
        self.mid = nn.Linear(18, 10)
        self.shared = nn.Linear(10, 10)
        self.head = nn.Linear(10, classes)

    def forward(self, x):
        h = torch.tanh(self.rows(torch.tanh(self.conv(x)))).flatten(1)
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.relu(self.mid(h))))))
        return self.head(h) + 0.1 * self.head.weight.sum()


def spy_linear_form(monkeypatch, enabled: bool) -> set:
    """Record the params the regularizers' Linear form handles; ``enabled=False`` makes it
    handle none, so every param goes through vmap."""
    original, handled = Regularizer._add_linear_per_sample, set()

    def spy(self, x, y, params, sums):
        names, outputs = original(self, x, y, params if enabled else {}, sums)
        handled.update(names)
        return names, outputs

    monkeypatch.setattr(Regularizer, "_add_linear_per_sample", spy)
    return handled


def run_steps(backend, device, params, grads, accs, hypers):
    """One step of ``backend`` per dict of ``hypers``, on copies of the tensors on ``device``;
    returns the new params and accumulators (on the CPU) and each step's counts as lists."""
    params, grads, accs = ([t.to(device, copy=True) for t in ts] for ts in (params, grads, accs))
    counts = []
    for hyper in hypers:
        hyper = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in hyper.items()}
        counts.append(classp_fused.classp_step_(params, grads, accs, backend=backend,
                                                **hyper).tolist())
    return [p.cpu() for p in params], [a.cpu() for a in accs], counts


def oracle_steps(params, grads, accs, hypers):
    """The scalar oracle's steps, one per dict of ``hypers``, in the params' own arithmetic;
    returns what ``run_steps`` returns."""
    counts = []
    for hyper in hypers:
        new_params, new_accs, step_counts = oracle.classp_step(params, grads, accs, **hyper)
        params = [n.to(p.dtype) for n, p in zip(new_params, params)]
        accs = [n.to(a.dtype) for n, a in zip(new_accs, accs)]
        counts.append(step_counts)
    return params, accs, counts


def assert_backend_matches_oracle(backend, device, params, grads, accs, hypers, scale=1.0):
    """``backend``'s counts equal the oracle's and its values lie within ``ORACLE_RTOL`` of it
    (relative, and absolute for values of magnitude ``scale``, where a difference cancels);
    returns the backend's results, as ``run_steps``."""
    mine = run_steps(backend, device, params, grads, accs, hypers)
    expected = oracle_steps(params, grads, accs, hypers)
    assert mine[2] == expected[2]
    for ours, theirs in zip(mine[0] + mine[1], expected[0] + expected[1]):
        rtol = ORACLE_RTOL[ours.dtype]
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=rtol * scale)
    return mine
