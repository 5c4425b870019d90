"""The C++ CPU kernel of classp_fused::classp_step_, called as the op: exactness against the
reference, masked-out elements left untouched bit for bit (and memory holding none selected not
written), counts, layouts, argument checks, and the int64 work split (chunks, threads, the CUDA
work table) of tensors of 2^31 elements and more."""
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._C import DispatchKey, DispatchKeySet

from classp_fused import _extension, reference
from helpers import bits, random_like

pytestmark = pytest.mark.skipif(not _extension.has_kernel("CPU"),
                                reason=f"C++ extension not built: {_extension.LOAD_ERROR}")

OP_PACKET = (torch.ops.classp_fused.classp_step_.default if _extension.LOAD_ERROR is None
             else None)
# importances, anchors, penalty_form, penalty_scale, importance_scales, relative_threshold,
# grad_sq_means, acc_scales, rounding_keys, index_offsets
NO_PENALTY = ([], [], "none", 0.0, [], 0.0, [], [], None, [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CHUNK = 1 << 16
RECORD_COLUMNS = 10
# Tolerance of the generic power path (exp2/log2 vs torch.pow): about one rounding of the dtype.
GENERIC_RTOL = {torch.float32: 2e-6, torch.float64: 1e-14, torch.bfloat16: 2 ** -7,
                torch.float16: 2 ** -10}


def OP(*args):
    """The op without a penalty (tests/test_fused_penalty.py steps it with one)."""
    return OP_PACKET(*args, *NO_PENALTY)


def make_case(sizes, dtype, seed=0):
    """Params, grads and accumulators of the given sizes: random, no zeros, accs positive."""
    g = torch.Generator().manual_seed(seed)
    acc_dtype = reference.compute_dtype(torch.empty(0, dtype=dtype))
    params = [random_like(s, dtype, g) for s in sizes]
    grads = [random_like(s, dtype, g) for s in sizes]
    accs = [random_like(s, acc_dtype, g).abs() + 0.1 for s in sizes]
    return params, grads, accs


def run_both(params, grads, accs, *, lr=0.05, threshold=0.3, eps=1e-5, power=1.0,
             apply_scaling=True, grad_scale=None, found_inf=None):
    """Step clones with the op and with the reference; returns (op, reference) results."""
    lr_tensor = torch.tensor(lr, dtype=torch.float64)
    mine = ([p.clone() for p in params], [a.clone() for a in accs])
    ref = ([p.clone() for p in params], [a.clone() for a in accs])
    counts = OP(mine[0], grads, mine[1], lr_tensor, threshold, eps, power, apply_scaling,
                grad_scale, found_inf)
    ref_counts = reference.classp_step_(ref[0], grads, ref[1], lr=lr_tensor, threshold=threshold,
                                        eps=eps, power=power, apply_scaling=apply_scaling,
                                        grad_scale=grad_scale, found_inf=found_inf)
    return (*mine, counts), (*ref, ref_counts)


def assert_matches(mine, ref, dtype, power):
    params, accs, counts = mine
    ref_params, ref_accs, ref_counts = ref
    assert counts.dtype == torch.int64 and counts.shape == (len(params), 2)
    assert torch.equal(counts, ref_counts.reshape(counts.shape))
    for p, rp, a, ra in zip(params, ref_params, accs, ref_accs):
        if power in (1.0, 2.0):  # exact fast paths: the reference's results to the bit
            assert torch.equal(bits(p), bits(rp))
            assert torch.equal(bits(a), bits(ra))
        else:
            torch.testing.assert_close(p, rp, rtol=GENERIC_RTOL[dtype], atol=1e-6)
            torch.testing.assert_close(a, ra, rtol=GENERIC_RTOL[dtype], atol=1e-6)


SIZES = [1, 7, 31, 32, 33, 1000, CHUNK + 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 1.5, 3.0])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_matches_reference(dtype, power, apply_scaling):
    params, grads, accs = make_case(SIZES, dtype)
    mine, ref = run_both(params, grads, accs, power=power, apply_scaling=apply_scaling)
    assert_matches(mine, ref, dtype, power)
    updated = mine[2][:, 0]
    assert 0 < updated.sum() < sum(SIZES)  # the threshold selects some, not all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
def test_grad_scale_and_zero_threshold(dtype, power):
    params, grads, accs = make_case(SIZES, dtype, seed=1)
    grads = [g * 1024 for g in grads]
    mine, ref = run_both(params, grads, accs, threshold=0.0, power=power,
                         grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    assert_matches(mine, ref, dtype, power)
    assert torch.equal(mine[2][:, 0], torch.tensor(SIZES))  # no zeros: every element updates


def test_found_inf_makes_step_a_no_op():
    params, grads, accs = make_case([5, 1000], torch.float32)
    before = [bits(t).clone() for t in params + accs]
    counts = OP(params, grads, accs, torch.tensor(0.1), 0.0, 1e-5, 1.0, True,
                torch.tensor(2.0), torch.tensor(1.0))
    assert torch.equal(counts, torch.zeros(2, 2, dtype=torch.int64))
    assert all(torch.equal(b, bits(t)) for b, t in zip(before, params + accs))


# Bit patterns that must survive untouched: NaNs with payloads (quiet and signalling) and -0.0.
POISON = {torch.float16: [0x7C01, 0xFE55, 0x7FC1, 0x8000],
          torch.bfloat16: [0x7F81, 0xFFC5, 0x7FC1, 0x8000],
          torch.float32: [0x7FA00001, 0xFFC12345, 0x7F800003, 0x80000000],
          torch.float64: [0x7FF0000000000013, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000]}


def poisoned(n, dtype, g):
    """Random values with a quarter of them replaced by the POISON patterns of ``dtype``."""
    raw = bits(random_like(n, dtype, g)).clone()
    width = raw.element_size() * 8
    patterns = [p - (1 << width) if p >= 1 << (width - 1) else p for p in POISON[dtype]]
    picks = torch.randperm(n, generator=g)[:max(1, n // 4)]
    raw[picks] = torch.tensor(patterns, dtype=raw.dtype)[torch.arange(len(picks)) % len(patterns)]
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("n", [1, 13, 64, 1000, CHUNK + 3])
def test_unselected_elements_keep_their_bits(dtype, power, n):
    g = torch.Generator().manual_seed(n)
    acc_dtype = reference.compute_dtype(torch.empty(0, dtype=dtype))
    param, acc = poisoned(n, dtype, g), poisoned(n, acc_dtype, g)
    # Gradients below the threshold, zero, NaN or infinite are never applied.
    grad = random_like(n, dtype, g)
    kind = torch.randint(0, 5, (n,), generator=g)
    grad = torch.where(kind == 1, torch.zeros_like(grad), grad)
    grad = torch.where(kind == 2, torch.full_like(grad, 0.01), grad)
    grad = torch.where(kind == 3, torch.full_like(grad, float("nan")), grad)
    grad = torch.where(kind == 4, torch.full_like(grad, -float("inf")), grad)
    selected = grad.to(acc_dtype).isfinite() & (grad.to(acc_dtype) ** 2 > 0.25)
    param_before, acc_before = bits(param).clone(), bits(acc).clone()

    counts = OP([param], [grad], [acc], torch.tensor(0.1), 0.25, 1e-5, power, True, None, None)

    assert counts.tolist() == [[int(selected.sum()), int((kind >= 3).sum())]]
    assert torch.equal(bits(param)[~selected], param_before[~selected])
    assert torch.equal(bits(acc)[~selected], acc_before[~selected])
    if selected.any():
        assert (bits(acc)[selected] != acc_before[selected]).any()


# For each dtype named in argv[2:], steps a param and an accumulator whose memory is read-only
# but for its first page, with gradients that select elements of the first pages only, or with
# argv[1] "1" also the last element; prints "stepped" and exits 0 if every count is right. A
# write to a read-only page kills it with SIGSEGV.
READ_ONLY_STEP = textwrap.dedent("""
    import ctypes, mmap, sys
    import torch
    import classp_fused  # registers the op

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    g = torch.Generator().manual_seed(0)
    keep = []  # the mappings, alive until the end
    for name in sys.argv[2:]:
        dtype = getattr(torch, name)
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        n = 64 * mmap.PAGESIZE // acc_dtype.itemsize  # 64 pages of accumulator
        first_page = mmap.PAGESIZE // acc_dtype.itemsize  # of accumulator; of param, at least
        grad = torch.full((n,), 0.01, dtype=dtype)
        grad[1::7] = float("nan")
        grad[2::7] = float("inf")
        picks = torch.randperm(first_page, generator=g)[:first_page // 10]
        grad[picks] = (torch.rand(len(picks), generator=g) + 3.0).to(dtype)
        if sys.argv[1] == "1":
            grad[-1] = 3.0
        tensors = []
        for kind in (dtype, acc_dtype):
            memory = mmap.mmap(-1, n * kind.itemsize)
            tensor = torch.frombuffer(memory, dtype=kind)
            tensor.copy_(torch.rand(n, generator=g, dtype=torch.float64).to(kind))
            address = tensor.data_ptr() + mmap.PAGESIZE
            if libc.mprotect(address, len(memory) - mmap.PAGESIZE, mmap.PROT_READ) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
            keep.append(memory)
            tensors.append(tensor)
        counts = torch.ops.classp_fused.classp_step_(
            [tensors[0]], [grad], [tensors[1]], torch.tensor(0.1, dtype=torch.float64), 0.25,
            1e-5, 1.0, True, None, None, [], [], "none", 0.0, [], 0.0, [], [], None, [])
        expected = [len(picks), int((~grad.isfinite()).sum())]
        assert counts.tolist() == [expected], (name, counts.tolist(), expected)
    print("stepped")
""")


def test_memory_of_unselected_blocks_is_not_written():
    """Read-only pages holding no selected element survive a step, for every dtype; the
    control, a selected element in one, shows that a write there is caught."""
    def step(select_in_read_only_page, dtypes):
        return subprocess.run(
            [sys.executable, "-c", READ_ONLY_STEP, str(int(select_in_read_only_page)),
             *[str(dtype).split(".")[1] for dtype in dtypes]],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])

    result = step(False, DTYPES)
    assert result.returncode == 0 and result.stdout.strip() == "stepped", result.stderr
    assert step(True, [torch.float32]).returncode == -signal.SIGSEGV


def test_counts_nonfinite_per_tensor():
    params, grads, accs = make_case([100, 3000, 50], torch.float32, seed=3)
    grads[0][::10] = float("nan")
    grads[1][5] = float("inf")
    grads[1][7] = -float("inf")
    mine, ref = run_both(params, grads, accs, threshold=0.0)
    assert_matches(mine, ref, torch.float32, 1.0)
    assert mine[2].tolist() == [[90, 10], [2998, 2], [50, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_that_overflow_when_unscaled_are_skipped(dtype):
    params, grads, accs = make_case([40, 1000], dtype, seed=8)
    big = torch.finfo(dtype).max / 2
    grads[0][3], grads[1][500] = big, -big  # finite, but not in fp32 after dividing by 0.25
    mine, ref = run_both(params, grads, accs, grad_scale=torch.tensor(0.25))
    assert_matches(mine, ref, dtype, 1.0)
    assert mine[2][:, 1].tolist() == [1, 1]


def test_layouts_empty_scalar_and_noncontiguous():
    g = torch.Generator().manual_seed(4)
    base = poisoned(40 * 66, torch.float32, g).reshape(40, 66)
    base[:, 1:64:2] = random_like((40, 32), torch.float32, g)
    base_bits = bits(base).clone()
    params = [base[:, 1:64:2],                              # strided view: gaps stay untouched
              random_like((64, 48), torch.float32, g).t(),  # transposed, grad alike
              random_like((), torch.float32, g),
              random_like((0, 3), torch.float32, g),
              random_like((5, 7), torch.float32, g)]
    grads = [random_like((40, 32), torch.float32, g),
             random_like((64, 48), torch.float32, g).t(),
             random_like((), torch.float32, g),
             random_like((0, 3), torch.float32, g),
             random_like((7, 5), torch.float32, g).t()]  # grad laid out unlike its param
    accs = [torch.rand(p.shape, generator=g) + 0.1 for p in params]
    accs[1] = (torch.rand(64, 48, generator=g) + 0.1).t()  # laid out like its param
    ref_params = [p.clone() for p in params]
    ref_accs = [a.clone() for a in accs]

    counts = OP(params, grads, accs, torch.tensor(0.1), 0.0, 1e-5, 2.0, True, None, None)
    ref_counts = reference.classp_step_(ref_params, grads, ref_accs, lr=0.1, threshold=0.0,
                                        eps=1e-5, power=2.0, apply_scaling=True)

    assert torch.equal(counts, ref_counts)
    for p, rp, a, ra in zip(params, ref_params, accs, ref_accs):
        assert torch.equal(bits(p), bits(rp)) and torch.equal(bits(a), bits(ra))
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[:, 1:64:2] = False
    assert torch.equal(bits(base)[outside], base_bits[outside])


def test_large_tensor_and_many_tensors():
    g = torch.Generator().manual_seed(5)
    sizes = [2 ** 20 + 3] + torch.randint(0, 5000, (300,), generator=g).tolist()
    params, grads, accs = make_case(sizes, torch.float32, seed=5)
    mine, ref = run_both(params, grads, accs, threshold=0.1, power=2.0)
    assert_matches(mine, ref, torch.float32, 2.0)


def test_mixed_dtypes_in_one_call():
    cases = [make_case([300, 5], dt, seed=i)
             for i, dt in enumerate(DTYPES)]
    params, grads, accs = ([t for case in cases for t in case[k]] for k in range(3))
    mine, ref = run_both(params, grads, accs, power=1.0)
    assert torch.equal(mine[2], ref[2])
    for p, rp in zip(mine[0], ref[0]):
        assert torch.equal(bits(p), bits(rp))


def test_thread_count_does_not_change_results():
    params, grads, accs = make_case([3 * CHUNK + 17, 100, 2 * CHUNK], torch.float32, seed=6)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            p, a = [x.clone() for x in params], [x.clone() for x in accs]
            results.append((OP(p, grads, a, torch.tensor(0.1), 0.2, 1e-5, 1.0, True, None, None),
                            p, a))
    finally:
        torch.set_num_threads(threads)
    for counts, p, a in results[1:]:
        assert torch.equal(counts, results[0][0])
        assert all(torch.equal(x, y) for x, y in zip(p + a, results[0][1] + results[0][2]))


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    params = [random_like((3, 4), torch.float32, g), random_like(0, torch.float32, g),
              random_like((), torch.float32, g), random_like((6, 4), torch.float32, g).t(),
              random_like((5, 8), torch.float32, g)[:, ::2],
              random_like(70, torch.bfloat16, g)]
    grads = [random_like(p.shape, p.dtype, g) for p in params]
    accs = [torch.rand(p.shape, generator=g) + 0.1 for p in params]
    lr = torch.tensor(0.1, dtype=torch.float64)
    torch.library.opcheck(OP_PACKET, (params, grads, accs, lr, 0.1, 1e-5, 1.0, True, None, None,
                                      *NO_PENALTY))
    torch.library.opcheck(OP_PACKET, (params, grads, accs, lr, 0.0, 1e-5, 1.5, False,
                                      torch.tensor(2.0), torch.tensor(0.0), *NO_PENALTY))


def call_cpu_kernel(params, grads, accs, lr=None, grad_scale=None):
    """The CPU kernel itself, whatever devices the arguments are on."""
    lr = torch.tensor(0.1) if lr is None else lr
    return OP_PACKET.redispatch(DispatchKeySet(DispatchKey.CPU), params, grads, accs, lr, 0.0,
                                1e-5, 1.0, True, grad_scale, None, *NO_PENALTY)


def test_argument_checks():
    p, g, a = make_case([4, 4], torch.float32)
    with pytest.raises(RuntimeError, match="same length"):
        OP(p, g[:1], a, torch.tensor(0.1), 0.0, 1e-5, 1.0, True, None, None)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype"):
        OP(p, [g[0], g[1].double()], a, torch.tensor(0.1), 0.0, 1e-5, 1.0, True, None, None)
    with pytest.raises(RuntimeError, match=r"accs\[0\] has dtype"):
        OP([p[0].bfloat16()], [g[0].bfloat16()], [a[0].half()], torch.tensor(0.1), 0.0,
           1e-5, 1.0, True, None, None)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float16"):
        OP([p[0].int()], [g[0].int()], [a[0]], torch.tensor(0.1), 0.0, 1e-5, 1.0, True, None,
           None)
    with pytest.raises(RuntimeError, match=r"accs\[1\] has shape"):
        OP(p, g, [a[0], a[1][:3]], torch.tensor(0.1), 0.0, 1e-5, 1.0, True, None, None)
    with pytest.raises(RuntimeError, match="lr must be a one-element"):
        OP(p, g, a, torch.tensor([0.1, 0.2]), 0.0, 1e-5, 1.0, True, None, None)
    with pytest.raises(RuntimeError, match="threshold must be >= 0"):
        OP(p, g, a, torch.tensor(0.1), -1.0, 1e-5, 1.0, True, None, None)
    with pytest.raises(RuntimeError, match="power must be"):
        OP(p, g, a, torch.tensor(0.1), 0.0, 1e-5, 0.0, True, None, None)
    with pytest.raises(RuntimeError, match="internal overlap"):
        OP([torch.zeros(1).expand(4)], [g[0]], [a[0]], torch.tensor(0.1), 0.0, 1e-5, 1.0, True,
           None, None)


def test_device_checks():
    p, g, a = make_case([4, 4], torch.float32)
    meta = torch.empty(4, device="meta")
    with pytest.raises(RuntimeError, match=r"params\[1\] is on meta, expected cpu"):
        call_cpu_kernel([p[0], meta], g, a)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta"):
        call_cpu_kernel(p, [meta, g[1]], a)
    with pytest.raises(RuntimeError, match=r"accs\[1\] is on meta"):
        call_cpu_kernel(p, g, [a[0], meta])
    with pytest.raises(RuntimeError, match="lr is on meta"):
        call_cpu_kernel(p, g, a, lr=torch.tensor(0.1, device="meta"))
    with pytest.raises(RuntimeError, match="grad_scale is on meta"):
        call_cpu_kernel(p, g, a, grad_scale=torch.tensor(2.0, device="meta"))


def check_plan(numels, num_parts):
    table, part_starts, work_table = torch.ops.classp_fused._chunk_plan(numels, num_parts)
    assert table.dtype == torch.int64
    tensor, begin, end = table.unbind(1)
    # Chunks tile every tensor in order, each within one CHUNK-aligned block of it.
    assert bool((end > begin).all()) and bool(((end - 1) // CHUNK == begin // CHUNK).all())
    same = tensor[1:] == tensor[:-1]
    assert torch.equal(begin[1:][same], end[:-1][same])
    assert bool((tensor[1:] > tensor[:-1])[~same].all()) and bool((begin[1:][~same] == 0).all())
    totals = torch.zeros(len(numels), dtype=torch.int64).index_add_(0, tensor, end - begin)
    assert totals.tolist() == list(numels)
    if num_parts == 1:  # whole blocks
        expected = [[t, b, min(b + CHUNK, n)] for t, n in enumerate(numels)
                    for b in range(0, n, CHUNK)]
        assert len(table) == len(expected)
        if expected:
            assert table[0].tolist() == expected[0] and table[-1].tolist() == expected[-1]
    # Parts: consecutive runs of chunks with equal element counts, up to one element.
    assert len(part_starts) == num_parts + 1
    assert part_starts[0] == 0 and part_starts[-1] == len(table)
    done = torch.cat([torch.zeros(1, dtype=torch.int64), (end - begin).cumsum(0)])
    per_part = done[part_starts].diff()
    assert int(per_part.max() - per_part.min()) <= 1
    check_work_table(numels, work_table)
    return table, part_starts, work_table


def check_work_table(numels, work_table):
    """The CUDA kernel's table: a record per non-empty tensor, then (slot, chunk) per chunk."""
    rows = [i for i, n in enumerate(numels) if n > 0]
    records = work_table[:RECORD_COLUMNS * len(rows)].view(-1, RECORD_COLUMNS)
    assert records[:, 3].tolist() == [numels[i] for i in rows]
    assert records[:, 4].tolist() == rows
    assert not records[:, :3].any() and not records[:, 5:].any()  # addresses 0 in the plan
    entries = work_table[RECORD_COLUMNS * len(rows):]
    expected = [slot << 32 | chunk for slot, i in enumerate(rows)
                for chunk in range(-(-numels[i] // CHUNK))]
    assert len(entries) == len(expected)
    if expected:  # the ends and a sample: tables past 2^31 elements are long
        picks = torch.linspace(0, len(expected) - 1, 50).long().tolist()
        assert [entries[k].item() for k in picks] == [expected[k] for k in picks]


def test_chunk_plan_beyond_int32():
    numels = [2 ** 31 - 1, 2 ** 31 + 7, 0, 3, 2 ** 34 + 5]
    table, _, _ = check_plan(numels, 1)
    last_of_second = table[table[:, 0] == 1][-1].tolist()
    assert last_of_second == [1, 2 ** 31, 2 ** 31 + 7]
    assert table[-1].tolist() == [4, 2 ** 34, 2 ** 34 + 5]
    table, part_starts, _ = check_plan(numels, 2)
    cut = sum(numels) // 2 - sum(numels[:4])  # the second thread starts there in the last tensor
    assert cut > 2 ** 32
    assert table[part_starts[1]][:2].tolist() == [4, cut]
    assert table[part_starts[1] - 1][1:].tolist() == [cut // CHUNK * CHUNK, cut]
    check_plan(numels, 7)


def test_chunk_plan_many_small_tensors():
    numels = [1, 0] * 100 + [5 * CHUNK] + [3] * 60
    _, _, work_table = check_plan(numels, 1)
    assert len(work_table) == 161 * RECORD_COLUMNS + 165  # 161 tensors, 165 chunks
    check_plan(numels, 2)
    check_plan([], 2)
    check_plan([7], 3)
    check_plan([2, 0, 1], 8)
