"""Backend ``triton``: the CLASSP step as one Triton kernel launch per parameter dtype,
accumulator format and importance format.

The tensors of a group (split by whether a penalty covers them, and by the format of its
importances) are cut into ``CHUNK``-element chunks. An int64 table gives each chunk the element
offsets of its param, grad and accumulator (and importance and anchor) from the group's first
tensors, its length, its output row, the offsets of its first 8-bit scales (of accumulator and
importance codes) and the index of its first element within its parameter; it is cached per set
of tensor addresses, so repeated steps on the same tensors neither rebuild nor copy it.
Programs are persistent: as many as the GPU holds at once, each striding over the chunks and
adding its counts when the chunks' row changes. Grads, read once, are loaded with the
evict-first hint. lr is read by the kernel from its tensor, or passed by value when it lives on
the CPU; grad_scale and found_inf are read by the kernel. No step synchronizes, and once its
table is cached a step copies nothing from the host (a new table comes from pinned memory,
asynchronously). Params may be float32, bfloat16 or float16; arithmetic is float32, and the
param is rounded once on write.

Accumulators are float32, or compressed (``classp_fused.state_formats``): bfloat16, or 8-bit
codes with a float32 scale per block of 256 elements. A compressed accumulator is decoded to
float32, updated, and its selected elements' new values rounded back stochastically with the
random bits of their element indices, drawn from the tensor's rounding key (read by the kernel
from the keys tensor); the 8-bit kernel works on whole blocks (rows of 256 elements): a block
with a selected element gets its codes and its scale written anew, from its maximum. On the
GPU the gradient's quotient by grad_scale, its square, the explicit penalty's product and the
decoding products are PTX instructions with an explicit rounding (no fused multiply-add
whatever the compile options, no approximate division), as numpy rounds them in the
interpreter and the reference does: accumulators match the reference bit for bit, but for a
generic power's ``|g|**p``, computed as ``exp2(p * log2|g|)``.

A penalty's importances W (SPEC section 4a) are read in their importance format
(``state_formats.importance_dtype``): the param's dtype, bfloat16, or 8-bit codes with a
float32 scale per block of 256 elements, decoded as the accumulator codes are (exactly); every
format gives W its float32 value, as the reference reads it.

Gradient means (the relative threshold, SPEC section 4a): the kernel reads each tensor's
threshold, ``max(threshold, tau * S)``, from a vector made from the means before the launch, and
adds its squared finite gradients and its element count per output row into scratch buffers;
after the launches the new means (sum / count, the old S where the count is 0: an empty tensor
or a step skipped by found_inf) are copied into the means by device ops. No program reads a
mean while another writes it, and nothing synchronizes.

On the CPU the kernel runs through the Triton interpreter (``TRITON_INTERPRET=1`` when this
module is imported).
"""
import functools
import itertools
import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import state_formats

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the backend is then unavailable
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 4096  # elements per program; fixed, so the table does not depend on the tuned BLOCK_SIZE
# (a multiple of every BLOCK_SIZE and of the 8-bit block, so that no block straddles two)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPRESSED_STATE = True  # bfloat16 and 8-bit accumulators (classp_fused.state_formats)
ALIGNMENT = 16  # bytes; every tensor the kernel touches starts on this boundary
PROGRAMS_PER_SM = 8  # resident programs per GPU multiprocessor (at 4 or 8 warps each)
INTERPRETED_PROGRAMS = 4  # each program instance costs the interpreter about a millisecond
CACHED_TABLES = 64
PENALTY_PATHS = {"none": 0, "explicit": 1, "proximal": 2}  # the kernel's PENALTY
PROXIMAL_CAP = float(torch.finfo(torch.float32).max / 2)  # bound of the proximal coefficient c
ACC_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}  # the kernel's ACC_FORMAT
CODE_FORMAT = ACC_FORMATS[torch.uint8]


def is_available(device) -> bool:
    """Whether the kernel runs on ``device``: a GPU, or the CPU when interpreted.

    Interpreted kernels see copies of their tensor arguments, so the address table cannot reach
    GPU memory then.
    """
    device = torch.device(device)
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    return device.type == "cpu" and INTERPRET


@functools.lru_cache(maxsize=16)
def _lr_tensor(lr: float) -> Tensor:
    """A float lr as the op's 0-dim float64 CPU tensor, made once per value (only read)."""
    return torch.tensor(lr, dtype=torch.float64)


def step(params, grads, accs, spec):
    """The backend entry point: the op, with a float lr as a 0-dim CPU tensor."""
    lr = spec.lr if isinstance(spec.lr, Tensor) else _lr_tensor(spec.lr)
    return classp_step_triton(params, grads, accs, *spec.op_arguments(lr))


def chunk_table(entries, device="cpu") -> Tensor:
    """The kernel's ``(chunks, 10)`` int64 table (``TABLE_COLUMNS``).

    ``entries`` holds one ``(param offset, grad offset, acc offset, numel, row, importance
    offset, anchor offset, scale offset, first index, importance scale offset)`` per non-empty
    tensor, offsets in elements from the group's base tensors (importance and anchor offsets 0
    without a penalty; the scale offsets, in blocks from the base scales, 0 but for 8-bit
    accumulators and 8-bit importances; the first index, that of the tensor's first element
    within its parameter, 0 but for compressed accumulators). Each chunk gets its offsets, its
    length (at most ``CHUNK``), the row of the counts it adds to, the offset of its first
    block's accumulator scale, its first element's index and the offset of its first block's
    importance scale.
    """
    chunks = []
    for (p_offset, g_offset, a_offset, numel, row, w_offset, m_offset, s_offset,
         first_index, ws_offset) in entries:
        start = torch.arange(0, numel, CHUNK, dtype=torch.int64, device=device)
        blocks = start // state_formats.BLOCK
        chunks.append(torch.stack([start + p_offset, start + g_offset, start + a_offset,
                                   (numel - start).clamp(max=CHUNK), torch.full_like(start, row),
                                   start + w_offset, start + m_offset, blocks + s_offset,
                                   start + first_index, blocks + ws_offset], dim=1))
    return torch.cat(chunks)


