"""Backend ``triton``: the CLASSP step as one Triton kernel launch per parameter dtype.

The tensors of a dtype group (split by whether a penalty covers them) are cut into
``CHUNK``-element chunks. An int64 table gives each chunk the element offsets of its param,
grad and accumulator (and importance and anchor) from the group's first tensors, its length and
its output row; it is cached per set of tensor addresses, so repeated steps on the same tensors
neither rebuild nor copy it. Programs are persistent: as many as the GPU holds
at once, each striding over the chunks and adding its counts when the chunks' row changes.
Grads, read once, are loaded with the evict-first hint. lr is read by the kernel from its
tensor, or passed by value when it lives on the CPU; grad_scale and found_inf are read by the
kernel. No step synchronizes, and once its table is cached a step copies nothing from the
host (a new table comes from pinned memory, asynchronously). Params may be float32,
bfloat16 or float16; accumulators and arithmetic are float32, and the param is rounded once on
write.

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

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the backend is then unavailable
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 4096  # elements per program; fixed, so the table does not depend on the tuned BLOCK_SIZE
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALIGNMENT = 16  # bytes; every tensor the kernel touches starts on this boundary
PROGRAMS_PER_SM = 8  # resident programs per GPU multiprocessor (at 4 or 8 warps each)
INTERPRETED_PROGRAMS = 4  # each program instance costs the interpreter about a millisecond
CACHED_TABLES = 64
PENALTY_PATHS = {"none": 0, "explicit": 1, "proximal": 2}  # the kernel's PENALTY
PROXIMAL_CAP = float(torch.finfo(torch.float32).max / 2)  # bound of the proximal coefficient c


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
    """The kernel's ``(chunks, 7)`` int64 table (``TABLE_COLUMNS``).

    ``entries`` holds one ``(param offset, grad offset, acc offset, numel, row, importance
    offset, anchor offset)`` per non-empty tensor, offsets in elements from the group's base
    tensors (the last two 0 without a penalty). Each chunk gets its element offsets, its length
    (at most ``CHUNK``) and the row of the counts it adds to.
    """
    chunks = []
    for p_offset, g_offset, a_offset, numel, row, w_offset, m_offset in entries:
        start = torch.arange(0, numel, CHUNK, dtype=torch.int64, device=device)
        chunks.append(torch.stack([start + p_offset, start + g_offset, start + a_offset,
                                   (numel - start).clamp(max=CHUNK), torch.full_like(start, row),
                                   start + w_offset, start + m_offset], dim=1))
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


def _dtype_groups(params, importances) -> list[list[int]]:
    """Indices of the non-empty params, grouped by dtype and by whether the penalty covers them
    (``importances``: empty, or an entry per param): one launch per group."""
    groups = {}
    for i, p in enumerate(params):
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the triton backend supports float32, bfloat16 and float16 params, "
                            f"got {p.dtype} for params[{i}]")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device}, params[0] on {params[0].device}: "
                             f"the triton backend needs them on one device")
        if p.numel():
            covered = bool(importances) and importances[i] is not None
            groups.setdefault((p.dtype, covered), []).append(i)
    return list(groups.values())


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
    """The ``chunk_table`` entries of ``(row, param, grad, acc, importance, anchor)`` members
    (dense, aligned, one dtype, all with a penalty or all without: None): element offsets from
    the first member's tensors, each address read once."""
    _, p0, g0, a0, w0, m0 = members[0]
    p_base, g_base, a_base = p0.data_ptr(), g0.data_ptr(), a0.data_ptr()
    p_size, a_size = p0.element_size(), a0.element_size()
    if w0 is None:
        return tuple(((p.data_ptr() - p_base) // p_size, (g.data_ptr() - g_base) // p_size,
                      (a.data_ptr() - a_base) // a_size, p.numel(), row, 0, 0)
                     for row, p, g, a, _, _ in members)
    w_base, m_base = w0.data_ptr(), m0.data_ptr()
    return tuple(((p.data_ptr() - p_base) // p_size, (g.data_ptr() - g_base) // p_size,
                  (a.data_ptr() - a_base) // a_size, p.numel(), row,
                  (w.data_ptr() - w_base) // p_size, (m.data_ptr() - m_base) // p_size)
                 for row, p, g, a, w, m in members)


if triton is not None:
    # param offset, grad offset, acc offset, length, output row, importance and anchor offsets
    TABLE_COLUMNS = tl.constexpr(7)

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
    def _update_block(p_ptr, g_ptr, a_ptr, w_ptr, m_ptr, idx, bounds, lr, grad_scale_ptr,
                      threshold, eps, power, factor, cap, FULL: tl.constexpr,
                      FAST_POWER: tl.constexpr, APPLY_SCALING: tl.constexpr,
                      PENALTY: tl.constexpr, SUM_SQUARES: tl.constexpr):
        """Update the elements ``idx`` in place; return how many were updated and non-finite,
        and with ``SUM_SQUARES`` the sum of the finite gradients' squares (else 0).

        Stores are masked per row of ``idx`` (32 bytes of params): a row with an update is
        written whole, masked-out elements with the values just read, so stores stay vectors.
        ``PENALTY`` 1 adds ``factor * w * (p - m)`` to the gradient; 2 pulls each new value
        toward ``m`` by ``c / (1 + c)``, ``c = min(factor * w * eta, cap)``.
        """
        if FULL:
            p = tl.load(p_ptr + idx)
            g = tl.load(g_ptr + idx, eviction_policy="evict_first").to(tl.float32)
            a = tl.load(a_ptr + idx)
            if PENALTY != 0:
                w = tl.load(w_ptr + idx, eviction_policy="evict_first").to(tl.float32)
                m = tl.load(m_ptr + idx, eviction_policy="evict_first").to(tl.float32)
        else:
            p = tl.load(p_ptr + idx, mask=bounds, other=0.0)
            g = tl.load(g_ptr + idx, mask=bounds, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            a = tl.load(a_ptr + idx, mask=bounds, other=0.0)
            if PENALTY != 0:
                w = tl.load(w_ptr + idx, mask=bounds, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                m = tl.load(m_ptr + idx, mask=bounds, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
        if grad_scale_ptr is not None:
            g = g / tl.load(grad_scale_ptr).to(tl.float32)
        if PENALTY == 1:
            g = g + factor * (w * (p.to(tl.float32) - m))
        finite = tl.abs(g) < float("inf")
        mask = finite & (g * g > threshold)
        nonfinite = ~finite
        if not FULL:
            nonfinite = nonfinite & bounds
        squares = 0.0
        if SUM_SQUARES:  # out of bounds g is 0
            squares = tl.sum(tl.where(finite, g * g, 0.0))

        if FAST_POWER == 1:
            new_a = a + tl.abs(g)
        elif FAST_POWER == 2:
            new_a = a + g * g
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

        write = tl.max(mask.to(tl.int32), axis=1)[:, None] != 0
        if not FULL:
            write = write & bounds
        tl.store(p_ptr + idx, tl.where(mask, new_p, p), mask=write)
        tl.store(a_ptr + idx, tl.where(mask, new_a, a), mask=write)
        return tl.sum(mask.to(tl.int32)), tl.sum(nonfinite.to(tl.int32)), squares

    @triton.jit
    def _classp_kernel(p_ptr, g_ptr, a_ptr, w_ptr, m_ptr, table_ptr, num_chunks, counts_ptr,
                       lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, threshold, eps, power,
                       factor, cap, thresholds_ptr, sums_ptr, sizes_ptr,
                       FAST_POWER: tl.constexpr, APPLY_SCALING: tl.constexpr,
                       PENALTY: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """Update the chunks ``program_id``, ``program_id + num_programs``, ... of the table; add
        up their counts per output row. lr is read from ``lr_ptr``, or is ``lr_value`` when
        ``lr_ptr`` is None. ``w_ptr`` and ``m_ptr`` (importances and anchors) are read only
        with a ``PENALTY`` (see ``_update_block``). A row's threshold is read from
        ``thresholds_ptr`` unless it is None (then ``threshold``); unless ``sums_ptr`` is None,
        the finite squared gradients and the elements of each row are added into ``sums_ptr``
        and ``sizes_ptr``."""
        if found_inf_ptr is not None:
            if tl.load(found_inf_ptr) != 0:
                return
        if lr_ptr is not None:
            lr = tl.load(lr_ptr).to(tl.float32)
        else:
            lr = lr_value
        # GROUP elements of params are 32 bytes; offsets are multiples of 16 bytes
        idx = tl.arange(0, BLOCK_SIZE // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        row = tl.full((), -1, tl.int64)  # the output row the counts below belong to
        updated = tl.full((), 0, tl.int32)
        nonfinite = tl.full((), 0, tl.int32)
        squares = tl.full((), 0.0, tl.float32)
        size = tl.full((), 0, tl.int64)
        row_threshold = threshold
        for c in range(tl.program_id(0).to(tl.int64), num_chunks, tl.num_programs(0)):
            chunk = table_ptr + c * TABLE_COLUMNS
            p_offset = tl.load(chunk)
            g_offset = tl.load(chunk + 1)
            a_offset = tl.load(chunk + 2)
            length = tl.load(chunk + 3)
            chunk_row = tl.load(chunk + 4)
            if PENALTY != 0:
                w_offset = tl.load(chunk + 5)
                m_offset = tl.load(chunk + 6)
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
                if PENALTY != 0:
                    w_block = w_ptr + tl.multiple_of(w_offset + start, GROUP // 2)
                    m_block = m_ptr + tl.multiple_of(m_offset + start, GROUP // 2)
                u, n, q = _update_block(p_ptr + tl.multiple_of(p_offset + start, GROUP // 2),
                                        g_ptr + tl.multiple_of(g_offset + start, GROUP // 2),
                                        a_ptr + tl.multiple_of(a_offset + start, 4),
                                        w_block, m_block, idx, None, lr, grad_scale_ptr,
                                        row_threshold, eps, power, factor, cap, True, FAST_POWER,
                                        APPLY_SCALING, PENALTY, sums_ptr is not None)
                updated += u
                nonfinite += n
                squares += q
            if full_end < length:
                w_block = w_ptr
                m_block = m_ptr
                if PENALTY != 0:
                    w_block = w_ptr + tl.multiple_of(w_offset + full_end, GROUP // 2)
                    m_block = m_ptr + tl.multiple_of(m_offset + full_end, GROUP // 2)
                u, n, q = _update_block(p_ptr + tl.multiple_of(p_offset + full_end, GROUP // 2),
                                        g_ptr + tl.multiple_of(g_offset + full_end, GROUP // 2),
                                        a_ptr + tl.multiple_of(a_offset + full_end, 4),
                                        w_block, m_block, idx, idx < length - full_end, lr,
                                        grad_scale_ptr, row_threshold, eps, power, factor, cap,
                                        False, FAST_POWER, APPLY_SCALING, PENALTY,
                                        sums_ptr is not None)
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
    # Keyed on the power path, scaling and penalty; the autotuner adds the dtypes of the tensor
    # arguments.
    _classp_kernel_autotuned = triton.autotune(
        configs=_configs(), key=["FAST_POWER", "APPLY_SCALING", "PENALTY"],
        restore_value=["p_ptr", "a_ptr", "counts_ptr", "sums_ptr", "sizes_ptr"])(_classp_kernel)

    def _launch(kernel, p, g, a, w, m, table, counts, lr, grad_scale, found_inf, threshold, eps,
                power, apply_scaling, penalty, factor, means=(None, None, None), **config):
        """One launch over every chunk of ``table``; ``p``, ``g``, ``a`` (and ``w``, ``m`` with
        a ``penalty`` form other than "none", else None) are the base tensors. ``lr`` is a
        tensor on ``p``'s device or a float; ``factor`` is the penalty's 2 * scale; ``means``
        the per-row thresholds, sums and sizes of ``_mean_buffers`` (None: none)."""
        lr_ptr, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
        num_chunks = table.shape[0]
        kernel[(_grid(num_chunks, p.device),)](
            p, g, a, w, m, table, num_chunks, counts, lr_ptr, lr_value, grad_scale, found_inf,
            threshold, eps, power, factor, PROXIMAL_CAP, *means, FAST_POWER=_power_path(power),
            APPLY_SCALING=apply_scaling, PENALTY=PENALTY_PATHS[penalty],
            GROUP=32 // p.element_size(), **config)

    @functools.lru_cache
    def _tuned_config(device, dtype, power_path, apply_scaling, penalty):
        """The autotuner's choice for one kernel variant, tuned on scratch buffers."""
        configs = _classp_kernel_autotuned.configs
        if len(configs) == 1:
            return configs[0]
        numel = 1 << 22
        p = torch.randn(numel, device=device).to(dtype)
        g = torch.randn(numel, device=device).to(dtype)
        a = torch.rand(numel, device=device)
        w, m = (torch.rand(numel, device=device).to(dtype), p.clone()) if penalty != "none" \
            else (None, None)
        counts = torch.zeros(1, 2, dtype=torch.int64, device=device)
        lr = torch.tensor(1e-3, device=device)
        power = float(power_path) if power_path else 3.0
        _launch(_classp_kernel_autotuned, p, g, a, w, m,
                chunk_table(((0, 0, 0, numel, 0, 0, 0),), device), counts, lr, None, None, 0.0,
                1e-5, power, apply_scaling, penalty, 1.0)
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
                           penalty_scale: float, relative_threshold: float,
                           grad_sq_means: list[Tensor], acc_scales: list[Tensor],
                           rounding_keys: Optional[Tensor], index_offsets: list[int]) -> Tensor:
        """One CLASSP step in place; returns ``(n, 2)`` int64 counts [updated, non-finite].

        ``penalty_form`` "explicit" or "proximal" takes the penalty ``penalty_scale * sum W *
        (p - m)^2`` of the params with an entry in ``importances`` (W) and ``anchors`` (m)
        (SPEC section 4a); "none" with empty lists takes none. ``grad_sq_means`` (one float32
        0-dim tensor per param, or empty) are the relative threshold's gradient means: read
        when ``relative_threshold`` > 0, and refreshed.

        This body is what torch.compile traces: it steps concatenated copies of each dtype group
        and writes them back. Eager calls take ``_classp_step_in_place`` instead.
        """
        counts = _new_counts(params, lr)
        lr, grad_scale, found_inf = _on(counts.device, lr, grad_scale, found_inf)
        old, *means = _mean_buffers(grad_sq_means, threshold, relative_threshold, counts.device)
        for rows in _dtype_groups(params, importances):
            penalty, covered = _penalty_of(rows, importances, penalty_form)
            align = ALIGNMENT // params[rows[0]].element_size()
            numels = [params[i].numel() for i in rows]
            slots = [numel + (-numel) % align for numel in numels]
            lists = (params, grads, accs) + ((importances, anchors) if covered else ())
            flats = [torch.cat([F.pad(ts[i].reshape(-1), (0, slot - numel))
                                for i, numel, slot in zip(rows, numels, slots)]) for ts in lists]
            p, g, a = flats[:3]
            w, m = flats[3:] if covered else (None, None)
            starts = list(itertools.accumulate(slots[:-1], initial=0))
            table = chunk_table(tuple((s, s, s, n, i, s, s)
                                      for s, n, i in zip(starts, numels, rows)), counts.device)
            _launch(wrap_triton(_classp_kernel_autotuned), p, g, a, w, m, table, counts,
                    lr, grad_scale, found_inf, threshold, eps, power, apply_scaling, penalty,
                    2.0 * penalty_scale, means)
            for i, s, n in zip(rows, starts, numels):
                params[i].copy_(p[s:s + n].view_as(params[i]))
                accs[i].copy_(a[s:s + n].view_as(accs[i]))
        _publish_means(grad_sq_means, old, *means[1:])
        return counts

    @classp_step_triton.register_fake
    def _classp_step_fake(params, grads, accs, lr, threshold, eps, power, apply_scaling,
                          grad_scale, found_inf, importances, anchors, penalty_form,
                          penalty_scale, relative_threshold, grad_sq_means, acc_scales,
                          rounding_keys, index_offsets):
        return _new_counts(params, lr)

    def _classp_step_in_place(params, grads, accs, lr, threshold, eps, power, apply_scaling,
                              grad_scale, found_inf, importances, anchors, penalty_form,
                              penalty_scale, relative_threshold, grad_sq_means, acc_scales,
                              rounding_keys, index_offsets):
        """The eager step: one launch per dtype group on the tensors themselves, by address.

        Non-contiguous or misaligned tensors are stepped through contiguous copies.
        """
        counts = _new_counts(params, lr)
        device = counts.device
        # an lr on the CPU is passed by value: no copy to the device
        lr = lr.item() if lr.device.type == "cpu" else lr.to(device)
        grad_scale, found_inf = _on(device, grad_scale, found_inf)
        old, *means = _mean_buffers(grad_sq_means, threshold, relative_threshold, device)
        for rows in _dtype_groups(params, importances):
            penalty, covered = _penalty_of(rows, importances, penalty_form)
            members = [(i, _dense(params[i]), _dense(grads[i]), _dense(accs[i]),
                        _dense(importances[i]) if covered else None,
                        _dense(anchors[i]) if covered else None) for i in rows]
            _, p0, g0, a0, w0, m0 = members[0]
            entries = _entries(members)
            config = _tuned_config(device, p0.dtype, _power_path(power), apply_scaling, penalty)
            _launch(_classp_kernel, p0, g0, a0, w0, m0, _work_table(entries, device), counts,
                    lr, grad_scale, found_inf, threshold, eps, power, apply_scaling, penalty,
                    2.0 * penalty_scale, means, **config.all_kwargs())
            for i, p, _, a, _, _ in members:
                if p is not params[i]:
                    params[i].copy_(p)
                if a is not accs[i]:
                    accs[i].copy_(a)
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
