"""Penalty cases with importances in every importance format (``state_formats``: the param's
dtype, bfloat16, 8-bit codes with block scales) for the GPU kernels' tests, and their comparison
with the reference backend ("torch"): counts identical at every step, accumulators, their
scales and the gradient-free state bit for bit, params bit for bit or to a tolerance."""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from classp_fused import state_formats
from classp_fused.backends import reference_backend
from classp_fused.backends.step_spec import CompressedState, Penalty, step_spec
from compressed_cases import (PARAM_TOLERANCE, accumulator_values, copies, make_grads,
                              step_keys, stored)
from helpers import bits, random_like

HYPER = dict(lr=0.05, threshold=0.01, eps=1e-5, power=2.0, apply_scaling=True)
STEPS = 2
TOLERANCE = {**PARAM_TOLERANCE, torch.float64: dict(rtol=1e-12, atol=1e-12)}
PENALTY_SCALE = 0.3  # 2 * 0.3 is not a float32: the factor is rounded as the reference rounds it


@dataclass(frozen=True)
class Member:
    """One stepped tensor: its shape and param dtype, the format of its importance (None: the
    penalty does not cover it), of its accumulator, and whether the param is a column-major
    view (its importance and accumulator stay row-major)."""

    shape: tuple
    dtype: torch.dtype = torch.float32
    importance: Optional[str] = "8bit"
    acc: str = "fp32"
    transposed: bool = False


