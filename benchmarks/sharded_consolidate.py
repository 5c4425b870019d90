"""Cost of consolidate on an FSDP2-sharded model, 2 gloo ranks on CPU, for benchmarks/REGULARIZERS.md.

    .venv/bin/python benchmarks/sharded_consolidate.py [--samples 64] [--rounds 3]

Model: MLP 784-1024-256-10 (1,068,810 float32 parameters), each Linear and the root under
``fully_shard``; each rank consolidates on its own half of the samples (batches of 32). Prints,
per variant, the median over rounds of rank 0's wall time, and the same variant on the
unsharded model in one process on all the samples (1 thread) for reference.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from classp_fused.distributed import exit_rank, release_process_group
from classp_fused.regularizers import EWC, MAS

VARIANTS = {
    "MAS batch": (MAS, {}),
    "MAS per-sample": (MAS, {"per_sample": True}),
    "EWC empirical batch": (EWC, {"lam": 1.0}),
    "EWC empirical per-sample": (EWC, {"lam": 1.0, "per_sample": True}),
    "EWC exact batch": (EWC, {"lam": 1.0, "fisher": "exact"}),
    "EWC exact per-sample": (EWC, {"lam": 1.0, "fisher": "exact", "per_sample": True}),
}
BATCH = 32


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def data(samples: int, rank: int | None, world: int = 2) -> list:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 784, generator=gen), torch.randint(0, 10, (samples,), generator=gen)
    if rank is not None:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    return list(zip(x.split(BATCH), y.split(BATCH)))


def timed(reg, batches, rounds: int) -> float:
    reg.consolidate(batches)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        reg.consolidate(batches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(rank: int, port: int, samples: int, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        time_sharded(rank, samples, rounds)
    except BaseException:
        release_process_group()
        raise
    exit_rank(0)  # the models and mesh of time_sharded are garbage now: nothing holds the group


def time_sharded(rank: int, samples: int, rounds: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for name, (method, kwargs) in VARIANTS.items():
        model = mlp()
        for module in [*model[::2], model]:
            fully_shard(module, mesh=mesh)
        seconds = timed(method(model, **kwargs), data(samples, rank), rounds)
        if rank == 0:
            print(f"  {name:26s} sharded, 2 ranks: {seconds:8.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.samples} samples, batches of {BATCH}, load average {os.getloadavg()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(port, args.samples, args.rounds), nprocs=2,
                       start_method="spawn")
    torch.set_num_threads(1)
    for name, (method, kwargs) in VARIANTS.items():
        seconds = timed(method(mlp(), **kwargs), data(args.samples, None), args.rounds)
        print(f"  {name:26s} unsharded, 1 process: {seconds:8.3f} s")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
