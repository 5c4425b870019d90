"""normalize="mean"|"max": each task's importance divided by its mean (max) over all regularized
elements before it is merged, on one process and on FSDP2 shards; the setting travels with the
state."""
import pytest
import torch
from torch import nn

from classp_fused.regularizers import EWC, MAS
from distributed_helpers import WORLD_SIZE, requires_gloo, run_ranks

DTYPE = torch.float64
METHODS = {"mas": (MAS, {}), "mas-per-sample": (MAS, {"per_sample": True}),
           "ewc": (EWC, {"lam": 1.0}), "ewc-online": (EWC, {"lam": 1.0, "mode": "online",
                                                             "gamma": 0.5})}


class ScaledNet(nn.Module):
    """Two Linear layers and a one-element logit scale (its shard on rank 1 of 2 is empty)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 10), nn.Linear(10, 3)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(1))
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) * self.scale


def task_data(task, rank=None):
    """Two batches per rank; ``rank`` None: every rank's batches."""
    gen = torch.Generator().manual_seed(10 + task)
    batches = [(torch.randn(n, 6, generator=gen, dtype=DTYPE),
                torch.randint(0, 3, (n,), generator=gen)) for n in (3, 4, 5, 2)]
    return batches if rank is None else batches[2 * rank:2 * rank + 2]


def elements(importance):
    return torch.cat([t.flatten() for t in importance.values()])


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("normalize", ["mean", "max"])
def test_one_tasks_importance_is_the_raw_one_over_its_mean_or_max(name, normalize):
    method, kwargs = METHODS[name]
    raw = method(ScaledNet(), **kwargs)
    raw.consolidate(task_data(0))
    reg = method(ScaledNet(), normalize=normalize, **kwargs)
    reg.consolidate(task_data(0))
    values, raw_values = elements(reg.importance), elements(raw.importance)
    statistic = torch.mean if normalize == "mean" else torch.amax
    assert abs(float(statistic(values)) - 1) < 1e-12
    assert float(statistic(raw_values)) not in (0.0, 1.0)
    for n, t in raw.importance.items():
        torch.testing.assert_close(reg.importance[n], t / statistic(raw_values), rtol=1e-12,
                                   atol=0)


def test_each_task_is_normalized_before_the_merge():
    model = ScaledNet()
    mas = MAS(model, normalize="mean")
    ewc = EWC(model, lam=1.0, normalize="mean", keep_task_importances=True)
    for task in range(2):
        mas.consolidate(task_data(task))
        ewc.consolidate(task_data(task))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
    assert abs(float(elements(mas.importance).mean()) - 2) < 1e-12  # sum of two mean-1 tasks
    assert [round(float(elements(t).mean()), 12) for t in ewc.task_importances] == [1.0, 1.0]
    assert abs(float(elements(ewc.importance).mean()) - 2) < 1e-12


def test_frozen_parameters_are_not_part_of_the_mean_and_zero_stays_zero():
    model = ScaledNet()
    model.body.weight.requires_grad_(False)
    reg = MAS(model, normalize="mean")
    reg.consolidate(task_data(0))
    assert "body.weight" not in reg.importance
    assert abs(float(elements(reg.importance).mean()) - 1) < 1e-12
    silent = nn.Linear(4, 2).to(DTYPE)
    with torch.no_grad():
        silent.weight.zero_()
        silent.bias.zero_()
    zero = MAS(silent, normalize="max")  # the output is 0: so is every importance
    zero.consolidate([torch.randn(3, 4, dtype=DTYPE)])
    assert all(not t.any() for t in zero.importance.values())


def test_the_setting_is_checked_and_travels_with_the_state():
    with pytest.raises(ValueError, match=r"normalize must be one of \('none', 'mean', 'max'\)"):
        MAS(ScaledNet(), normalize="sum")
    reg = EWC(ScaledNet(), lam=1.0, normalize="max")
    reg.consolidate(task_data(0))
    state = reg.state_dict()
    assert state["normalize"] == "max"
    assert reg.empty_state_dict()["normalize"] == "max"
    restored = EWC(ScaledNet(), lam=1.0, normalize="max")
    restored.load_state_dict(state)
    assert all(torch.equal(restored.importance[n], t) for n, t in reg.importance.items())
    for normalize in ("none", "mean"):
        other = EWC(ScaledNet(), lam=1.0, normalize=normalize)
        with pytest.raises(ValueError, match="consolidated with normalize='max'"):
            other.load_state_dict(state)
        assert other.tasks_seen == 0 and not other.importance
    earlier = {k: v for k, v in state.items() if k != "normalize"}  # a state of a version before
    with pytest.raises(ValueError, match="consolidated with normalize='none'"):
        restored.load_state_dict(earlier)
    EWC(ScaledNet(), lam=1.0).load_state_dict(earlier)


def sharded_worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = {}
    for name, (method, kwargs) in METHODS.items():
        for normalize in ("mean", "max"):
            model = ScaledNet()
            for module in (model.body, model.head, model):
                fully_shard(module, mesh=mesh)
            assert model.scale.to_local().numel() == (1 if rank == 0 else 0)
            reg = method(model, normalize=normalize, **kwargs)
            reg.consolidate(task_data(0, rank))
            results[f"{name}-{normalize}"] = {n: t.full_tensor()
                                              for n, t in reg.importance.items()}
    torch.save(results, f"{out_dir}/normalized{rank}.pt")


@requires_gloo
def test_fsdp2_shards_normalize_by_the_statistic_over_all_ranks(tmp_path):
    run_ranks(sharded_worker, str(tmp_path), timeout_s=300)
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"normalized{rank}.pt", weights_only=True)
        for name, (method, kwargs) in METHODS.items():
            for normalize in ("mean", "max"):
                reg = method(ScaledNet(), normalize=normalize, **kwargs)
                reg.consolidate(task_data(0))
                got = results[f"{name}-{normalize}"]
                assert got.keys() == reg.importance.keys()
                for n, t in reg.importance.items():
                    torch.testing.assert_close(got[n], t, rtol=1e-9, atol=1e-15,
                                               msg=f"rank {rank}, {name}, {normalize}, {n}")
