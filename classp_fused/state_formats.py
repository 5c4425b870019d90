"""Compressed CLASSP accumulators: the formats, their stochastic rounding and its random bits.

This module defines them (SPEC section 4a, "Compressed state"); every backend reproduces it bit
for bit. An accumulator A is stored as

- ``"fp32"``: float32 (float64 for float64 params), exact;
- ``"bf16"``: bfloat16, rounded stochastically: the float32 value's bits plus 16 random bits,
  truncated to the upper 16 (rounds up with probability equal to the dropped fraction);
- ``"8bit"``: one uint8 code per element and one float32 scale ``s = 2**E`` per block of
  ``BLOCK`` consecutive elements (row-major order of the param's local tensor; the last block
  may be shorter). A code ``c = 8*e + m`` (``e`` in 0..31, ``m`` in 0..7) is worth ``s * q(c)``
  with ``q(c) = 2**(e - 32) * (1 + m/8)`` for ``e >= 1`` and ``q(c) = m * 2**-34`` for
  ``e = 0``: 31 binades below the block's top with 3 mantissa bits, then 8 even steps down to
  0. Both products are exact in float32, so decoding is the same everywhere. (Measured by
  ``benchmarks/state_tracking.py``: with 4 mantissa bits and 15 binades, 0.3-1.5% of the
  elements took steps more than 2x off the exact ones, against 0.00-0.04% with this one.)

Encoding a block (``encode_blocks``) takes its values ``x`` (float32, >= 0, at most
``SATURATION``): ``E`` is the smallest exponent with ``max(x) <= 15/16 * 2**E`` (the top code;
``E >= -115``, so that every code's value is a float32; a block of zeros gets ``s = 0``); each
``q = x / s`` (exact: a power of two) is rounded stochastically to the codes around it by
adding 20 random bits to its float32 bits
below the code's 3 mantissa bits (below ``2**-31`` to ``q + 2**-31``'s, then 8 less) and
truncating; a positive ``x`` never gets code 0 (it is raised to code 1, ``2**-34 * s``), so an
element once updated never reads back as zero. A value already on the grid keeps its value
whatever the bits.

The random bits of element ``i`` (its row-major index within the whole parameter, also on a
local shard) at a step are ``element_bits(tensor_key(seed, step), i)``: counter-based
(lowbias32 mixing), so every backend, thread split and sharding draws the same bits, and a
resumed run draws those of the run it continues. Only the elements of the ``"8bit"`` blocks
and ``"bf16"`` elements a step rewrites are rounded.

Tensors of fewer than ``MIN_COMPRESSED_NUMEL`` elements, and float64 params, keep exact
accumulators in every format (their state is small, and their steps cost more host time than
memory).

In a checkpoint of sharded state the block scales of 8-bit codes are given per element, as the
int8 exponent ``E`` of the element's block scale (``ZERO_EXPONENT`` for 0; bottom of the file,
used by ``classp_fused.sharded_codes``).
"""
from __future__ import annotations

import torch
from torch import Tensor

STATE_DTYPES = ("fp32", "bf16", "8bit")
BLOCK = 256
MIN_COMPRESSED_NUMEL = 4096
# The largest value an 8-bit code can hold: 15/16 * 2**127 (the top code at E = 127).
SATURATION = 15 / 16 * 2.0 ** 127

_MASK32 = 0xFFFFFFFF
_CODE_BIAS = (127 - 32) << 3  # float32 bits >> 20 of q(8*e + m) = (e + 95) << 3 | m
_LOW20 = (1 << 20) - 1
_LOW16 = (1 << 16) - 1


def compressed_dtype(param: Tensor, state_dtype: str) -> torch.dtype | None:
    """The accumulator dtype of ``param`` under ``state_dtype``: torch.bfloat16 or torch.uint8
    where it is compressed, None where it stays exact (float64, small, or ``"fp32"``)."""
    if (state_dtype == "fp32" or param.dtype == torch.float64
            or param.numel() < MIN_COMPRESSED_NUMEL):
        return None
    return torch.bfloat16 if state_dtype == "bf16" else torch.uint8


