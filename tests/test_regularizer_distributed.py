"""Importance all-reduced across 2 gloo ranks equals a single process on all the data; the
penalty gradient and the state round trip work on FSDP2-sharded (DTensor) parameters."""
import copy

import torch
import torch.distributed as dist
from torch import nn

from classp_fused.regularizers import EWC, MAS
from distributed_helpers import WORLD_SIZE, requires_gloo, run_ranks

DTYPE = torch.float64
CONFIGS = {
    "mas-batch": (MAS, {}),
    "mas-per-sample": (MAS, {"per_sample": True}),
    "mas-local": (MAS, {"local": True}),
    "ewc-empirical-batch": (EWC, {"lam": 1.0}),
    "ewc-exact-per-sample": (EWC, {"lam": 1.0, "fisher": "exact", "per_sample": True}),
}

pytestmark = requires_gloo


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).to(DTYPE)


def make_batches():
    """Four batches; rank r of 2 gets batches 2r and 2r+1."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=gen, dtype=DTYPE),
             torch.randint(0, 3, (n,), generator=gen)) for n in (5, 3, 4, 6)]


def perturb_(model):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def fixed_loss(model):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    return model(x).pow(2).sum()


def worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, shard = make_model(), make_batches()[2 * rank:2 * rank + 2]
    results = {}
    for name, (method, kwargs) in CONFIGS.items():
        reg = method(model, **kwargs)
        reg.consolidate(shard)
        results[name] = reg.importance
    group = dist.new_group(list(range(WORLD_SIZE)))
    explicit = MAS(model, per_sample=True, process_group=group)
    explicit.consolidate(shard)
    results["explicit-group"] = explicit.importance

    # FSDP2: importance on the unsharded model, then shard it and add the penalty gradient.
    reg = MAS(model, lam=2.0)
    reg.consolidate(shard)
    full_state = copy.deepcopy(reg.state_dict())  # plain full tensors, as torch.save keeps
    perturb_(model)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    fixed_loss(model).backward()
    reg.add_penalty_grad_()
    results["fsdp-grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    penalty = reg.penalty().detach()
    dist.all_reduce(penalty)
    results["fsdp-penalty"] = {"penalty": penalty}

    # state_dict: DTensors laid out like the parameters; loads from full tensors and into
    # an unsharded model.
    params, saved = dict(model.named_parameters()), reg.state_dict()
    state = {key: saved[key] for key in ("importance", "anchor")}
    for tensors in state.values():
        for name, t in tensors.items():
            assert isinstance(t, DTensor) and t.device_mesh == mesh
            assert t.placements == params[name].placements
    results["fsdp-state"] = {f"{key}.{name}": t.full_tensor()
                             for key, tensors in state.items() for name, t in tensors.items()}
    from_full = MAS(model, lam=2.0)
    from_full.load_state_dict(full_state)
    assert torch.equal(from_full.penalty(), reg.penalty())
    unsharded = MAS(make_model(), lam=2.0)
    unsharded.load_state_dict(reg.state_dict())
    results["unsharded-state"] = {
        f"{key}.{name}": t for key in ("importance", "anchor")
        for name, t in unsharded.state_dict()[key].items()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_all_reduced_importance_equals_single_process(tmp_path):
    run_ranks(worker, str(tmp_path), timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    data, expected = make_batches(), {}
    for name, (method, kwargs) in CONFIGS.items():
        reg = method(make_model(), **kwargs)
        reg.consolidate(data)
        expected[name] = reg.importance
    expected["explicit-group"] = expected["mas-per-sample"]
    model = make_model()
    reg = MAS(model, lam=2.0)
    reg.consolidate(data)
    perturb_(model)
    (fixed_loss(model) + reg.penalty()).backward()  # autograd of the penalty as the oracle
    expected["fsdp-grads"] = {n: p.grad for n, p in model.named_parameters()}
    expected["fsdp-penalty"] = {"penalty": reg.penalty().detach()}
    expected["fsdp-state"] = expected["unsharded-state"] = {
        f"{key}.{name}": t for key in ("importance", "anchor")
        for name, t in reg.state_dict()[key].items()}

    for rank, results in enumerate(ranks):
        assert results.keys() == expected.keys()
        for name, tensors in expected.items():
            assert results[name].keys() == tensors.keys()
            for param, t in tensors.items():
                torch.testing.assert_close(results[name][param], t,
                                           msg=f"rank {rank}, {name}, {param}")


def sharded_configs():
    """Every variant that consolidates on shards: MAS batch/per-sample x sum/ema, EWC
    empirical/exact x batch/per-sample x separate/online."""
    configs = {}
    for form in ("batch", "per-sample"):
        per_sample = form == "per-sample"
        configs[f"mas-{form}-sum"] = (MAS, {"per_sample": per_sample})
        configs[f"mas-{form}-ema"] = (MAS, {"per_sample": per_sample, "accumulate": "ema",
                                            "alpha": 0.3})
        for fisher in ("empirical", "exact"):
            ewc = {"fisher": fisher, "per_sample": per_sample}
            configs[f"ewc-{fisher}-{form}-separate"] = (EWC, ewc)
            configs[f"ewc-{fisher}-{form}-online"] = (EWC, {**ewc, "mode": "online",
                                                             "gamma": 0.6})
    return configs


SHARDED_CONFIGS = sharded_configs()


class ScaledNet(nn.Module):
    """Two Linear layers and a one-element logit scale: on 2 ranks that param's shard on rank 1
    is empty."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 10), nn.Linear(10, 3)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(1))
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) * self.scale