_tables: OrderedDict = OrderedDict()  # (entries, device) -> table, most recently used last
_kept_tables: dict = {}  # tables a CUDA graph captured: its replays read them


def _capturing(device: torch.device) -> bool:
    """Whether work enqueued now on ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _work_table(entries, device: torch.device) -> Tensor:
    """``chunk_table(entries)`` on ``device``, cached for the next steps on the same tensors.

    Built on the host and copied from pinned memory without a synchronization; while the
    current stream is capturing a CUDA graph, built by device ops the graph replays, and then
    not cached (an eager step could run before any replay filled it). Tables a graph read are
    never dropped.
    """
    key = (entries, device)
    capturing = _capturing(device)
    table = _kept_tables.get(key)
    if table is None:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            if capturing:
                _kept_tables[key] = _tables.pop(key)
    if table is not None:
        return table
    if capturing:
        return chunk_table(entries, device)
    table = chunk_table(entries)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    _tables[key] = table
    if len(_tables) > CACHED_TABLES:
        _tables.popitem(last=False)
    return table


@functools.lru_cache
def _resident_programs(device: torch.device) -> int:
    """Programs the device runs at once: the persistent grid's size at most."""
    if device.type != "cuda":
        return INTERPRETED_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM


def _grid(num_chunks: int, device: torch.device) -> int:
    """As many programs as run at once, trimmed so that every program takes the same number of
    chunks, or one less: no last partial wave."""
    resident = _resident_programs(device)
    waves = -(-num_chunks // resident)
    return max(1, -(-num_chunks // max(waves, 1)))


def _importance_formats(dtype: torch.dtype) -> tuple:
    """The dtypes an importance of a ``dtype`` param may have (``state_formats``)."""
    compressed = (torch.bfloat16,) if dtype in (torch.float32, torch.float16) else ()
    return (dtype,) + compressed + (torch.uint8,)


def _dtype_groups(params, accs, importances) -> list[list[int]]:
    """Indices of the non-empty params, grouped by dtype, accumulator format and the dtype of
    the importance that covers them, if any (``importances``: empty, or an entry per param):
    one launch per group."""
    groups = {}
    for i, p in enumerate(params):
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the triton backend supports float32, bfloat16 and float16 params, "
                            f"got {p.dtype} for params[{i}]")
        if accs[i].dtype not in ACC_FORMATS:
            raise TypeError(f"the triton backend takes float32, bfloat16 or uint8 (8-bit codes) "
                            f"accumulators, got {accs[i].dtype} for accs[{i}]")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device}, params[0] on {params[0].device}: "
                             f"the triton backend needs them on one device")
        weight = importances[i] if importances else None
        if weight is not None and weight.dtype not in _importance_formats(p.dtype):
            raise TypeError(f"importances[{i}] has dtype {weight.dtype}, expected one of "
                            f"{list(_importance_formats(p.dtype))} (an importance format of "
                            f"the param's {p.dtype})")
        if p.numel():
            key = (p.dtype, accs[i].dtype, None if weight is None else weight.dtype)
            groups.setdefault(key, []).append(i)
    return list(groups.values())


def _code_scales(accs, acc_scales, rounding_keys, index_offsets) -> list:
    """Per accumulator its block scales (``acc_scales`` holds those of the uint8 ones, in
    order), None for the others; checks that the compressed arguments fit ``accs``."""
    codes = [i for i, a in enumerate(accs) if a.dtype == torch.uint8]
    if len(acc_scales) != len(codes):
        raise ValueError(f"acc_scales must hold one scales tensor per uint8 accumulator "
                         f"({len(codes)}), got {len(acc_scales)}")
    if any(a.dtype in (torch.bfloat16, torch.uint8) for a in accs):
        if rounding_keys is None or rounding_keys.dtype != torch.int64 \
                or rounding_keys.shape != (len(accs),):
            raise ValueError(f"rounding_keys must be an int64 tensor of shape ({len(accs)},) "
                             f"with compressed (bfloat16 or uint8) accumulators")
        if len(index_offsets) != len(accs):
            raise ValueError(f"index_offsets must hold one offset per param ({len(accs)}), got "
                             f"{len(index_offsets)}")
    scales = [None] * len(accs)
    for i, scale in zip(codes, acc_scales):
        if scale.dtype != torch.float32 or scale.shape != (
                state_formats.num_blocks(accs[i].numel()),):
            raise ValueError(f"the scales of accs[{i}] must be a float32 tensor of "
                             f"{state_formats.num_blocks(accs[i].numel())} elements, got "
                             f"{scale.dtype} of shape {tuple(scale.shape)}")
        scales[i] = scale
    return scales


