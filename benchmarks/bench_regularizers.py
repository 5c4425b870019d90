"""Regularizer benchmarks (pytest-benchmark): per-sample MAS importance, the penalty gradient,
the proximal step, and EWC separate mode at 1, 5 and 20 tasks against the per-task form.

    pytest benchmarks/bench_regularizers.py --benchmark-columns=min,median,max,rounds

Model: MLP 784-1024-256-10 (1,068,810 parameters, float32) on the suite's ``--bench-device``.
Importance over 2,000 samples in batches of 250. State bytes go to each benchmark's
``extra_info``. Results and ratios are recorded in benchmarks/REGULARIZERS.md.
"""
import pytest
import torch
from torch import nn

from classp_fused.regularizers import EWC, MAS

SAMPLES, BATCH = 2000, 250


@pytest.fixture
def make_mlp(device):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
                             nn.Linear(256, 10)).to(device)
    return make


@pytest.fixture
def data(device):
    inputs = torch.randn(SAMPLES, 784, generator=torch.Generator().manual_seed(1))
    return list(inputs.to(device).split(BATCH))


def synced(fn, device):
    """``fn`` followed by a device synchronization, so GPU timings cover the work."""
    def run(*args):
        result = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result
    return run


def naive_per_sample_mas(model, batches):
    """Per-sample MAS importance with one forward and backward per sample."""
    model.eval()
    params = list(model.parameters())
    omega = [torch.zeros_like(p) for p in params]
    count = 0
    for x in batches:
        for x_k in x:
            grads = torch.autograd.grad(model(x_k[None]).pow(2).sum(), params)
            for o, g in zip(omega, grads):
                o.add_(g.abs())
            count += 1
    return [o / count for o in omega]


@pytest.mark.benchmark(group="mas-importance-2000-samples")
def test_mas_per_sample_vmap(benchmark, device, make_mlp, data):
    reg = MAS(make_mlp(), per_sample=True)
    benchmark.pedantic(synced(reg.consolidate, device), args=(data,), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="mas-importance-2000-samples")
def test_mas_per_sample_naive_loop(benchmark, device, make_mlp, data):
    benchmark.pedantic(synced(naive_per_sample_mas, device), args=(make_mlp(), data), rounds=1,
                       warmup_rounds=0)


@pytest.mark.benchmark(group="mas-importance-2000-samples")
def test_mas_batch_form(benchmark, device, make_mlp, data):
    reg = MAS(make_mlp())
    benchmark.pedantic(synced(reg.consolidate, device), args=(data,), rounds=3, warmup_rounds=1)


@pytest.fixture
def consolidated(make_mlp, data):
    model = make_mlp()
    reg = MAS(model, lam=1.0)
    reg.consolidate(data[:1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
            p.grad = torch.zeros_like(p)
    return reg


@pytest.mark.benchmark(group="penalty-gradient-1M-params")
def test_add_penalty_grad(benchmark, device, consolidated):
    benchmark(synced(consolidated.add_penalty_grad_, device))


@pytest.mark.benchmark(group="penalty-gradient-1M-params")
def test_autograd_of_penalty(benchmark, device, consolidated):
    benchmark(synced(lambda: consolidated.penalty().backward(), device))


@pytest.mark.benchmark(group="proximal-step-1M-params")
def test_proximal_step(benchmark, device, consolidated):
    benchmark(synced(lambda: consolidated.proximal_step_(lr=1e-3), device))


@pytest.mark.benchmark(group="proximal-step-1M-params")
def test_add_penalty_grad_peer(benchmark, device, consolidated):
    benchmark(synced(consolidated.add_penalty_grad_, device))


def ewc_after(tasks, make_mlp, data):
    """EWC separate after ``tasks`` task boundaries (one batch each, params moved between),
    keeping the per-task Fisher; plus the per-task anchors."""
    model = make_mlp()
    reg = EWC(model, lam=1.0, keep_task_importances=True)
    anchors = []
    for t in range(tasks):
        x = data[t % len(data)]
        reg.consolidate([(x, torch.arange(len(x), device=x.device) % 10)])
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
                p.grad = torch.zeros_like(p)
    return reg, anchors


@torch.no_grad()
def per_task_penalty_grad(params, tasks):
    """The per-task form: grad += lam * F_t * (theta - theta*_t), one multi-tensor pass per task."""
    for fisher, anchor in tasks:
        diffs = torch._foreach_sub(params, anchor)
        torch._foreach_mul_(diffs, fisher)
        torch._foreach_add_([p.grad for p in params], diffs)


@pytest.mark.parametrize("tasks", [1, 5, 20])
@pytest.mark.benchmark(group="ewc-separate-penalty-gradient")
def test_ewc_separate_constant_memory(benchmark, device, make_mlp, data, tasks):
    reg, _ = ewc_after(tasks, make_mlp, data)
    reg.task_importances = None  # only the constant-memory state
    benchmark.extra_info["state_bytes"] = reg.state_bytes()
    benchmark(synced(reg.add_penalty_grad_, device))


@pytest.mark.parametrize("tasks", [1, 5, 20])
@pytest.mark.benchmark(group="ewc-separate-penalty-gradient")
def test_ewc_separate_per_task_form(benchmark, device, make_mlp, data, tasks):
    reg, anchors = ewc_after(tasks, make_mlp, data)
    names = [n for n, _ in reg.model.named_parameters()]
    params = [p for _, p in reg.model.named_parameters()]
    per_task = [([f[n] for n in names], [a[n] for n in names])
                for f, a in zip(reg.task_importances, anchors)]
    benchmark.extra_info["state_bytes"] = sum(t.numel() * t.element_size()
                                              for f, a in per_task for t in f + a)
    benchmark(synced(lambda: per_task_penalty_grad(params, per_task), device))