def num_blocks(numel: int) -> int:
    """The number of 8-bit blocks (scales) of a tensor of ``numel`` elements."""
    return -(-numel // BLOCK)


def mix32(x: Tensor) -> Tensor:
    """lowbias32 on uint32 values held in an int64 tensor (products wrap modulo 2**64, the low
    32 bits kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def tensor_key(seed: int, step: Tensor) -> Tensor:
    """The rounding key of a tensor at a step: ``mix32(seed ^ mix32(step))`` on the low 32 bits
    of ``seed`` and of the step count before the step (a float32 counter, exact to 2**24)."""
    step = step.to(torch.int64) & _MASK32
    return mix32(mix32(step) ^ (int(seed) & _MASK32))


def element_bits(key: Tensor, index: Tensor) -> Tensor:
    """32 random bits (as int64) per element index: ``mix32((i mod 2**32) ^ mix32(key + (i >>
    32)))``; for indices below 2**32 one mix per element after ``mix32(key)``."""
    high = mix32((key + (index >> 32)) & _MASK32)
    return mix32((index & _MASK32) ^ high)


def round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """float32 ``x`` (>= 0 or +inf) rounded stochastically to bfloat16 with ``bits``."""
    raw = x.to(torch.float32).view(torch.int32).to(torch.int64)
    rounded = (raw + (bits & _LOW16)) >> 16
    return (rounded << 16).to(torch.int32).view(torch.float32).to(torch.bfloat16)


def code_values(codes: Tensor) -> Tensor:
    """``q(c)`` of each uint8 code: its float32 value at scale 1."""
    c = codes.to(torch.int32)
    normal = ((c + _CODE_BIAS) << 20).view(torch.float32)
    return torch.where(c >= 8, normal, c.to(torch.float32) * 2.0 ** -34)


def decode(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 values of a flat uint8 ``codes`` tensor with its blocks' ``scales``."""
    return code_values(codes) * scales.repeat_interleave(BLOCK)[:codes.numel()]


def block_scales(x: Tensor) -> Tensor:
    """Per block of flat float32 ``x`` (>= 0, at most SATURATION): ``2**E`` with ``E`` the
    smallest exponent >= -115 such that the block's max <= 15/16 * 2**E; 0 for a zero block."""
    n = x.numel()
    padded = torch.zeros(num_blocks(n) * BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = x
    top = padded.view(-1, BLOCK).amax(dim=1)
    bits = top.clamp_min(2.0 ** -116).view(torch.int32)
    exponent = (bits >> 23) - 127 + 1 + ((bits & 0x7FFFFF) > 0x700000).to(torch.int32)
    scales = ((exponent + 127) << 23).view(torch.float32)
    return torch.where(top > 0, scales, 0.0)


def encode_blocks(x: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
    """Flat float32 ``x`` (>= 0, at most SATURATION) as ``(codes, scales)``, rounded
    stochastically with ``bits`` (one int64 of 32 random bits per element)."""
    x = x.to(torch.float32)
    scales = block_scales(x)
    s = scales.repeat_interleave(BLOCK)[:x.numel()]
    q = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0)  # exact: s is a power of two
    low = q < 2.0 ** -31
    shifted = torch.where(low, q + 2.0 ** -31, q).view(torch.int32).to(torch.int64)
    code = ((shifted + (bits & _LOW20)) >> 20) - _CODE_BIAS - torch.where(low, 8, 0)
    code = torch.where(x > 0, code.clamp_min(1), 0)
    return code.to(torch.uint8), scales


# Importance formats of the regularizers (fixed within a task, so rounded to nearest).
IMPORTANCE_FORMATS = ("param", "bf16", "8bit")
_HALF20 = 1 << 19  # round to nearest (ties up) in encode_blocks


def importance_dtype(param: Tensor, importance_format: str) -> torch.dtype:
    """The dtype an importance of ``param`` is stored in: the param's own under ``"param"``,
    for float64 params and for tensors under ``MIN_COMPRESSED_NUMEL`` elements; else
    bfloat16 (``"bf16"``, float32 params; float16 and bfloat16 params keep theirs) or uint8
    codes of the 8-bit format (``"8bit"``)."""
    if (importance_format == "param" or param.dtype == torch.float64
            or param.numel() < MIN_COMPRESSED_NUMEL):
        return param.dtype
    if importance_format == "bf16":
        return torch.bfloat16 if param.dtype == torch.float32 else param.dtype
    return torch.uint8


def encode_importance(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Finite ``values`` (>= 0) stored as ``dtype`` (``importance_dtype``), rounded to
    nearest: ``(stored, None)``, or for uint8 ``(codes of values' shape, block scales)``, the
    values capped at ``SATURATION``."""
    if dtype != torch.uint8:
        return values.to(dtype), None
    flat = values.reshape(-1).to(torch.float32).clamp_max(SATURATION)
    bits = torch.full_like(flat, _HALF20, dtype=torch.int64)
    codes, scales = encode_blocks(flat, bits)
    return codes.view(values.shape), scales


def importance_values(stored: Tensor, scales: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The values of an importance ``stored`` in its format (uint8 codes with their block
    ``scales``), as ``dtype`` (the compute dtype)."""
    if stored.dtype == torch.uint8:
        return decode(stored.reshape(-1), scales).view(stored.shape).to(dtype)
    return stored.to(dtype)


# Per-element exponents: the form 8-bit codes take in a checkpoint of sharded (DTensor) state.
ZERO_EXPONENT = -128  # the exponent of an element whose block scale is 0
MIN_EXPONENT, MAX_EXPONENT = -115, 127


def scale_exponents(scales: Tensor) -> Tensor:
    """``E`` of each block scale ``2**E`` (checked: 0 or a power of two, -115 <= E <= 127) as
    int8, ``ZERO_EXPONENT`` for a scale of 0."""
    bits = scales.to(torch.float32).view(torch.int32)
    return torch.where(bits == 0, ZERO_EXPONENT, (bits >> 23) - 127).to(torch.int8)


def exponent_scales(exponents: Tensor) -> Tensor:
    """The float32 scales ``2**E`` of int8 exponents (each in [-115, 127] or
    ``ZERO_EXPONENT``), 0 for ``ZERO_EXPONENT``."""
    e = exponents.to(torch.int32)
    return torch.where(e == ZERO_EXPONENT, 0.0, ((e + 127) << 23).view(torch.float32))


def element_exponents(scales: Tensor, numel: int) -> Tensor:
    """Per element of flat 8-bit codes of ``numel`` elements, the int8 exponent of its block's
    scale (``scale_exponents``)."""
    return scale_exponents(scales).repeat_interleave(BLOCK)[:numel]


def decode_elements(codes: Tensor, exponents: Tensor) -> Tensor:
    """The float32 values of flat uint8 ``codes``, each with the scale of its own int8
    exponent (exact)."""
    return code_values(codes) * exponent_scales(exponents)


def blocks_from_exponents(codes: Tensor, exponents: Tensor) -> tuple[Tensor, Tensor]:
    """Flat uint8 ``codes`` with per-element int8 ``exponents`` (checked) as new ``(codes,
    scales)`` in blocks of ``BLOCK`` from their first element: a block whose elements carry
    one exponent keeps its codes, with that scale (bit for bit); any other holds elements of
    blocks with other scales (laid out otherwise when encoded) and is encoded again from its
    exact values, rounded to nearest (as ``encode_importance``)."""
    n = codes.numel()
    first = exponents[::BLOCK]
    padded = first.repeat_interleave(BLOCK)  # the last block's tail carries its first one's
    padded[:n] = exponents
    uniform = (padded.view(-1, BLOCK) == first[:, None]).all(dim=1)
    scales = exponent_scales(first)
    if bool(uniform.all()):
        return codes.clone(), scales
    values = decode_elements(codes, exponents)
    new_codes, new_scales = encode_blocks(values, torch.full_like(values, _HALF20,
                                                                  dtype=torch.int64))
    keep = uniform.repeat_interleave(BLOCK)[:n]
    return torch.where(keep, codes, new_codes), torch.where(uniform, scales, new_scales)