def task_data(task, rank):
    """Consolidation data: task 0 on both ranks (rank 1 with an empty batch too), task 1 on
    rank 0 alone (rank 1 has none)."""
    gen = torch.Generator().manual_seed(10 + task)
    sizes = [[(5, 3), (4, 0, 6)], [(3, 2, 4), ()]][task]
    batches = [[(torch.randn(n, 6, generator=gen, dtype=DTYPE),
                 torch.randint(0, 3, (n,), generator=gen)) for n in s] for s in sizes]
    return batches[rank] if rank is not None else batches[0] + batches[1]


def train_inputs(rank):
    gen = torch.Generator().manual_seed(20)
    xs = [torch.randn(4, 6, generator=gen, dtype=DTYPE) for _ in range(WORLD_SIZE)]
    return xs[rank] if rank is not None else xs


def run_sequence(model, reg, rank):
    """Two task boundaries with two SGD steps (loss plus explicit penalty) between them;
    ``rank`` None is the single process on every rank's data."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reg.consolidate(task_data(0, rank))
    for _ in range(2):
        optimizer.zero_grad()
        xs = train_inputs(rank)
        loss = (model(xs).pow(2).mean() if rank is not None
                else sum(model(x).pow(2).mean() for x in xs) / WORLD_SIZE)
        loss.backward()
        reg.add_penalty_grad_()
        optimizer.step()
    reg.consolidate(task_data(1, rank))


def sharded_worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = {}
    for name, (method, kwargs) in SHARDED_CONFIGS.items():
        model = ScaledNet()
        for module in (model.body, model.head, model):
            fully_shard(module, mesh=mesh)
        assert model.scale.to_local().numel() == (1 if rank == 0 else 0)
        reg = method(model, lam=1.5, **kwargs)
        run_sequence(model, reg, rank)
        penalty = reg.penalty().detach()
        dist.all_reduce(penalty)
        results[name] = {**{f"importance.{n}": t.full_tensor() for n, t in reg.importance.items()},
                         **{f"anchor.{n}": t.full_tensor() for n, t in reg.anchor.items()},
                         "penalty": penalty}
    model = ScaledNet()
    fully_shard(model, mesh=mesh)
    try:
        MAS(model, local=True).consolidate(task_data(0, rank))
    except ValueError as error:
        assert "local=False" in str(error)
    else:
        raise AssertionError("MAS(local=True) consolidated a sharded model")
    torch.save(results, f"{out_dir}/sharded{rank}.pt")


def test_consolidate_on_fsdp2_shards_equals_single_process_for_every_variant(tmp_path):
    run_ranks(sharded_worker, str(tmp_path), timeout_s=300)
    expected = {}
    for name, (method, kwargs) in SHARDED_CONFIGS.items():
        model = ScaledNet()
        reg = method(model, lam=1.5, **kwargs)
        run_sequence(model, reg, None)
        expected[name] = {**{f"importance.{n}": t for n, t in reg.importance.items()},
                          **{f"anchor.{n}": t for n, t in reg.anchor.items()},
                          "penalty": reg.penalty().detach()}
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"sharded{rank}.pt", weights_only=True)
        assert results.keys() == expected.keys()
        for name, tensors in expected.items():
            assert results[name].keys() == tensors.keys()
            for key, t in tensors.items():
                torch.testing.assert_close(results[name][key], t, rtol=1e-5, atol=1e-12,
                                           msg=f"rank {rank}, {name}, {key}")
