"""On 2 gloo ranks: importance all-reduced across ranks equals a single process on all the
data; the penalty gradient and the state round trip work on FSDP2-sharded (DTensor)
parameters; consolidate on the sharded model, at two task boundaries with training between
them, equals a single process for every MAS and EWC variant (with a rank holding an empty
shard and a rank without data), also with CLASSP, the proximal step and a DCP round trip."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from classp_fused import CLASSP
from classp_fused.regularizers import EWC, MAS, Regularizer
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
    silent = MAS(model, per_sample=True)  # rank 1 has no data and still joins the all-reduce
    silent.consolidate(shard if rank == 0 else [])
    results["rank-without-data"] = silent.importance
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
    sharded_worker(rank, out_dir)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One launch of 2 gloo ranks for every test here; the folder of their results."""
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(worker, str(out), timeout_s=300)
    return out


def test_all_reduced_importance_equals_single_process(rank_results):
    ranks = [torch.load(rank_results / f"rank{r}.pt", weights_only=True)
             for r in range(WORLD_SIZE)]

    data, expected = make_batches(), {}
    for name, (method, kwargs) in CONFIGS.items():
        reg = method(make_model(), **kwargs)
        reg.consolidate(data)
        expected[name] = reg.importance
    expected["explicit-group"] = expected["mas-per-sample"]
    rank_0_only = MAS(make_model(), per_sample=True)
    rank_0_only.consolidate(data[:2])
    expected["rank-without-data"] = rank_0_only.importance
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


class LinearNet(nn.Module):
    """Only plain Linear layers: per-sample importance on shards takes the Linear form.
    ``twice`` applies the middle layer twice, which that form cannot handle."""

    def __init__(self, twice=False):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.mid, self.head = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)
        self.twice = twice
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.body(x))))
        if self.twice:
            h = torch.tanh(self.mid(h))
        return self.head(h)


MODELS = {"scaled": ScaledNet, "linear": LinearNet, "linear-twice": lambda: LinearNet(True)}


def sharded_cases():
    """(config, model) pairs: every variant on ScaledNet; the per-sample ones also on LinearNet
    (the Linear form), one also on the twice-applied LinearNet (its fallback)."""
    cases = {f"{name}@scaled": (name, "scaled") for name in SHARDED_CONFIGS}
    cases.update({f"{name}@linear": (name, "linear") for name in SHARDED_CONFIGS
                  if "per-sample" in name})
    cases["ewc-exact-per-sample-separate@linear-twice"] = ("ewc-exact-per-sample-separate",
                                                           "linear-twice")
    return cases


def task_data(task, rank):
    """Consolidation data: task 0 on both ranks (rank 1 with an empty batch too), task 1 on
    rank 0 alone (rank 1 has none)."""
    gen = torch.Generator().manual_seed(10 + task)
    sizes = [[(3, 2), (2, 0, 3)], [(2, 3), ()]][task]
    batches = [[(torch.randn(n, 6, generator=gen, dtype=DTYPE),
                 torch.randint(0, 3, (n,), generator=gen)) for n in s] for s in sizes]
    return batches[rank] if rank is not None else batches[0] + batches[1]


def train_inputs(rank):
    gen = torch.Generator().manual_seed(20)
    xs = [torch.randn(4, 6, generator=gen, dtype=DTYPE) for _ in range(WORLD_SIZE)]
    return xs[rank] if rank is not None else xs


def run_sequence(model, reg, rank, proximal=False, checkpoint=None):
    """Two task boundaries with two steps between them: SGD with the explicit penalty, or
    ``proximal`` CLASSP followed by the proximal step. ``rank`` None is the single process
    on every rank's data. ``checkpoint`` (sharded only): after the first boundary, save
    optimizer and regularizer with torch.distributed.checkpoint there and continue with a
    fresh regularizer loaded from it."""
    optimizer = (CLASSP(model.parameters(), lr=0.05, threshold=1e-3, backend="torch")
                 if proximal else torch.optim.SGD(model.parameters(), lr=0.05))
    reg.consolidate(task_data(0, rank))
    if checkpoint is not None:
        reg = round_trip(model, optimizer, reg, checkpoint)
    for _ in range(2):
        optimizer.zero_grad()
        xs = train_inputs(rank)
        loss = (model(xs).pow(2).mean() if rank is not None
                else sum(model(x).pow(2).mean() for x in xs) / WORLD_SIZE)
        loss.backward()
        if not proximal:
            reg.add_penalty_grad_()
        optimizer.step()
        if proximal:
            reg.proximal_step_(optimizer)
    reg.consolidate(task_data(1, rank))
    return reg, optimizer


