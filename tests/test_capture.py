"""CUDA graphs: ``CLASSP.step()`` captured once and replayed equals eager steps bit for bit, with
a float lr, an lr tensor on the device and GradScaler's grad_scale/found_inf; step counters and
telemetry follow the replays. The GPU tests are skipped without a GPU; the Triton backend's
handling of its work tables under capture (cached when built eagerly, built inside the graph and
not cached when first needed while capturing, never dropped once a graph read it) is checked on
the CPU through the interpreter.
"""
import pytest
import torch

from classp_fused import CLASSP, available_backends
from classp_fused.backends import triton as triton_backend
from classp_fused.backends.step_spec import step_spec
from helpers import bits

GPU_BACKENDS = [name for name in ("cuda", "triton")
                if torch.cuda.is_available() and name in available_backends("cuda")]
STEPS = 4


def make_model(device, dtype=torch.float32, seed=0):
    """Params of odd sizes and two dtypes, with fixed gradients (some masked, one non-finite)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate([(37, 5), (1000,), (3, 3, 3), (70_001,)]):
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device, dtype if i % 2 else
                                                                  torch.bfloat16))
        p.grad = (torch.randn(shape, generator=g) * 0.5).to(device, p.dtype)
        params.append(p)
    params[1].grad[7] = float("nan")
    return params


def state_of(optimizer, params):
    return ([bits(p.detach()) for p in params]
            + [bits(optimizer.state[p]["accumulator"]) for p in params]
            + [optimizer.state[p]["step"].clone() for p in params])


def capture(step):
    """One warm-up call on a side stream (as torch's CUDA-graph recipe does), then one call
    captured: the capture itself runs nothing, so the warm-up is the only step taken."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


needs_gpu = pytest.mark.skipif(not GPU_BACKENDS, reason="needs a GPU")


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lr", ["float", "tensor"])
def test_replayed_steps_equal_eager_steps(backend, lr):
    runs = []
    for captured in (False, True):
        params = make_model("cuda")
        lr_value = 0.05 if lr == "float" else torch.tensor(0.05, device="cuda")
        optimizer = CLASSP(params, lr=lr_value, threshold=0.01, backend=backend)
        if captured:
            graph = capture(optimizer.step)
            for _ in range(STEPS - 1):
                graph.replay()
        else:
            for _ in range(STEPS):
                optimizer.step()
        torch.cuda.synchronize()
        runs.append((state_of(optimizer, params), optimizer.last_step_counts,
                     optimizer.nonfinite_skipped))
    (eager, eager_counts, eager_skipped), (replayed, replayed_counts, replayed_skipped) = runs
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))
    assert eager[-1].item() == STEPS  # the step counters advanced with every replay
    assert all(torch.equal(a, b) for a, b in zip(eager_counts, replayed_counts))
    assert eager_skipped == replayed_skipped == STEPS


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_device_lr_changed_between_replays_takes_effect(backend):
    runs = []
    for captured in (False, True):
        params = make_model("cuda")
        lr = torch.tensor(0.05, device="cuda")
        optimizer = CLASSP(params, lr=lr, backend=backend)
        graph = capture(optimizer.step) if captured else optimizer.step()
        for value in (0.2, 0.0, 0.01):
            lr.fill_(value)
            graph.replay() if captured else optimizer.step()
        torch.cuda.synchronize()
        runs.append(state_of(optimizer, params))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_amp_scaling_under_replay(backend):
    """grad_scale and found_inf as GradScaler sets them; a replay with found_inf set changes
    and counts nothing, step counters included."""
    runs = []
    for captured in (False, True):
        params = make_model("cuda")
        for p in params:
            p.grad.mul_(1024)
        optimizer = CLASSP(params, lr=0.05, backend=backend)
        optimizer.grad_scale = torch.tensor(1024.0, device="cuda")
        optimizer.found_inf = torch.zeros((), device="cuda")
        graph = capture(optimizer.step) if captured else optimizer.step()
        before = state_of(optimizer, params)
        optimizer.found_inf.fill_(1.0)
        graph.replay() if captured else optimizer.step()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(before, state_of(optimizer, params)))
        assert all(int(c.sum()) == 0 for c in optimizer.last_step_counts)
        optimizer.found_inf.fill_(0.0)
        graph.replay() if captured else optimizer.step()
        torch.cuda.synchronize()
        runs.append(state_of(optimizer, params))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert runs[0][-1].item() == 2


@needs_gpu
def test_whole_step_capture_with_grad_scaler():
    """The common recipe: forward, scaled backward, scaler.step and update in one graph."""
    backend = GPU_BACKENDS[0]
    model = torch.nn.Linear(64, 8).cuda()
    optimizer = CLASSP(model.parameters(), lr=0.01, backend=backend)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    data = torch.randn(32, 64, device="cuda")

    def train_step():
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):
        train_step()
    graph = capture(train_step)
    weight = model.weight.detach().clone()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(model.weight, weight)
    assert optimizer.state[model.weight]["step"].item() == 2 + 1 + 3


@pytest.mark.skipif("triton" not in available_backends("cpu"),
                    reason="triton not installed or not interpreted")
def test_triton_work_tables_under_capture(monkeypatch):
    capturing = [False]
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: capturing[0])
    built = []
    chunk_table = triton_backend.chunk_table
    monkeypatch.setattr(triton_backend, "chunk_table", lambda *args: (
        built.append(args), chunk_table(*args))[1])
    monkeypatch.setattr(triton_backend, "_tables", type(triton_backend._tables)())
    monkeypatch.setattr(triton_backend, "_kept_tables", {})
    params = [make_model("cpu", seed=seed) for seed in range(3)]
    accs = [[torch.zeros_like(p, dtype=torch.float32) for p in ps] for ps in params]

    def step(i):
        triton_backend.step(params[i], [p.grad for p in params[i]], accs[i],
                            step_spec(0.01, 0.0, 1e-5, 1.0, True))

    capturing[0] = True
    step(0)  # first needed while capturing: built inside the "graph", not cached
    step(0)
    assert len(built) == 4 and not triton_backend._tables  # 2 dtype groups, twice
    capturing[0] = False
    step(0)
    step(0)  # built once eagerly, then cached
    assert len(built) == 6 and len(triton_backend._tables) == 2
    capturing[0] = True
    step(0)  # a graph reads the cached tables: kept for good
    assert len(built) == 6 and len(triton_backend._kept_tables) == 2
    capturing[0] = False
    monkeypatch.setattr(triton_backend, "CACHED_TABLES", 1)
    step(1)
    step(2)
    assert len(triton_backend._tables) == 1 and len(triton_backend._kept_tables) == 2
    step(0)
    assert len(built) == 10  # tensors 1 and 2 built theirs; 0's were kept
