"""What one ``CLASSP.step()`` asks of the device: a fixed number of ops per param group whatever
the number of params, and on a GPU no synchronization with the host.

The op counts are taken on the CPU with a TorchDispatchMode, for every backend that runs there
(the Triton kernel through its interpreter); views are not counted, as they launch nothing.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from classp_fused import CLASSP, available_backends

CPU_BACKENDS = [name for name in ("cpp", "foreach", "triton")
                if name in available_backends("cpu")]


class OpCounter(TorchDispatchMode):
    """Counts the non-view ops dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def make_optimizer(backend, count, dtypes=(torch.float32,), device="cpu", **options):
    """An optimizer over ``count`` small params per dtype, one step taken (state created)."""
    params = []
    for dtype in dtypes:
        for i in range(count):
            p = torch.nn.Parameter(torch.randn(3 + i % 7, 5, device=device, dtype=dtype))
            p.grad = torch.randn_like(p)
            params.append(p)
    optimizer = CLASSP(params, backend=backend, **{"lr": 0.01, **options})
    optimizer.step()
    return optimizer


def ops_of_one_step(optimizer) -> collections.Counter:
    with OpCounter() as counter:
        optimizer.step()
    return counter.ops


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_per_step_do_not_grow_with_the_number_of_params(backend):
    counts = {n: ops_of_one_step(make_optimizer(backend, n)) for n in (1, 10, 200)}
    assert counts[1] == counts[10] == counts[200], counts
    assert sum(counts[200].values()) <= 40, counts[200]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_per_step_grow_with_param_groups_and_dtypes_only(backend):
    dtypes = (torch.float32, torch.bfloat16) if backend != "cpp" else (torch.float32,)
    few, many = (ops_of_one_step(make_optimizer(backend, n, dtypes)) for n in (2, 30))
    assert few == many

    one_group = make_optimizer(backend, 10)
    two_groups = make_optimizer(backend, 10)
    params = two_groups.param_groups[0]["params"]
    two_groups.param_groups[0]["params"] = params[:5]
    two_groups.add_param_group({"params": params[5:], "lr": 0.02})
    two_groups.step()
    one, two = sum(ops_of_one_step(one_group).values()), sum(ops_of_one_step(two_groups).values())
    assert one < two <= 2 * one


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_amp_step_ops_do_not_grow_with_the_number_of_params(backend):
    """With GradScaler's grad_scale and found_inf attributes set, as its step() sets them."""
    counts = []
    for n in (1, 30):
        optimizer = make_optimizer(backend, n)
        optimizer.grad_scale = torch.tensor(4.0)
        optimizer.found_inf = torch.tensor(0.0)
        counts.append(ops_of_one_step(optimizer))
    assert counts[0] == counts[1], counts


GPU_BACKENDS = [name for name in ("cuda", "triton", "foreach")
                if torch.cuda.is_available() and name in available_backends("cuda")]


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lr", ["float", "tensor"])
def test_a_gpu_step_never_synchronizes(backend, lr):
    """Steps after the first (which builds the work tables) under sync debug mode "error": any
    synchronizing call, a blocking copy from pageable host memory included, raises."""
    lrs = [0.01, 0.02] if lr == "float" else [torch.tensor(v, device="cuda") for v in (0.01, 0.02)]
    optimizer = make_optimizer(backend, 30, (torch.float32, torch.bfloat16), device="cuda",
                               lr=lrs[0])
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(torch.ones((), device="cuda"))  # the scaler's state lives on the GPU now
    found_inf = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
        optimizer.param_groups[0]["lr"] = lrs[1]
        optimizer.step()
        optimizer.grad_scale, optimizer.found_inf = scaler._scale, found_inf
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