def round_trip(model, optimizer, reg, checkpoint):
    """Save model, optimizer and ``reg`` with DCP, load into a fresh regularizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "reg": reg.state_dict()},
             checkpoint_id=checkpoint)
    restored = type(reg)(model, lam=reg.lam)
    state = {"reg": restored.empty_state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    restored.load_state_dict(state["reg"])
    assert restored.tasks_seen == reg.tasks_seen == 1
    for key in ("importance", "anchor"):
        for name, t in getattr(restored, key).items():
            assert torch.equal(t.full_tensor(), getattr(reg, key)[name].full_tensor())
    return restored


def sharded_worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results, linear_form = {}, []
    original = Regularizer._sharded_linear_form

    def spy(self, *args):
        linear_form.append(original(self, *args))
        return linear_form[-1]

    Regularizer._sharded_linear_form = spy
    for case, (name, model_name) in sharded_cases().items():
        method, kwargs = SHARDED_CONFIGS[name]
        model = MODELS[model_name]()
        for module in model.children():
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if model_name == "scaled":
            assert model.scale.to_local().numel() == (1 if rank == 0 else 0)
        linear_form.clear()
        reg, optimizer = run_sequence(model, method(model, lam=1.5, **kwargs), rank)
        results[case] = sequence_results(reg, optimizer, full=lambda t: t.full_tensor())
        # Two lock-step batches per boundary; the fallback is decided on the first.
        used = {"scaled": [], "linear": [True] * 4, "linear-twice": [False] * 2}[model_name]
        if "per-sample" in name:
            assert linear_form == used, (case, linear_form)
    Regularizer._sharded_linear_form = original
    model = ScaledNet()
    fully_shard(model, mesh=mesh)
    try:
        MAS(model, local=True).consolidate(task_data(0, rank))
    except ValueError as error:
        assert "local=False" in str(error)
    else:
        raise AssertionError("MAS(local=True) consolidated a sharded model")
    # CLASSP with the proximal step on shards, a DCP round trip after the first boundary.
    model = ScaledNet()
    for module in (model.body, model.head, model):
        fully_shard(module, mesh=mesh)
    reg, optimizer = run_sequence(model, EWC(model, lam=1.5), rank, proximal=True,
                                  checkpoint=f"{out_dir}/checkpoint")
    results["classp-proximal"] = sequence_results(reg, optimizer, full=lambda t: t.full_tensor())
    torch.save(results, f"{out_dir}/sharded{rank}.pt")


def sequence_results(reg, optimizer, full):
    """Importance, anchor, whole penalty and stiffness bounds after a sequence."""
    penalty = reg.penalty().detach()
    if dist.is_initialized():
        dist.all_reduce(penalty)
    bounds = reg.stability_bounds(optimizer)
    return {**{f"importance.{n}": full(t) for n, t in reg.importance.items()},
            **{f"anchor.{n}": full(t) for n, t in reg.anchor.items()},
            **{f"stiffness.{n}": torch.tensor(b.stiffness) for n, b in bounds.items()},
            "penalty": penalty}


def test_consolidate_on_fsdp2_shards_equals_single_process_for_every_variant(rank_results):
    expected = {}
    for case, (name, model_name) in sharded_cases().items():
        method, kwargs = SHARDED_CONFIGS[name]
        model = MODELS[model_name]()
        reg, optimizer = run_sequence(model, method(model, lam=1.5, **kwargs), None)
        expected[case] = sequence_results(reg, optimizer, full=lambda t: t)
    model = ScaledNet()
    reg, optimizer = run_sequence(model, EWC(model, lam=1.5), None, proximal=True)
    expected["classp-proximal"] = sequence_results(reg, optimizer, full=lambda t: t)
    for rank in range(WORLD_SIZE):
        results = torch.load(rank_results / f"sharded{rank}.pt", weights_only=True)
        assert results.keys() == expected.keys()
        for name, tensors in expected.items():
            assert results[name].keys() == tensors.keys()
            for key, t in tensors.items():
                torch.testing.assert_close(results[name][key], t, rtol=1e-5, atol=1e-12,
                                           msg=f"rank {rank}, {name}, {key}")