def _importance_code_scales(importances, importance_scales) -> list:
    """Per param the block scales of its uint8 (8-bit) importance (``importance_scales`` holds
    those, in order), None for the others; checks that they fit ``importances``."""
    codes = [i for i, w in enumerate(importances) if w is not None and w.dtype == torch.uint8]
    if len(importance_scales) != len(codes):
        raise ValueError(f"importance_scales must hold one scales tensor per uint8 importance "
                         f"({len(codes)}), got {len(importance_scales)}")
    scales = [None] * len(importances)
    for i, scale in zip(codes, importance_scales):
        blocks = state_formats.num_blocks(importances[i].numel())
        if scale.dtype != torch.float32 or scale.shape != (blocks,):
            raise ValueError(f"the scales of importances[{i}] must be a float32 tensor of "
                             f"{blocks} elements, got {scale.dtype} of shape "
                             f"{tuple(scale.shape)}")
        if not importances[i].is_contiguous():
            raise ValueError(f"importances[{i}] (uint8 8-bit codes) must be contiguous")
        scales[i] = scale
    return scales


def _power_path(power: float) -> int:
    """The kernel's ``FAST_POWER``: 1 or 2 for the exact fast paths, 0 for exp2/log2."""
    return int(power) if power in (1.0, 2.0) else 0


def _new_counts(params, lr) -> Tensor:
    """Zeroed ``(n, 2)`` int64 counts on the params' device, which the kernel adds to."""
    device = params[0].device if params else lr.device
    return torch.zeros(len(params), 2, dtype=torch.int64, device=device)


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _mean_buffers(means, threshold: float, relative_threshold: float, device):
    """For gradient ``means`` (one per param, or none): the old means stacked, the per-row
    thresholds the kernel reads (None unless ``relative_threshold`` > 0) and zeroed scratch
    for the sums of squares and the element counts; all None without means."""
    if not means:
        return None, None, None, None
    old = torch.stack(list(means))
    thresholds = None
    if relative_threshold > 0:  # a NaN tau * S stays NaN: it selects nothing
        thresholds = torch.clamp_min(old * relative_threshold, threshold)
    return (old, thresholds, torch.zeros_like(old),
            torch.zeros(len(means), dtype=torch.int64, device=device))


def _publish_means(means, old, sums, sizes) -> None:
    """Replace the means with ``sums / sizes``, keeping the old ones where no element was
    counted (an empty tensor, a step skipped by found_inf): after every launch, by device ops."""
    if means:
        new = torch.where(sizes > 0, sums / sizes, old)
        torch._foreach_copy_(list(means), list(new.unbind()))


def _dense(t: Tensor) -> Tensor:
    """``t`` if contiguous and ``ALIGNMENT``-aligned, else a contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _entries(members) -> tuple:
    """The ``chunk_table`` entries of ``(row, param, grad, acc, importance, anchor, scales,
    importance scales, first index)`` members (dense, aligned, one dtype, accumulator format
    and importance format, all with a penalty or all without: None; scales None but for 8-bit
    accumulators, importance scales but for 8-bit importances): element offsets from the first
    member's tensors, each address read once."""
    _, p0, g0, a0, w0, m0, s0, ws0, _ = members[0]
    p_base, g_base, a_base = p0.data_ptr(), g0.data_ptr(), a0.data_ptr()
    p_size, a_size = p0.element_size(), a0.element_size()
    w_size = 0 if w0 is None else w0.element_size()

    def offset(t, base, size):
        return 0 if base is None else (t.data_ptr() - base) // size

    w_base, m_base, s_base, ws_base = (None if t is None else t.data_ptr()
                                       for t in (w0, m0, s0, ws0))
    return tuple(((p.data_ptr() - p_base) // p_size, (g.data_ptr() - g_base) // p_size,
                  (a.data_ptr() - a_base) // a_size, p.numel(), row, offset(w, w_base, w_size),
                  offset(m, m_base, p_size), offset(scale, s_base, 4), first_index,
                  offset(w_scale, ws_base, 4))
                 for row, p, g, a, w, m, scale, w_scale, first_index in members)


