"""The lam range of MAS and EWC on a harness stream, with and without importance normalisation.

For each lam: an optimizer (SGD or Adam) plus the regularizer attached to it (explicit or
proximal penalty) as in the harness, task-incremental, one seed. Prints, per run, the raw importance scale after task 1 (it does
not depend on lam: task 1 trains without a penalty), final average accuracy, own-task accuracy
of tasks 2..T (how well new tasks are still learned), forgetting (mean over tasks 1..T-1 of
accuracy right after training it minus at the end), drift (how far the weights task 1 made
important moved by the end: sum over elements of Omega_1 (theta - theta*_1)^2 with Omega_1
scaled to sum 1; as a fraction of the first lam's, which should be 0), the tasks after which
consolidate warned that the explicit step is unstable, and a divergence::

    .venv/bin/python benchmarks/lam_range.py --benchmark split-digits --method mas \
        --normalize none --lams 0,0.1,1,10,100 --max-per-task 400 --epochs 3
"""
from __future__ import annotations

import argparse
import time
import warnings
from statistics import fmean

import torch

from classp_fused.cl.benchmarks import BENCHMARKS, DEFAULT_DIRS
from classp_fused.cl.methods import EWC_DEFAULTS, MAS_DEFAULTS, SGD_LR, Method
from classp_fused.cl.models import build_model
from classp_fused.cl.train import (CONSOLIDATION_SAMPLES, Diverged, _batches, _logit_mask,
                                   evaluate, train_task)
from classp_fused.regularizers import EWC, MAS, StiffnessWarning


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def regularizer(method: str, model, lam: float, normalize: str, penalty: str):
    if method == "mas":
        return MAS(model, lam=lam, accumulate=MAS_DEFAULTS["accumulate"],
                   per_sample=MAS_DEFAULTS["per_sample"], normalize=normalize, penalty=penalty)
    return EWC(model, lam=lam, fisher=EWC_DEFAULTS["fisher"],
               per_sample=EWC_DEFAULTS["per_sample"], normalize=normalize, penalty=penalty)


def run(benchmark: str, method: str, lam: float, normalize: str, penalty: str,
        optimizer_name: str, lr: float, seed: int, max_per_task: int, epochs: int) -> dict:
    bench = BENCHMARKS[benchmark]
    stream = bench.stream(seed, DEFAULT_DIRS, max_per_task)
    torch.manual_seed(seed)
    model = build_model(bench.model, stream)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters(), lr=lr)
    reg = regularizer(method, model, lam, normalize, penalty)
    reg.attach(optimizer)
    runner = Method(method, optimizer, reg)
    generator = torch.Generator().manual_seed(seed)
    masks = [_logit_mask(t, stream.num_classes, "task", "cpu") for t in stream.tasks]
    rows, unstable, diverged, scale, first = [], [], None, None, None
    for index, task in enumerate(stream.tasks):
        try:
            train_task(model, runner, task, masks[index], epochs, bench.batch_size, generator,
                       "cpu", index)
        except Diverged as exc:
            diverged = exc.where
            break
        subset = torch.randperm(len(task.x_train), generator=generator)[:CONSOLIDATION_SAMPLES]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StiffnessWarning)
            reg.consolidate(list(_batches(task.x_train, task.y_train, bench.batch_size, subset)),
                            optimizer=optimizer)
        if any(issubclass(w.category, StiffnessWarning) for w in caught):
            unstable.append(index + 1)
        if index == 0:
            values = torch.cat([t.flatten() for t in reg.importance.values()])
            scale = {"sum": float(values.sum()), "mean": float(values.mean()),
                     "max": float(values.max()), "elements": values.numel()}
            first = {n: (t / values.sum(), reg.anchor[n].clone())
                     for n, t in reg.importance.items()}
        rows.append([evaluate(model, t, m, "cpu") for t, m in zip(stream.tasks, masks)])
    done = len(rows)
    params = dict(model.named_parameters())
    drift = None if first is None else float(sum(
        (w * (params[n].detach() - m).square()).sum() for n, (w, m) in first.items()))
    return {"scale": scale, "diverged": diverged, "unstable": unstable, "drift": drift,
            "acc": fmean(rows[-1]) if done == len(stream.tasks) else None,
            "own": fmean(rows[i][i] for i in range(1, done)) if done > 1 else None,
            "forgetting": fmean(rows[i][i] - rows[-1][i] for i in range(done - 1))
            if done == len(stream.tasks) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", choices=["split-digits", "synthetic-sentiment"],
                        required=True)
    parser.add_argument("--method", choices=["mas", "ewc"], required=True)
    parser.add_argument("--normalize", choices=["none", "mean", "max"], default="none")
    parser.add_argument("--lams", required=True, help="comma-separated")
    parser.add_argument("--penalty", choices=["explicit", "proximal"], default="explicit")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument("--lr", type=float, default=SGD_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-per-task", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {args.benchmark} {args.method} normalize={args.normalize} {args.penalty} "
          f"{args.optimizer} lr={args.lr} "
          f"seed={args.seed} max_per_task={args.max_per_task} epochs={args.epochs}")
    reference = None
    for lam in (float(v) for v in args.lams.split(",")):
        start = time.process_time()
        result = run(args.benchmark, args.method, lam, args.normalize, args.penalty,
                     args.optimizer, args.lr, args.seed, args.max_per_task, args.epochs)
        s = result["scale"]
        scale = "-" if s is None else (f"sum {s['sum']:.3g} mean {s['mean']:.3g} "
                                       f"max {s['max']:.3g} n {s['elements']}")
        show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        reference = result["drift"] if reference is None else reference
        drift = "-" if result["drift"] is None else f"{result['drift'] / reference:.3g}"
        print(f"lam {lam:g}: acc {show(result['acc'])} own {show(result['own'])} "
              f"forgetting {show(result['forgetting'])} drift {drift} "
              f"unstable after {result['unstable']} "
              f"diverged {result['diverged']} | task-1 importance {scale} | "
              f"{time.process_time() - start:.1f} s CPU", flush=True)


if __name__ == "__main__":
    main()
