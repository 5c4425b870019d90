"""Interleaved timing of the regularizer passes against their peers, for benchmarks/REGULARIZERS.md.

    .venv/bin/python benchmarks/regularizers_interleaved.py [--rounds 30] [--repeats 3]

On a shared machine a suite that times one method after another sees the load change between
them; here each round times every candidate once, in turn, and the ratios are taken per round.
Prints, per comparison, the median time of each candidate and the median, min and max over
rounds of the ratio to the named peer, once per repeat. Model: MLP 784-1024-256-10 (1,068,810
float32 parameters), 2 CPU threads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from classp_fused.regularizers import EWC, MAS


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def moved_(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
            p.grad = torch.zeros_like(p)


def ewc_after(tasks: int) -> tuple[EWC, list[tuple[list, list]]]:
    """EWC separate after ``tasks`` boundaries (250 random samples each), with the per-task
    (Fisher, anchor) lists of the per-task form."""
    model = mlp()
    reg = EWC(model, lam=1.0, keep_task_importances=True)
    anchors = []
    for t in range(tasks):
        x = torch.randn(250, 784, generator=torch.Generator().manual_seed(t))
        reg.consolidate([(x, torch.arange(250) % 10)])
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        moved_(model)
    names = [n for n, _ in model.named_parameters()]
    per_task = [([f[n] for n in names], [a[n] for n in names])
                for f, a in zip(reg.task_importances, anchors)]
    reg.task_importances = None
    return reg, per_task


@torch.no_grad()
def per_task_penalty_grad(params: list, per_task: list) -> None:
    """grad += lam * F_t * (theta - theta*_t), one multi-tensor pass per task."""
    for fisher, anchor in per_task:
        diffs = torch._foreach_sub(params, anchor)
        torch._foreach_mul_(diffs, fisher)
        torch._foreach_add_([p.grad for p in params], diffs)


def interleaved(candidates: dict, peer: str, rounds: int) -> None:
    """Time every candidate once per round, in turn; print medians and ratios to ``peer``."""
    times = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        ratios = [t / p for t, p in zip(samples, times[peer])]
        print(f"  {name:42s} median {statistics.median(samples) * 1e3:8.3f} ms   "
              f"vs {peer}: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = mlp()
    mas = MAS(model, lam=1.0)
    mas.consolidate([torch.randn(250, 784, generator=torch.Generator().manual_seed(1))])
    moved_(model)
    passes = {"add_penalty_grad_": mas.add_penalty_grad_,
              "proximal_step_(lr=1e-3)": lambda: mas.proximal_step_(lr=1e-3),
              "penalty().backward()": lambda: mas.penalty().backward()}

    ewc = {}
    for tasks in (1, 5, 20):
        reg, per_task = ewc_after(tasks)
        params = list(reg.model.parameters())
        per_task_bytes = sum(t.numel() * t.element_size() for f, a in per_task for t in f + a)
        print(f"EWC separate, {tasks} tasks: state_bytes {reg.state_bytes():,} (constant-memory)"
              f" vs {per_task_bytes:,} (per-task form)")
        ewc[tasks] = {f"constant-memory add_penalty_grad_ ({tasks} tasks)": reg.add_penalty_grad_,
                      f"per-task form ({tasks} tasks)":
                          lambda p=params, t=per_task: per_task_penalty_grad(p, t)}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}: penalty passes, MAS, 1.07 M params")
        interleaved(passes, "add_penalty_grad_", args.rounds)
        for tasks, candidates in ewc.items():
            print(f"repeat {repeat + 1}: EWC separate penalty gradient, {tasks} tasks")
            interleaved(candidates, f"per-task form ({tasks} tasks)", args.rounds)


if __name__ == "__main__":
    main()