if triton is not None:
    # param, grad and acc offsets, length, output row, importance and anchor offsets, the offset
    # of the first block's scale, the index of the first element within its parameter, the
    # offset of the first block's importance scale
    TABLE_COLUMNS = tl.constexpr(10)
    # On the GPU, the products and quotients accumulators are made of are PTX
    # instructions with an explicit rounding: never contracted into a fused multiply-add,
    # whatever the compile options; the interpreter (numpy) rounds each operation anyway.
    ROUNDED_ASM = tl.constexpr(not INTERPRET)
    CODE_BLOCK = tl.constexpr(state_formats.BLOCK)
    SATURATION = tl.constexpr(state_formats.SATURATION)
    CODE_BIAS = tl.constexpr((127 - 32) << 3)  # float32 bits >> 20 of the code 8 (2**-31)

    def _configs():
        if INTERPRET:  # the interpreter runs a single config
            return [triton.Config({"BLOCK_SIZE": CHUNK})]
        return [triton.Config({"BLOCK_SIZE": block}, num_warps=warps)
                for block in (1024, 2048, 4096) for warps in (4, 8)]

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """float32 ``x`` rounded to ``dtype``, to nearest even.

        bfloat16 is rounded with integer ops, bit for bit as torch rounds it (NaN to 0x7FC0): the
        interpreter's own cast truncates.
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _mul_rn(a, b):
        """float32 ``a * b``, rounded on its own (no FMA contraction, no flush of subnormals)."""
        if ROUNDED_ASM:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return a * b

    @triton.jit
    def _div_rn(a, b):
        """float32 ``a / b``, correctly rounded (the GPU's ``/`` is approximate)."""
        if ROUNDED_ASM:
            return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return a / b

    @triton.jit
    def _mix32(x):
        """lowbias32 of uint32 ``x`` (``state_formats.mix32``)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _random_bits(key, index):
        """``state_formats.element_bits``: uint32 random bits of int64 element ``index``."""
        high = _mix32(key + (index >> 32).to(tl.uint32))
        return _mix32(index.to(tl.uint32) ^ high)

    @triton.jit
    def _decode_codes(codes, scales):
        """The float32 values of uint8 ``codes`` (rows of a block each) with their rows'
        ``scales``: both products exact."""
        c = codes.to(tl.int32)
        normal = ((c + CODE_BIAS) << 20).to(tl.float32, bitcast=True)
        q = tl.where(c >= 8, normal, c.to(tl.float32) * 2.0 ** -34)
        return _mul_rn(q, scales[:, None])

    @triton.jit
    def _encode_codes(x, bits):
        """``state_formats.encode_blocks`` of ``x`` (float32 >= 0, at most SATURATION; rows of a
        block each, zeros past a tensor's end) with uint32 random ``bits``: codes and scales."""
        top = tl.max(x, axis=1)
        top_bits = tl.maximum(top, 2.0 ** -116).to(tl.int32, bitcast=True)
        exponent = (top_bits >> 23) - 126 + ((top_bits & 0x7FFFFF) > 0x700000).to(tl.int32)
        scales = tl.where(top > 0, ((exponent + 127) << 23).to(tl.float32, bitcast=True), 0.0)
        # 2**-exponent, exact (a subnormal for exponent 127): x times it is x / scale
        inverse = tl.where(exponent <= 126, (127 - exponent) << 23, 1 << 22)
        q = _mul_rn(x, inverse.to(tl.float32, bitcast=True)[:, None])
        low = q < 2.0 ** -31
        shifted = tl.where(low, q + 2.0 ** -31, q).to(tl.int32, bitcast=True)
        code = ((shifted + (bits & 0xFFFFF).to(tl.int32)) >> 20) - CODE_BIAS
        code = tl.where(low, code - 8, code)
        code = tl.where(x > 0, tl.maximum(code, 1), 0)
        return code.to(tl.uint8), scales

    @triton.jit
    def _row_scales(s_ptr, bounds, FULL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    ROW: tl.constexpr):
        """The scale of each row's 8-bit block (rows of ``ROW`` elements, ``ROW`` dividing the
        block) from ``s_ptr``, that of the first row's; rows with no element in ``bounds``
        (unless ``FULL``) get 0."""
        blocks = tl.arange(0, BLOCK_SIZE // ROW) // (CODE_BLOCK // ROW)
        if FULL:
            scales = tl.load(s_ptr + blocks)
        else:
            scales = tl.load(s_ptr + blocks, mask=tl.max(bounds.to(tl.int32), axis=1) != 0,
                             other=0.0)
        return scales

    @triton.jit
    def _update_block(p_ptr, g_ptr, a_ptr, w_ptr, m_ptr, s_ptr, ws_ptr, key, first_index, idx,
                      bounds, lr, grad_scale_ptr, threshold, eps, power, factor, cap,
                      FULL: tl.constexpr,
                      FAST_POWER: tl.constexpr, APPLY_SCALING: tl.constexpr,
                      PENALTY: tl.constexpr, SUM_SQUARES: tl.constexpr,
                      ACC_FORMAT: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr):
        """Update the elements ``idx`` (rows of ``ROW`` elements) in place; return how many
        were updated and non-finite, and with ``SUM_SQUARES`` the sum of the finite gradients'
        squares (else 0).

        Stores are masked per row of ``idx``: a row with an update is written whole,
        masked-out elements with the values just read, so stores stay vectors.
        ``PENALTY`` 1 adds ``factor * w * (p - m)`` to the gradient; 2 pulls each new value
        toward ``m`` by ``c / (1 + c)``, ``c = min(factor * w * eta, cap)``; ``w`` is read as
        float32 from ``w_ptr``'s dtype, or decoded from 8-bit codes with the block scales at
        ``ws_ptr`` (that of the first row's block) unless it is None.
        ``ACC_FORMAT`` 1 (bfloat16) and 2 (8-bit codes; a row is a block, ``s_ptr`` its scales)
        round the new accumulator values with the bits of ``key`` at element indices
        ``first_index + idx``.
        """
        if FULL:
            p = tl.load(p_ptr + idx)
            g = tl.load(g_ptr + idx, eviction_policy="evict_first").to(tl.float32)
            stored = tl.load(a_ptr + idx)
            if PENALTY != 0:
                w = tl.load(w_ptr + idx, eviction_policy="evict_first")
                m = tl.load(m_ptr + idx, eviction_policy="evict_first").to(tl.float32)
        else:
            p = tl.load(p_ptr + idx, mask=bounds, other=0.0)
            g = tl.load(g_ptr + idx, mask=bounds, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            stored = tl.load(a_ptr + idx, mask=bounds, other=0)
            if PENALTY != 0:
                w = tl.load(w_ptr + idx, mask=bounds, other=0, eviction_policy="evict_first")
                m = tl.load(m_ptr + idx, mask=bounds, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
        if PENALTY != 0:
            if ws_ptr is not None:
                w = _decode_codes(w, _row_scales(ws_ptr, bounds, FULL, BLOCK_SIZE, ROW))
            else:
                w = w.to(tl.float32)
        if ACC_FORMAT == 0:
            a = stored
        elif ACC_FORMAT == 1:
            a = (stored.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32,
                                                                            bitcast=True)
        else:
            a = _decode_codes(stored, _row_scales(s_ptr, bounds, FULL, BLOCK_SIZE, ROW))
        if grad_scale_ptr is not None:
            g = _div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
        if PENALTY == 1:
            g = g + _mul_rn(w * (p.to(tl.float32) - m), factor)
        square = _mul_rn(g, g)
        finite = tl.abs(g) < float("inf")
        mask = finite & (square > threshold)
        nonfinite = ~finite
        if not FULL:
            nonfinite = nonfinite & bounds
        squares = 0.0
        if SUM_SQUARES:  # out of bounds g is 0
            squares = tl.sum(tl.where(finite, square, 0.0))

        if FAST_POWER == 1:
            new_a = a + tl.abs(g)
        elif FAST_POWER == 2:
            new_a = a + square
        else:
            new_a = a + tl.exp2(power * tl.log2(tl.abs(g)))
        eta = lr  # the step size of each element
        if APPLY_SCALING:
            if FAST_POWER == 1:
                denom = eps + new_a
                g = g / denom
                if PENALTY == 2:
                    eta = lr / denom
            else:
                if FAST_POWER == 2:
                    root = tl.rsqrt(eps + new_a)
                else:
                    root = tl.exp2(-tl.log2(eps + new_a) / power)
                g = g * root
                if PENALTY == 2:
                    eta = lr * root
        new_p = p.to(tl.float32) - lr * g
        if PENALTY == 2:
            c = factor * w * eta
            c = tl.where(c > cap, cap, c)  # a NaN c stays NaN
            new_p = new_p + c / (1.0 + c) * (m - new_p)
        new_p = _round(new_p, p.dtype)

        touched = tl.max(mask.to(tl.int32), axis=1) != 0
        write = touched[:, None]
        if not FULL:
            write = write & bounds
        tl.store(p_ptr + idx, tl.where(mask, new_p, p), mask=write)
        if ACC_FORMAT == 0:
            tl.store(a_ptr + idx, tl.where(mask, new_a, a), mask=write)
        else:
            bits = _random_bits(key, first_index + idx)
            if ACC_FORMAT == 1:  # the float32 bits plus 16 random bits, truncated
                rounded = (new_a.to(tl.uint32, bitcast=True) + (bits & 0xFFFF)) >> 16
                rounded = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                tl.store(a_ptr + idx, tl.where(mask, rounded, stored), mask=write)
            else:  # out of bounds a is 0, so is x
                codes, scales = _encode_codes(tl.where(mask, tl.minimum(new_a, SATURATION), a),
                                              bits)
                tl.store(a_ptr + idx, codes, mask=write)
                tl.store(s_ptr + tl.arange(0, BLOCK_SIZE // ROW), scales, mask=touched)
        return tl.sum(mask.to(tl.int32)), tl.sum(nonfinite.to(tl.int32)), squares

    @triton.jit
    def _classp_kernel(p_ptr, g_ptr, a_ptr, w_ptr, m_ptr, table_ptr, num_chunks, counts_ptr,
                       lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, threshold, eps, power,
                       factor, cap, thresholds_ptr, sums_ptr, sizes_ptr, scales_ptr, keys_ptr,
                       w_scales_ptr, FAST_POWER: tl.constexpr, APPLY_SCALING: tl.constexpr,
                       PENALTY: tl.constexpr, ACC_FORMAT: tl.constexpr, GROUP: tl.constexpr,
                       ACC_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
        """Update the chunks ``program_id``, ``program_id + num_programs``, ... of the table; add
        up their counts per output row. lr is read from ``lr_ptr``, or is ``lr_value`` when
        ``lr_ptr`` is None. ``w_ptr`` and ``m_ptr`` (importances and anchors) are read only
        with a ``PENALTY`` (see ``_update_block``); importances are 8-bit codes when
        ``w_scales_ptr`` (their block scales) is not None. A row's threshold is read from
        ``thresholds_ptr`` unless it is None (then ``threshold``); unless ``sums_ptr`` is None,
        the finite squared gradients and the elements of each row are added into ``sums_ptr``
        and ``sizes_ptr``. Compressed accumulators (``ACC_FORMAT`` 1 or 2) are rounded with the
        key of their row in ``keys_ptr``; 8-bit ones (2) have their scales in ``scales_ptr``.
        ``GROUP`` params are 32 bytes, ``ACC_ALIGN`` accumulators and ``W_ALIGN`` importances
        16."""
        if found_inf_ptr is not None:
            if tl.load(found_inf_ptr) != 0:
                return
        if lr_ptr is not None:
            lr = tl.load(lr_ptr).to(tl.float32)
        else:
            lr = lr_value
        # stores are masked per row: of 32 bytes of params, or of a block of 8-bit codes
        ROW: tl.constexpr = CODE_BLOCK if ACC_FORMAT == 2 else GROUP
        idx = tl.arange(0, BLOCK_SIZE // ROW)[:, None] * ROW + tl.arange(0, ROW)[None, :]
        row = tl.full((), -1, tl.int64)  # the output row the counts below belong to
        updated = tl.full((), 0, tl.int32)
        nonfinite = tl.full((), 0, tl.int32)
        squares = tl.full((), 0.0, tl.float32)
        size = tl.full((), 0, tl.int64)
        row_threshold = threshold
        key = tl.full((), 0, tl.uint32)
        for c in range(tl.program_id(0).to(tl.int64), num_chunks, tl.num_programs(0)):
            chunk = table_ptr + c * TABLE_COLUMNS
            p_offset = tl.load(chunk)
            g_offset = tl.load(chunk + 1)
            a_offset = tl.load(chunk + 2)
            length = tl.load(chunk + 3)
            chunk_row = tl.load(chunk + 4)
            first_index = 0
            if PENALTY != 0:
                w_offset = tl.load(chunk + 5)
                m_offset = tl.load(chunk + 6)
                if w_scales_ptr is not None:
                    ws_offset = tl.load(chunk + 9)
            if ACC_FORMAT == 2:
                s_offset = tl.load(chunk + 7)
            if ACC_FORMAT != 0:
                first_index = tl.load(chunk + 8)
                key = tl.load(keys_ptr + chunk_row).to(tl.uint32)
            flush = (chunk_row != row) & (row >= 0)
            out = counts_ptr + tl.maximum(row, 0) * 2
            tl.atomic_add(out, updated.to(tl.int64), mask=flush)
            tl.atomic_add(out + 1, nonfinite.to(tl.int64), mask=flush)
            updated = tl.where(chunk_row != row, 0, updated)
            nonfinite = tl.where(chunk_row != row, 0, nonfinite)
            if sums_ptr is not None:
                tl.atomic_add(sums_ptr + tl.maximum(row, 0), squares, mask=flush)
                tl.atomic_add(sizes_ptr + tl.maximum(row, 0), size, mask=flush)
                squares = tl.where(chunk_row != row, 0.0, squares)
                size = tl.where(chunk_row != row, 0, size) + length
            if thresholds_ptr is not None:
                row_threshold = tl.load(thresholds_ptr + chunk_row)
            row = chunk_row
            full_end = length - length % BLOCK_SIZE
            for start in range(0, full_end, BLOCK_SIZE):
                w_block = w_ptr
                m_block = m_ptr
                s_block = scales_ptr
                ws_block = w_scales_ptr
                if PENALTY != 0:
                    w_block = w_ptr + tl.multiple_of(w_offset + start, W_ALIGN)
                    m_block = m_ptr + tl.multiple_of(m_offset + start, GROUP // 2)
                    if w_scales_ptr is not None:
                        ws_block = w_scales_ptr + ws_offset + start // CODE_BLOCK
                if ACC_FORMAT == 2:
                    s_block = scales_ptr + s_offset + start // CODE_BLOCK
                u, n, q = _update_block(p_ptr + tl.multiple_of(p_offset + start, GROUP // 2),
                                        g_ptr + tl.multiple_of(g_offset + start, GROUP // 2),
                                        a_ptr + tl.multiple_of(a_offset + start, ACC_ALIGN),
                                        w_block, m_block, s_block, ws_block, key,
                                        first_index + start, idx, None, lr, grad_scale_ptr,
                                        row_threshold, eps, power, factor, cap, True,
                                        FAST_POWER, APPLY_SCALING, PENALTY, sums_ptr is not None,
                                        ACC_FORMAT, BLOCK_SIZE, ROW)
                updated += u
                nonfinite += n
                squares += q
            if full_end < length:
                w_block = w_ptr
                m_block = m_ptr
                s_block = scales_ptr
                ws_block = w_scales_ptr
                if PENALTY != 0:
                    w_block = w_ptr + tl.multiple_of(w_offset + full_end, W_ALIGN)
                    m_block = m_ptr + tl.multiple_of(m_offset + full_end, GROUP // 2)
                    if w_scales_ptr is not None:
                        ws_block = w_scales_ptr + ws_offset + full_end // CODE_BLOCK
                if ACC_FORMAT == 2:
                    s_block = scales_ptr + s_offset + full_end // CODE_BLOCK
                u, n, q = _update_block(p_ptr + tl.multiple_of(p_offset + full_end, GROUP // 2),
                                        g_ptr + tl.multiple_of(g_offset + full_end, GROUP // 2),
                                        a_ptr + tl.multiple_of(a_offset + full_end, ACC_ALIGN),
                                        w_block, m_block, s_block, ws_block, key,
                                        first_index + full_end, idx, idx < length - full_end,
                                        lr, grad_scale_ptr,
                                        row_threshold, eps, power, factor, cap, False,
                                        FAST_POWER, APPLY_SCALING, PENALTY, sums_ptr is not None,
                                        ACC_FORMAT, BLOCK_SIZE, ROW)
                updated += u
                nonfinite += n
                squares += q
        out = counts_ptr + tl.maximum(row, 0) * 2
        tl.atomic_add(out, updated.to(tl.int64), mask=row >= 0)
        tl.atomic_add(out + 1, nonfinite.to(tl.int64), mask=row >= 0)
        if sums_ptr is not None:
            tl.atomic_add(sums_ptr + tl.maximum(row, 0), squares, mask=row >= 0)
            tl.atomic_add(sizes_ptr + tl.maximum(row, 0), size, mask=row >= 0)

    # Tuning runs the kernel several times: only ever on buffers it may scribble on (scratch, or
    # the concatenated copies of the traceable op), never through the address table of a step.
    # Keyed on the power path, scaling, penalty and accumulator format; the autotuner adds the
    # dtypes of the tensor arguments.
    _classp_kernel_autotuned = triton.autotune(
        configs=_configs(), key=["FAST_POWER", "APPLY_SCALING", "PENALTY", "ACC_FORMAT"],
        restore_value=["p_ptr", "a_ptr", "counts_ptr", "sums_ptr", "sizes_ptr",
                       "scales_ptr"])(_classp_kernel)

    def _launch(kernel, p, g, a, w, m, table, counts, lr, grad_scale, found_inf, threshold, eps,
                power, apply_scaling, penalty, factor, means=(None, None, None), scales=None,
                keys=None, w_scales=None, **config):
        """One launch over every chunk of ``table``; ``p``, ``g``, ``a`` (and ``w``, ``m`` with
        a ``penalty`` form other than "none", else None; ``scales`` with 8-bit accumulators,
        ``w_scales`` with 8-bit importances) are the base tensors. ``lr`` is a tensor on ``p``'s
        device or a float; ``factor`` is the penalty's 2 * scale; ``means`` the per-row
        thresholds, sums and sizes of ``_mean_buffers`` (None: none); ``keys`` the rounding keys
        of compressed accumulators, per row."""
        lr_ptr, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
        num_chunks = table.shape[0]
        acc_format = ACC_FORMATS[a.dtype]
        codes = w is not None and w.dtype == torch.uint8
        kernel[(_grid(num_chunks, p.device),)](
            p, g, a, w, m, table, num_chunks, counts, lr_ptr, lr_value, grad_scale, found_inf,
            threshold, eps, power, factor, PROXIMAL_CAP, *means,
            scales if acc_format == CODE_FORMAT else None, keys if acc_format else None,
            w_scales if codes else None, FAST_POWER=_power_path(power),
            APPLY_SCALING=apply_scaling, PENALTY=PENALTY_PATHS[penalty], ACC_FORMAT=acc_format,
            GROUP=32 // p.element_size(), ACC_ALIGN=ALIGNMENT // a.element_size(),
            W_ALIGN=1 if w is None else ALIGNMENT // w.element_size(), **config)

    @functools.lru_cache
    def _tuned_config(device, dtype, acc_dtype, w_dtype, power_path, apply_scaling, penalty):
        """The autotuner's choice for one kernel variant (``w_dtype`` that of the importances,
        with a ``penalty``), tuned on scratch buffers."""
        configs = _classp_kernel_autotuned.configs
        if len(configs) == 1:
            return configs[0]
        numel = 1 << 22
        p = torch.randn(numel, device=device).to(dtype)
        g = torch.randn(numel, device=device).to(dtype)
        a = torch.rand(numel, device=device)
        a = torch.randint(0, 256, (numel,), dtype=acc_dtype, device=device) \
            if acc_dtype == torch.uint8 else a.to(acc_dtype)
        scales = torch.ones(state_formats.num_blocks(numel), device=device)
        keys = torch.zeros(1, dtype=torch.int64, device=device)
        w, m = None, None
        if penalty != "none":
            w = torch.randint(0, 256, (numel,), dtype=w_dtype, device=device) \
                if w_dtype == torch.uint8 else torch.rand(numel, device=device).to(w_dtype)
            m = p.clone()
        counts = torch.zeros(1, 2, dtype=torch.int64, device=device)
        lr = torch.tensor(1e-3, device=device)
        power = float(power_path) if power_path else 3.0
        _launch(_classp_kernel_autotuned, p, g, a, w, m,
                chunk_table(((0, 0, 0, numel, 0, 0, 0, 0, 0, 0),), device), counts, lr, None,
                None, 0.0, 1e-5, power, apply_scaling, penalty, 1.0, scales=scales, keys=keys,
                w_scales=scales)
        return _classp_kernel_autotuned.best_config

    def _penalty_of(rows, importances, penalty_form) -> tuple[str, bool]:
        """The form a launch over ``rows`` (one group of ``_dtype_groups``) takes, "none"
        unless the penalty covers them, and whether it does."""
        covered = penalty_form != "none" and importances[rows[0]] is not None
        return (penalty_form if covered else "none"), covered

    @triton_op("classp_fused::classp_step_triton",
               mutates_args={"params", "accs", "grad_sq_means", "acc_scales"})
    def classp_step_triton(params: list[Tensor], grads: list[Tensor], accs: list[Tensor],
                           lr: Tensor, threshold: float, eps: float, power: float,
                           apply_scaling: bool, grad_scale: Optional[Tensor],
                           found_inf: Optional[Tensor], importances: list[Optional[Tensor]],
                           anchors: list[Optional[Tensor]], penalty_form: str,
                           penalty_scale: float, importance_scales: list[Tensor],
                           relative_threshold: float,
                           grad_sq_means: list[Tensor], acc_scales: list[Tensor],
                           rounding_keys: Optional[Tensor], index_offsets: list[int]) -> Tensor:
        """One CLASSP step in place; returns ``(n, 2)`` int64 counts [updated, non-finite].

        ``penalty_form`` "explicit" or "proximal" takes the penalty ``penalty_scale * sum W *
        (p - m)^2`` of the params with an entry in ``importances`` (W) and ``anchors`` (m)
        (SPEC section 4a); "none" with empty lists takes none. An importance is in the param's
        dtype, bfloat16 (float32 and float16 params) or uint8 8-bit codes, whose block scales
        ``importance_scales`` holds (those of the uint8 importances only, in order).
        ``grad_sq_means`` (one float32
        0-dim tensor per param, or empty) are the relative threshold's gradient means: read
        when ``relative_threshold`` > 0, and refreshed. Compressed accumulators (bfloat16, or
        uint8 8-bit codes with their block scales in ``acc_scales``, in order) are rounded with
        ``rounding_keys`` (int64, one per param, read by the kernel) at element indices from
        ``index_offsets`` (one per param; both empty or None when nothing is compressed).

        This body is what torch.compile traces: it steps concatenated copies of each group and
        writes them back. Eager calls take ``_classp_step_in_place`` instead.
        """
        counts = _new_counts(params, lr)
        scales_of = _code_scales(accs, acc_scales, rounding_keys, index_offsets)
        w_scales_of = _importance_code_scales(importances, importance_scales)
        lr, grad_scale, found_inf, keys = _on(counts.device, lr, grad_scale, found_inf,
                                              rounding_keys)
        old, *means = _mean_buffers(grad_sq_means, threshold, relative_threshold, counts.device)
        for rows in _dtype_groups(params, accs, importances):
            penalty, covered = _penalty_of(rows, importances, penalty_form)
            lists = (params, grads, accs) + ((importances, anchors) if covered else ())
            align = ALIGNMENT // min(ts[rows[0]].element_size() for ts in lists)
            numels = [params[i].numel() for i in rows]
            slots = [numel + (-numel) % align for numel in numels]
            flats = [torch.cat([F.pad(ts[i].reshape(-1), (0, slot - numel))
                                for i, numel, slot in zip(rows, numels, slots)]) for ts in lists]
            p, g, a = flats[:3]
            w, m = flats[3:] if covered else (None, None)
            starts = list(itertools.accumulate(slots[:-1], initial=0))
            blocks = [state_formats.num_blocks(n) for n in numels]
            block_starts = list(itertools.accumulate(blocks[:-1], initial=0))
            scales = w_scales = None
            if scales_of[rows[0]] is not None:
                scales = torch.cat([scales_of[i] for i in rows])
            if covered and w_scales_of[rows[0]] is not None:  # in the blocks' order, as scales
                w_scales = torch.cat([w_scales_of[i] for i in rows])
            first_indices = [index_offsets[i] if index_offsets else 0 for i in rows]
            table = chunk_table(tuple((s, s, s, n, i, s, s, b, f, b) for s, n, i, b, f in zip(
                starts, numels, rows, block_starts, first_indices)), counts.device)
            _launch(wrap_triton(_classp_kernel_autotuned), p, g, a, w, m, table, counts,
                    lr, grad_scale, found_inf, threshold, eps, power, apply_scaling, penalty,
                    2.0 * penalty_scale, means, scales, keys, w_scales)
            for i, s, n, b, k in zip(rows, starts, numels, block_starts, blocks):
                params[i].copy_(p[s:s + n].view_as(params[i]))
                accs[i].copy_(a[s:s + n].view_as(accs[i]))
                if scales is not None:
                    scales_of[i].copy_(scales[b:b + k])
        _publish_means(grad_sq_means, old, *means[1:])
        return counts

    @classp_step_triton.register_fake
    def _classp_step_fake(params, grads, accs, lr, threshold, eps, power, apply_scaling,
                          grad_scale, found_inf, importances, anchors, penalty_form,
                          penalty_scale, importance_scales, relative_threshold, grad_sq_means,
                          acc_scales, rounding_keys, index_offsets):
        return _new_counts(params, lr)

    def _classp_step_in_place(params, grads, accs, lr, threshold, eps, power, apply_scaling,
                              grad_scale, found_inf, importances, anchors, penalty_form,
                              penalty_scale, importance_scales, relative_threshold, grad_sq_means,
                              acc_scales, rounding_keys, index_offsets):
        """The eager step: one launch per group on the tensors themselves, by address.

        Non-contiguous or misaligned tensors are stepped through contiguous copies.
        """
        counts = _new_counts(params, lr)
        device = counts.device
        scales_of = _code_scales(accs, acc_scales, rounding_keys, index_offsets)
        w_scales_of = _importance_code_scales(importances, importance_scales)
        # an lr on the CPU is passed by value: no copy to the device
        lr = lr.item() if lr.device.type == "cpu" else lr.to(device)
        grad_scale, found_inf, keys = _on(device, grad_scale, found_inf, rounding_keys)
        old, *means = _mean_buffers(grad_sq_means, threshold, relative_threshold, device)
        for rows in _dtype_groups(params, accs, importances):
            penalty, covered = _penalty_of(rows, importances, penalty_form)
            members = [(i, _dense(params[i]), _dense(grads[i]), _dense(accs[i]),
                        _dense(importances[i]) if covered else None,
                        _dense(anchors[i]) if covered else None,
                        None if scales_of[i] is None else _dense(scales_of[i]),
                        _dense(w_scales_of[i]) if covered and w_scales_of[i] is not None
                        else None,
                        index_offsets[i] if index_offsets else 0) for i in rows]
            _, p0, g0, a0, w0, m0, s0, ws0, _ = members[0]
            entries = _entries(members)
            config = _tuned_config(device, p0.dtype, a0.dtype, None if w0 is None else w0.dtype,
                                   _power_path(power), apply_scaling, penalty)
            _launch(_classp_kernel, p0, g0, a0, w0, m0, _work_table(entries, device), counts,
                    lr, grad_scale, found_inf, threshold, eps, power, apply_scaling, penalty,
                    2.0 * penalty_scale, means, s0, keys, ws0, **config.all_kwargs())
            for i, p, _, a, _, _, scale, _, _ in members:
                for copy, original in ((p, params[i]), (a, accs[i]), (scale, scales_of[i])):
                    if copy is not original:
                        original.copy_(copy)
        _publish_means(grad_sq_means, old, *means[1:])
        return counts

    for _device_type in ("cpu", "cuda"):  # one at a time: a tuple shares one enable switch
        classp_step_triton.register_kernel(_device_type, _classp_step_in_place)

    if INTERPRET:
        # wrap_triton cannot trace an interpreted kernel: functionalization keeps the op whole.
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        @classp_step_triton.register_torch_dispatch(FunctionalTensorMode)
        def _functionalize_whole(mode, op, types, args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)
