"""What the CPU and GPU step suites share: a case, its parameters and its traffic model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from classp_fused import reference

LR = 1e-3
EPS = 1e-5
MANY = 200
MASKING_THRESHOLD = 2.7  # g*g > 2.7 passes ~10% of standard-normal gradient elements
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One implementation on ``size`` elements in ``tensors`` tensors; CLASSP's hyperparameters
    and ``option``: ``""`` (the plain step), ``"relative"`` (relative threshold 0.5),
    ``"state-bf16"`` / ``"state-8bit"`` (compressed accumulators) or ``"mas-explicit"`` /
    ``"mas-proximal"`` (a MAS penalty attached, taken inside the step)."""

    impl: str
    size: int
    tensors: int
    dtype: str = "fp32"
    power: Optional[float] = None
    threshold: Optional[float] = None
    option: str = ""

    @property
    def layout(self) -> tuple:
        return self.size, self.tensors, self.dtype

    def __str__(self) -> str:
        hyper = "" if self.power is None else f"-p{self.power:g}-thr{self.threshold:g}"
        option = f"-{self.option}" if self.option else ""
        return f"{self.impl}-{self.size:.0e}-{self.tensors}t-{self.dtype}{hyper}{option}"


def bytes_per_element(case: Case) -> int:
    """Minimum traffic of one dense step: read param, grad and state, write param and state (and
    read an attached penalty's importance and anchor)."""
    param = DTYPES[case.dtype].itemsize
    state = {"classp": 4, "adagrad": param, "adam": 2 * param}[case.impl.split("/")[0]]
    state = {"state-bf16": 2, "state-8bit": 1}.get(case.option, state)
    penalty = 2 * param if case.option.startswith("mas-") else 0
    return 3 * param + 2 * state + penalty


def tensor_sizes(total: int, count: int) -> list[int]:
    """``count`` sizes summing to ``total``, log-spaced over three decades, in shuffled order."""
    weights = torch.logspace(0, 3, count, dtype=torch.float64)
    sizes = (weights / weights.sum() * total).floor().long().clamp_min(1)
    sizes[-1] += total - sizes.sum()
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    return sizes[order].tolist()


def make_params(case: Case, device: torch.device) -> list[torch.nn.Parameter]:
    """Parameters of the case's layout with standard-normal gradients populated."""
    generator = torch.Generator(device).manual_seed(0)
    params = []
    for n in tensor_sizes(case.size, case.tensors):
        p = torch.nn.Parameter(torch.randn(n, generator=generator, device=device,
                                           dtype=DTYPES[case.dtype]))
        p.grad = torch.randn(n, generator=generator, device=device, dtype=DTYPES[case.dtype])
        params.append(p)
    return params


@torch.no_grad()
def naive_classp_step(params, grads, accs, threshold: float, power: float):
    """The CLASSP update as a user writes it in PyTorch (the reference), for torch.compile."""
    return reference.classp_step_(params, grads, accs, lr=LR, threshold=threshold, eps=EPS,
                                  power=power, apply_scaling=True)
