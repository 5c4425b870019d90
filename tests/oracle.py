"""An oracle of the CLASSP step written from the spec alone: a scalar loop over Python floats.

Per element (SPEC section 1): ``g = grad / grad_scale``; the element is updated iff ``g`` is
finite and ``g*g > threshold``; then ``A += |g|**power`` and ``param -= lr * g / (eps +
A)**(1/power)`` (``lr * g`` without scaling; for powers other than 1 and 2 the spec's
``g * (eps + A)**(-1/power)``); elsewhere param and accumulator keep their values. Found_inf
non-zero: nothing changes, nothing is counted.

The arithmetic is float64 (Python's float) for float64 params. For the other params the step
computes in float32: with ``arithmetic="float32"`` (their default) every intermediate, the
hyperparameters included, is rounded to float32 (overflow gives infinity, tiny values keep
their subnormals), and the new param is rounded once to its dtype. ``arithmetic="float64"``
computes any params without rounding, for checking how far a float32 step drifts from exact.
"""
from __future__ import annotations

import math
import struct

import torch

ARITHMETICS = ("float32", "float64")


def round_float32(x: float) -> float:
    """``x`` rounded to the nearest float32, ties to even; infinity beyond float32's range."""
    if not math.isfinite(x):
        return x
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # struct refuses what rounds to infinity; IEEE gives infinity
        return math.copysign(math.inf, x)


def round_float16(x: float) -> float:
    """``x`` rounded to the nearest float16, ties to even; infinity beyond float16's range."""
    if not math.isfinite(x):
        return x
    try:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def round_bfloat16(x: float) -> float:
    """float32 ``x`` (finite or not, not NaN) rounded to the nearest bfloat16, ties to even."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def _unrounded(x: float) -> float:
    return x


_WRITE_ROUNDING = {torch.float32: round_float32, torch.float16: round_float16,
                   torch.bfloat16: lambda x: round_bfloat16(round_float32(x)),
                   torch.float64: _unrounded}


def _pow(x: float, y: float) -> float:
    """``x ** y`` for ``x >= 0``, infinity where the result overflows a Python float."""
    try:
        return x ** y
    except OverflowError:
        return math.inf


def _step_element(param, grad, acc, lr, threshold, eps, power, apply_scaling, grad_scale,
                  r, write):
    """One element: ``(param, acc, updated, nonfinite)``; ``r`` rounds to the arithmetic."""
    g = r(grad) if grad_scale is None else r(grad / grad_scale)
    if not math.isfinite(g):
        return param, acc, False, True
    if not r(g * g) > threshold:
        return param, acc, False, False
    if power == 1:
        growth = abs(g)
    elif power == 2:
        growth = r(g * g)
    else:
        growth = r(_pow(abs(g), power))
    acc = r(acc + growth)
    if apply_scaling:
        denominator = r(eps + acc)
        if power == 1:
            step = r(g / denominator)
        elif power == 2:
            step = r(g / math.sqrt(denominator))
        else:
            step = r(g * r(_pow(denominator, -1.0 / power)))  # the spec's exp2(-log2(.)/p)
    else:
        step = g
    return write(r(param - r(lr * step))), acc, True, False


def classp_step(params, grads, accs, *, lr, threshold, eps, power, apply_scaling,
                grad_scale=None, found_inf=None, arithmetic=None):
    """One CLASSP step of the tensors, which stay as they are.

    Returns ``(params, accs, counts)``: new float64 tensors of the params' and accumulators'
    values and per tensor ``[updated, nonfinite]`` as a list of lists. ``lr``, ``grad_scale``
    and ``found_inf`` may be tensors or numbers.
    """
    if found_inf is not None and float(found_inf) != 0:
        return ([p.double().clone() for p in params], [a.double().clone() for a in accs],
                [[0, 0] for _ in params])
    new_params, new_accs, counts = [], [], []
    for param, grad, acc in zip(params, grads, accs):
        kind = arithmetic or ("float64" if param.dtype == torch.float64 else "float32")
        if kind not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {kind!r}")
        r = round_float32 if kind == "float32" else _unrounded
        write = _WRITE_ROUNDING[param.dtype] if kind == "float32" else _unrounded
        hyper = (r(float(lr)), r(float(threshold)), r(float(eps)), float(power),
                 bool(apply_scaling), None if grad_scale is None else r(float(grad_scale)))
        results = [_step_element(p, g, a, *hyper, r, write) for p, g, a in zip(
            param.reshape(-1).tolist(), grad.reshape(-1).tolist(), acc.reshape(-1).tolist())]
        new_params.append(torch.tensor([x[0] for x in results], dtype=torch.float64)
                          .reshape(param.shape))
        new_accs.append(torch.tensor([x[1] for x in results], dtype=torch.float64)
                        .reshape(acc.shape))
        counts.append([sum(x[2] for x in results), sum(x[3] for x in results)])
    return new_params, new_accs, counts