def importance_dtype(fmt: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of an importance of a ``dtype`` param in format ``fmt`` at any size (unlike
    ``state_formats.importance_dtype``, which keeps small tensors in the param's dtype)."""
    if fmt == "8bit":
        return torch.uint8
    if fmt == "bf16" and dtype in (torch.float32, torch.float16):
        return torch.bfloat16
    return dtype


def importance_values(shape, generator) -> torch.Tensor:
    """Positive float32 values spread over 12 decades (1e-9 to 1e3), every fifth one zero."""
    numel = torch.Size(shape).numel()
    exponents = torch.rand(numel, generator=generator, dtype=torch.float64) * 12 - 9
    values = torch.pow(10.0, exponents).to(torch.float32)
    values[::5] = 0.0
    return values.view(shape)


@dataclass
class Case:
    """A step's tensors on the CPU (params, accumulators and their 8-bit scales, importances,
    their 8-bit scales, anchors; None where absent) and the penalty's form."""

    members: list
    form: str
    params: list
    accs: list
    acc_scales: list
    importances: list
    importance_scales: list
    anchors: list

    def on(self, device) -> "Case":
        """Copies of the case's tensors on ``device``, in the same layouts."""
        return Case(self.members, self.form, *(copies(ts, device) for ts in (
            self.params, self.accs, self.acc_scales, self.importances, self.importance_scales,
            self.anchors)))

    def state(self) -> list:
        """Every tensor a step may change."""
        return [t for t in self.params + self.accs + self.acc_scales if t is not None]

    def grads(self, step: int) -> list:
        shapes = [m.shape for m in self.members]
        return make_grads(shapes, [m.dtype for m in self.members], seed=step)

    def spec(self, step: int, hyper=HYPER, scale=PENALTY_SCALE):
        """The ``StepSpec`` of step ``step``: its rounding keys (with compressed accumulators)."""
        device = self.params[0].device
        compressed = None
        if any(m.acc != "fp32" for m in self.members):
            compressed = CompressedState(self.acc_scales, step_keys(len(self.members),
                                                                    step).to(device),
                                         [0] * len(self.members))
        penalty = Penalty(self.form, scale, self.importances, self.anchors,
                          self.importance_scales)
        return step_spec(**hyper, penalty=penalty, compressed=compressed)


def make_case(members, form, seed=0) -> Case:
    """Fresh params, accumulators, importances (``encode_importance`` of
    ``importance_values``) and anchors (the params moved by normal noise of 0.1) of
    ``members``, penalty ``form``."""
    g = torch.Generator().manual_seed(seed)
    params, accs, acc_scales, importances, importance_scales, anchors = ([] for _ in range(6))
    for m in members:
        param = random_like(m.shape, m.dtype, g)
        acc, acc_scale = stored(accumulator_values(m.shape, g), m.acc, g)
        if m.dtype == torch.float64:
            acc = acc.double()
        params.append(param.t().contiguous().t() if m.transposed else param)
        accs.append(acc)
        acc_scales.append(acc_scale)
        if m.importance is None:
            importances.append(None)
            importance_scales.append(None)
            anchors.append(None)
            continue
        weight, scales = state_formats.encode_importance(
            importance_values(m.shape, g), importance_dtype(m.importance, m.dtype))
        importances.append(weight)
        importance_scales.append(scales)
        anchors.append((param.float() + random_like(m.shape, torch.float32, g, 0.1))
                       .to(m.dtype))
    return Case(list(members), form, params, accs, acc_scales, importances, importance_scales,
                anchors)


def off_alignment(case: Case) -> Case:
    """``case`` with its importances and their scales moved one element into fresh buffers:
    contiguous, not on 16 bytes."""
    def moved(t):
        if t is None:
            return None
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        buffer[1:].copy_(t.reshape(-1))
        return buffer[1:].view(t.shape)
    return Case(case.members, case.form, case.params, case.accs, case.acc_scales,
                [moved(t) for t in case.importances],
                [moved(t) for t in case.importance_scales], case.anchors)


def run(step, case: Case, steps=STEPS, hyper=HYPER, context=contextlib.nullcontext):
    """``steps`` steps of ``step(params, grads, accs, spec)`` on ``case`` (in place, inside
    ``context()``); returns each step's counts on the CPU."""
    counts = []
    device = case.params[0].device
    for count in range(steps):
        grads = copies(case.grads(count), device)
        with context():
            counts.append(step(case.params, grads, case.accs, case.spec(count, hyper)).cpu())
    return counts


def assert_matches_reference(step, device, members, form, steps=STEPS, hyper=HYPER,
                             exact_params=True, context=contextlib.nullcontext, seed=0,
                             layout=lambda case: case) -> Case:
    """A backend's ``step`` on ``device`` against the reference on the CPU, both from
    ``make_case(members, form)`` (the backend's tensors in ``layout(case)``): counts at every
    step, then accumulators and scales bit for bit, params bit for bit (``exact_params``) or to
    their dtype's tolerance, importances, their scales and anchors unchanged. Returns the
    backend's case."""
    ref = make_case(members, form, seed)
    ours = layout(ref.on(device))
    before = [None if t is None else bits(t).clone()
              for t in ref.importances + ref.importance_scales + ref.anchors]
    expected = run(reference_backend.step, ref, steps, hyper)
    got = run(step, ours, steps, hyper, context)
    for count, (mine, theirs) in enumerate(zip(got, expected)):
        assert torch.equal(mine, theirs), (count, mine, theirs)
    for i, (mine, theirs) in enumerate(zip(ours.params, ref.params)):
        assert mine.stride() == theirs.stride()
        if exact_params:
            assert torch.equal(bits(mine.cpu()), bits(theirs)), (
                f"params[{i}] ({theirs.dtype}): "
                f"{int((bits(mine.cpu()) != bits(theirs)).sum())} elements differ")
        else:
            torch.testing.assert_close(mine.cpu(), theirs, **TOLERANCE[theirs.dtype])
    for name in ("accs", "acc_scales"):
        for i, (mine, theirs) in enumerate(zip(getattr(ours, name), getattr(ref, name))):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert torch.equal(bits(mine.cpu()), bits(theirs)), (
                    f"{name}[{i}] ({theirs.dtype}): "
                    f"{int((bits(mine.cpu()) != bits(theirs)).sum())} elements differ")
    after = ours.importances + ours.importance_scales + ours.anchors
    assert all(b is None or torch.equal(bits(t.cpu()), b) for t, b in zip(after, before))
    return ours


# Three tensors of odd sizes with importances in mixed formats, one without penalty, per
# param dtype: float32 and float16 params take all three formats, bfloat16 ones two.
def mixed_members(dtype, acc="fp32") -> list:
    formats = {torch.bfloat16: ["8bit", "param", "8bit"]}.get(dtype, ["8bit", "bf16", "param"])
    return [Member((4097,), dtype, formats[0], acc), Member((257,), dtype, formats[1], acc),
            Member((300,), dtype, None, acc), Member((5000,), dtype, formats[2], acc)]


# Compressed accumulators beside compressed importances: 8-bit codes of both in one block
# layout, bfloat16 of both, and their crossings.
COMPRESSED_MEMBERS = [Member((4097,), torch.float32, "8bit", "8bit"),
                      Member((5000,), torch.float32, "bf16", "bf16"),
                      Member((257,), torch.float32, "8bit", "bf16"),
                      Member((4500,), torch.float32, "bf16", "8bit"),
                      Member((600,), torch.float32, None, "8bit")]

# Column-major params (their importances, accumulators and anchors row-major): stepped through
# row-major copies, so an 8-bit importance's block scales still index its row-major elements.
TRANSPOSED_MEMBERS = [Member((70, 60), torch.float32, "8bit", transposed=True),
                      Member((33, 40), torch.float16, "bf16", transposed=True),
                      Member((300,), torch.float32, "8bit")]
