"""Compressed-accumulator cases for the kernels' tests: fresh random params, gradients and
accumulators stored in their formats (``classp_fused.state_formats``), the rounding keys of each
step, and the comparison of the state a kernel leaves with the reference's: counts identical,
accumulator codes, scales and bfloat16 bits identical, params to a tolerance."""
import contextlib

import torch

from classp_fused import state_formats
from classp_fused.backends.step_spec import CompressedState, Penalty, step_spec
from classp_fused.reference import classp_step_ as reference_step_
from helpers import bits, random_like

FORMAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}
PARAM_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6),
                   torch.float16: dict(rtol=1e-3, atol=1e-3),
                   torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
SEED = 1234  # the rounding seed of the keys
HYPER = dict(lr=0.05, threshold=0.01, eps=1e-5, power=2.0, apply_scaling=True)
STEPS = 3


def accumulator_values(shape, generator) -> torch.Tensor:
    """Positive float32 values: per block of 256 a top between 2**-24 and 2**4 (a step's
    squared gradients raise the small ones: new scales), the block's values spread over 36
    binades below it (8-bit codes of every exponent, and below the 2**-31 range)."""
    numel = torch.Size(shape).numel()
    tops = torch.randint(-24, 5, (state_formats.num_blocks(numel),), generator=generator)
    below = torch.rand(numel, generator=generator) * 36
    exponents = tops.repeat_interleave(state_formats.BLOCK)[:numel] - below
    return (torch.exp2(exponents) * (0.5 + torch.rand(numel, generator=generator))).view(shape)


def stored(values: torch.Tensor, fmt: str, generator):
    """``values`` (float32) stored in format ``fmt``, rounded with random bits: the accumulator
    of their shape and its block scales (None but for "8bit")."""
    if fmt == "fp32":
        return values.clone(), None
    random = torch.randint(0, 2 ** 32, (values.numel(),), dtype=torch.int64, generator=generator)
    if fmt == "bf16":
        return state_formats.round_bf16(values.reshape(-1), random).view(values.shape), None
    codes, scales = state_formats.encode_blocks(values.reshape(-1), random)
    return codes.view(values.shape), scales


def _dtypes(dtype, n):
    return list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * n


def make_state(shapes, formats, dtype=torch.float32, seed=0):
    """Params of ``dtype`` (one, or one per shape) and accumulators in ``formats`` (one per
    shape; "fp32" in float64 for float64 params) with their scales."""
    g = torch.Generator().manual_seed(seed)
    params = [random_like(shape, d, g) for shape, d in zip(shapes, _dtypes(dtype, len(shapes)))]
    pairs = [stored(accumulator_values(shape, g), fmt, g) for shape, fmt in zip(shapes, formats)]
    accs = [acc.double() if p.dtype == torch.float64 else acc for p, (acc, _) in zip(params, pairs)]
    return params, accs, [scales for _, scales in pairs]


def make_grads(shapes, dtype=torch.float32, seed=0, scale=0.6):
    """Normal gradients (no exact zeros) of ``dtype`` (one, or one per shape) scaled by
    ``scale``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return [random_like(shape, d, g, scale=scale)
            for shape, d in zip(shapes, _dtypes(dtype, len(shapes)))]


def powers_of_four(shapes, step):
    """Gradients +-4**k, k in -3..1: |g|**1.5 = 8**k is exact both as torch.pow and as
    exp2(1.5 * log2|g|), so the generic power's accumulators can be compared bit for bit."""
    g = torch.Generator().manual_seed(500 + step)
    out = []
    for shape in shapes:
        k = torch.randint(-3, 2, shape, generator=g).to(torch.float64)
        sign = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
        out.append((sign * torch.pow(4.0, k)).to(torch.float32))
    return out


def step_keys(n: int, step: int) -> torch.Tensor:
    """The rounding keys of ``n`` tensors at ``step`` (one seed per tensor)."""
    count = torch.tensor(float(step))
    return torch.stack([state_formats.tensor_key(SEED + i, count) for i in range(n)])


