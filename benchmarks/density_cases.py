"""What the density benchmarks share: steps of 1e7 fp32 elements in one tensor whose gradients
select an exact fraction of the elements, in random or clustered positions, and the read-only
floor.

A gradient element is selected when g*g > ``THRESHOLD`` (= 1): unselected elements draw |g|
uniformly from [0, 0.9), selected ones from [1.5, 2.5), with random signs. Random masks pick the
selected elements uniformly; clustered masks pick whole rows of ``ROW`` elements (the tensor
seen as a 10,000 x 1,000 matrix), as a layer whose units all pass or fail. Imports torch only,
so a process can load a kernel library of its choice before it builds the cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUMEL = 10 ** 7
ROW = 1000
THRESHOLD = 1.0
LR = 1e-3
EPS = 1e-5
DENSITIES = (1.0, 0.5, 0.1, 0.01, 0.001, 0.0)
MASKS = ("random", "clustered")
FLOOR = "read-only floor"
LR_TENSOR = torch.tensor(LR, dtype=torch.float64)  # the op's lr argument


@dataclass(frozen=True)
class DensityCase:
    """A step whose gradient selects ``density`` of the elements, placed by ``mask``."""

    density: float
    mask: str

    @property
    def selected(self) -> int:
        """The number of elements the step updates."""
        return round(self.density * NUMEL)

    def __str__(self) -> str:
        if self.density in (0.0, 1.0):  # every mask is the same
            return "dense" if self.density else "none selected"
        return f"{self.mask} {self.density:.1%}"


def cases() -> list[DensityCase]:
    """Every (density, mask) pair, the dense and the empty selection once each."""
    plan = []
    for density in DENSITIES:
        masks = MASKS if 0.0 < density < 1.0 else MASKS[:1]
        plan += [DensityCase(density, mask) for mask in masks]
    return plan


def selected_positions(case: DensityCase, generator: torch.Generator) -> torch.Tensor:
    """The flat indices of the case's selected elements."""
    if case.mask == "random":
        return torch.randperm(NUMEL, generator=generator)[:case.selected]
    if case.mask != "clustered":
        raise ValueError(f"mask must be one of {MASKS}, got {case.mask!r}")
    if case.selected % ROW:
        raise ValueError(f"a clustered mask selects whole rows of {ROW} elements; density "
                         f"{case.density} selects {case.selected}")
    rows = torch.randperm(NUMEL // ROW, generator=generator)[:case.selected // ROW]
    return (rows[:, None] * ROW + torch.arange(ROW)).reshape(-1)


def gradient(case: DensityCase, generator: torch.Generator) -> torch.Tensor:
    """A gradient with exactly ``case.selected`` elements of g*g > THRESHOLD."""
    grad = torch.rand(NUMEL, generator=generator) * 1.8 - 0.9
    positions = selected_positions(case, generator)
    signs = torch.randint(0, 2, (positions.numel(),), generator=generator) * 2.0 - 1.0
    grad[positions] = (torch.rand(positions.numel(), generator=generator) + 1.5) * signs
    return grad


def state(case: DensityCase, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh (param, grad, accumulator) of the case, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(NUMEL, generator=generator)
    acc = torch.rand(NUMEL, generator=generator)
    return param, gradient(case, generator), acc


def op_step(param: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """One step through ``torch.ops.classp_fused.classp_step_``, as the cpp backend calls it
    (power 1, no penalty); returns the (1, 2) counts of updated and non-finite elements."""
    op = torch.ops.classp_fused.classp_step_
    # builds of earlier versions (baselines) lack some of the trailing arguments
    names = {argument.name for argument in op.default._schema.arguments}
    optional = dict(importance_scales=[], acc_scales=[], rounding_keys=None, index_offsets=[])
    return op([param], [grad], [acc], LR_TENSOR, THRESHOLD, EPS, 1.0, True, None, None, [], [],
              "none", 0.0, relative_threshold=0.0, grad_sq_means=[],
              **{name: value for name, value in optional.items() if name in names})


def read_floor(param: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor) -> None:
    """Reads what a step reads (param, grad, accumulator) and writes nothing."""
    for tensor in (param, grad, acc):
        torch.sum(tensor)