def copies(tensors, device):
    """Copies of ``tensors`` on ``device`` (None stays None)."""
    return [None if t is None else t.to(device, copy=True) for t in tensors]


def compressed(scales, keys, offsets, device) -> CompressedState:
    return CompressedState(list(scales), keys.to(device), list(offsets))


def assert_same_state(mine, theirs, check_params=True):
    """``mine`` and ``theirs``: (params, accs, scales) lists. Accumulators and scales bit for
    bit, params to the tolerance of their dtype."""
    for p, q in zip(mine[0], theirs[0]):
        if check_params:
            torch.testing.assert_close(p.cpu(), q, **PARAM_TOLERANCE[q.dtype])
    for i, (a, b) in enumerate(zip(mine[1], theirs[1])):
        assert a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b)), (
            f"accs[{i}] ({b.dtype}): {int((bits(a.cpu()) != bits(b)).sum())} elements differ")
    for i, (s, t) in enumerate(zip(mine[2], theirs[2])):
        assert (s is None) == (t is None)
        if s is not None:
            assert torch.equal(bits(s.cpu()), bits(t)), f"scales of accs[{i}] differ"


def compare_steps(step, device, shapes, formats, hyper=HYPER, steps=STEPS, dtype=torch.float32,
                  offsets=None, grads=None, penalty=None, relative_threshold=0.0,
                  grad_scale=None, context=contextlib.nullcontext):
    """``steps`` steps of a backend's ``step(params, grads, accs, spec)`` on ``device`` (inside
    ``context()``) and of the reference on the CPU, from the same fresh state, with fresh
    gradients (``grads(step)``, or random) and rounding keys each step: counts compared at each
    step, the state (and gradient means) at the end. ``penalty``: (form, scale). Returns both
    states."""
    n = len(shapes)
    ref = make_state(shapes, formats, dtype)
    ours = tuple(copies(ts, device) for ts in ref)
    offsets = [0] * n if offsets is None else offsets
    ref_penalty = our_penalty = None
    if penalty is not None:
        g = torch.Generator().manual_seed(77)
        weights = [torch.rand(shape, generator=g).to(p.dtype) for shape, p in zip(shapes, ref[0])]
        anchors = [p + 0.1 for p in ref[0]]
        ref_penalty = Penalty(*penalty, weights, anchors)
        our_penalty = Penalty(*penalty, copies(weights, device), copies(anchors, device))
    ref_means = our_means = None
    if relative_threshold:
        ref_means = [torch.tensor(0.0, dtype=torch.float64 if p.dtype == torch.float64
                                  else torch.float32) for p in ref[0]]
        our_means = copies(ref_means, device)
    amp = {} if grad_scale is None else dict(grad_scale=grad_scale)
    for count in range(steps):
        step_grads = grads(count) if grads else make_grads(shapes, dtype, seed=count)
        keys = step_keys(n, count)
        expected = reference_step_(ref[0], step_grads, ref[1], **hyper, **amp,
                                   penalty=ref_penalty, relative_threshold=relative_threshold,
                                   grad_sq_means=ref_means,
                                   compressed=compressed(ref[2], keys, offsets, "cpu"))
        spec = step_spec(hyper["lr"], hyper["threshold"], hyper["eps"], hyper["power"],
                         hyper["apply_scaling"], *copies([grad_scale], device), None,
                         our_penalty, relative_threshold, our_means,
                         compressed(ours[2], keys, offsets, device))
        with context():
            counts = step(ours[0], copies(step_grads, device), ours[1], spec)
        assert torch.equal(counts.cpu(), expected), (count, counts, expected)
    assert_same_state(ours, ref)
    if relative_threshold:
        for mine, theirs in zip(our_means, ref_means):
            torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-5, atol=0)
    return ours, ref
