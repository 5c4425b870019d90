"""The C++ CPU kernel with compressed accumulators (bfloat16, 8-bit block codes;
classp_fused.state_formats) against the reference step: accumulator bits, codes and scales bit for
bit, params as in the float32-state tests, counts identical, over several steps; blocks left
untouched byte for byte; the op's checks of the compressed arguments."""
import pytest
import torch

from classp_fused import _extension, state_formats
from classp_fused.backends import classp_step_
from classp_fused.backends.step_spec import CompressedState, Penalty
from helpers import bits, random_like

pytestmark = pytest.mark.skipif(not _extension.has_kernel("CPU"),
                                reason=f"C++ extension not built: {_extension.LOAD_ERROR}")

BLOCK = state_formats.BLOCK
SIZES = [0, 1, 255, 256, 257, 4096 + 13, 70000]
FORMATS = ["bf16", "8bit"]
# g*g > threshold for standard-normal g selects no element, about 1%, 50%, all elements
THRESHOLDS = {"none": 1e3, "1%": 6.63, "50%": 0.455, "all": 0.0}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
HYPER = dict(lr=0.05, eps=1e-5, power=1.0, apply_scaling=True)


def random_accumulator(n: int, fmt: str, g: torch.Generator):
    """An accumulator of ``n`` elements in ``fmt`` ("fp32", "fp64" for float64 params, "bf16",
    "8bit") and its 8-bit scales (else None): random positive values spanning six binades per
    block (none zero), rounded into the format."""
    values = torch.rand(n, generator=g) * 2.0 ** torch.randint(-6, 0, (n,), generator=g) + 1e-4
    values = values * 2.0 ** torch.randint(-20, 20, (state_formats.num_blocks(n),),
                                           generator=g).repeat_interleave(BLOCK)[:n]
    if fmt in ("fp32", "fp64"):
        return values.to(torch.float64 if fmt == "fp64" else torch.float32), None
    key = torch.randint(0, 2 ** 32, (), generator=g)
    random_bits = state_formats.element_bits(key, torch.arange(n))
    if fmt == "bf16":
        return state_formats.round_bf16(values, random_bits), None
    return state_formats.encode_blocks(values, random_bits)


class Case:
    """Params, accumulators (with scales) and index offsets of tensors of ``sizes`` in
    ``formats``; fresh gradients and rounding keys per step."""

    def __init__(self, sizes, formats, dtype=torch.float32, seed=0, offsets=None, dtypes=None):
        self.g = torch.Generator().manual_seed(seed)
        self.sizes = sizes
        self.dtypes = [dtype] * len(sizes) if dtypes is None else dtypes
        self.params = [random_like(n, dt, self.g) for n, dt in zip(sizes, self.dtypes)]
        pairs = [random_accumulator(n, fmt, self.g) for n, fmt in zip(sizes, formats)]
        self.accs = [a for a, _ in pairs]
        self.scales = [s for _, s in pairs]
        self.offsets = [0] * len(sizes) if offsets is None else offsets

    def grads(self, scale=1.0):
        return [random_like(n, dt, self.g, scale) for n, dt in zip(self.sizes, self.dtypes)]

    def keys(self):
        return torch.randint(0, 2 ** 32, (len(self.sizes),), generator=self.g)

    def state(self):
        """Copies of (params, accs, scales) to step."""
        return ([p.clone() for p in self.params], [a.clone() for a in self.accs],
                [None if s is None else s.clone() for s in self.scales])


def step(state, grads, keys, offsets, backend, **hyper):
    """One step of ``backend`` on ``state`` (params, accs, scales); returns the counts."""
    params, accs, scales = state
    return classp_step_(params, grads, accs, compressed=CompressedState(scales, keys, offsets),
                        backend=backend, **hyper)


def step_both(mine, ref, grads, keys, offsets, **hyper):
    """One step of the cpp backend on ``mine`` and of the reference on ``ref``; both counts."""
    return [step(mine, grads, keys, offsets, "cpp", **hyper),
            step(ref, grads, keys, offsets, "torch", **hyper)]


def assert_same(mine, ref, counts, exact_params=True):
    """Counts equal, accumulators and scales bit for bit, params bit for bit or to the
    tolerance of the float32-state tests."""
    assert torch.equal(counts[0], counts[1])
    for p, rp in zip(mine[0], ref[0]):
        if exact_params:
            assert torch.equal(bits(p), bits(rp))
        else:
            torch.testing.assert_close(p, rp, **TOLERANCE[p.dtype])
    for a, ra in zip(mine[1], ref[1]):
        assert a.dtype == ra.dtype and torch.equal(bits(a), bits(ra))
    for s, rs in zip(mine[2], ref[2]):
        assert (s is None) == (rs is None)
        if s is not None:
            assert torch.equal(bits(s), bits(rs))


def run_steps(case, steps=3, grad_scale=1.0, exact_params=True, grads=None, **hyper):
    """``steps`` steps of both backends from the case's state (with the case's fresh gradients,
    or ``grads()``), compared after each; returns the summed counts."""
    mine, ref = case.state(), case.state()
    total = torch.zeros(len(case.sizes), 2, dtype=torch.int64)
    for _ in range(steps):
        step_grads = case.grads(grad_scale) if grads is None else grads()
        counts = step_both(mine, ref, step_grads, case.keys(), case.offsets,
                           **{**HYPER, **hyper})
        assert_same(mine, ref, counts, exact_params)
        total += counts[0]
    return total


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("selected", list(THRESHOLDS))
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_matches_reference_over_steps(fmt, n, selected, power):
    case = Case([n], [fmt], seed=n)
    counts = run_steps(case, threshold=THRESHOLDS[selected], power=power)
    if selected in ("none", "all"):
        assert counts[0, 0] == (3 * n if selected == "all" else 0)
    elif n >= 4096:
        assert 0 < counts[0, 0] < 3 * n


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("power", [1.5, 0.5])
def test_generic_power_rounds_the_same_up_to_ulps(fmt, power):
    """exp2/log2 and torch.pow differ by ulps, so a rare element may round to the neighbouring
    value; everything else is bit for bit."""
    case = Case([70000], [fmt], seed=3)
    mine, ref = case.state(), case.state()
    counts = step_both(mine, ref, case.grads(), case.keys(), case.offsets,
                       **{**HYPER, "threshold": 0.3, "power": power})
    assert torch.equal(counts[0], counts[1])
    torch.testing.assert_close(mine[0][0], ref[0][0], **TOLERANCE[torch.float32])
    a, ra = mine[1][0], ref[1][0]
    differ = bits(a) != bits(ra)
    assert int(differ.sum()) <= 5
    assert bool(((bits(a).int() - bits(ra).int()).abs()[differ] == 1).all())  # neighbours
    if fmt == "8bit":
        assert torch.equal(mine[2][0], ref[2][0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_scaling(fmt):
    run_steps(Case([4096 + 13], [fmt], seed=4), threshold=0.455, apply_scaling=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grad_scale_and_found_inf(fmt):
    case = Case([70000, 257], [fmt, fmt], seed=5)
    mine, ref = case.state(), case.state()
    for found in (0.0, 1.0, 0.0):
        before = [bits(t).clone() for group in mine for t in group if t is not None]
        hyper = {**HYPER, "threshold": 0.455, "grad_scale": torch.tensor(1024.0),
                 "found_inf": torch.tensor(found)}
        counts = step_both(mine, ref, case.grads(1024.0), case.keys(), case.offsets, **hyper)
        assert_same(mine, ref, counts)
        after = [bits(t) for group in mine for t in group if t is not None]
        if found:
            assert not counts[0].any()
            assert all(torch.equal(b, t) for b, t in zip(before, after))
        else:
            assert bool((counts[0][:, 0] > 0).all())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("form", ["explicit", "proximal"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fused_penalty(fmt, form, power):
    case = Case([70000, 300], [fmt, fmt], seed=6)
    g = torch.Generator().manual_seed(60)
    penalty = Penalty(form, 0.7, [torch.rand(70000, generator=g), None],
                      [random_like(70000, torch.float32, g), None])
    run_steps(case, exact_params=False, threshold=0.455, power=power, penalty=penalty)


@pytest.mark.parametrize("fmt", FORMATS)
def test_relative_threshold_and_gradient_means(fmt):
    """Each step starts both backends from the same means (their sums may differ by ulps)."""
    case = Case([70000, 4096 + 13], [fmt, "fp32"], seed=7)
    mine, ref = case.state(), case.state()
    means = [torch.zeros(()) for _ in case.sizes]
    for _ in range(3):
        keys, grads = case.keys(), case.grads()
        ref_means = [s.clone() for s in means]
        hyper = {**HYPER, "threshold": 0.1, "relative_threshold": 1.5}
        counts = [step(mine, grads, keys, case.offsets, "cpp", grad_sq_means=means, **hyper),
                  step(ref, grads, keys, case.offsets, "torch", grad_sq_means=ref_means,
                       **hyper)]
        assert_same(mine, ref, counts)
        for s, rs in zip(means, ref_means):
            torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert all(bool(s > 0) for s in means)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_gradients_are_skipped_and_counted(fmt):
    case = Case([70000, 257], [fmt, fmt], seed=8)

    def grads():
        step_grads = case.grads()
        step_grads[0][::97] = float("nan")
        step_grads[0][5::211] = float("inf")
        step_grads[1][7::50] = -float("inf")
        return step_grads

    counts = run_steps(case, grads=grads, threshold=0.455)
    nonfinite = torch.zeros(70000, dtype=torch.bool)
    nonfinite[::97] = nonfinite[5::211] = True
    assert counts[:, 1].tolist() == [3 * int(nonfinite.sum()), 3 * 5]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_reduced_precision_params(fmt, dtype, power):
    run_steps(Case([70000, 257, 1], [fmt] * 3, dtype=dtype, seed=9), threshold=0.455,
              power=power)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_params(fmt):
    """Accumulators (contiguous) follow the params' row-major order; gaps stay untouched."""
    g = torch.Generator().manual_seed(10)
    base = random_like((300, 81), torch.float32, g)
    params = [base[:, ::2], random_like((100, 70), torch.float32, g).t()]
    grads = [random_like(p.shape, torch.float32, g) for p in params]
    pairs = [random_accumulator(p.numel(), fmt, g) for p in params]
    accs = [a.reshape(p.shape) for (a, _), p in zip(pairs, params)]
    scales = [s for _, s in pairs]
    ref_base = base.clone()
    ref_params = [ref_base[:, ::2], params[1].clone()]
    assert not ref_params[1].is_contiguous()
    mine = (params, [a.clone() for a in accs], [None if s is None else s.clone() for s in scales])
    ref = (ref_params, [a.clone() for a in accs],
           [None if s is None else s.clone() for s in scales])
    base_bits = bits(base).clone()
    keys = torch.tensor([11, 12])
    counts = step_both(mine, ref, grads, keys, [0, 0], **HYPER, threshold=0.455)
    assert_same(mine, ref, counts)
    assert torch.equal(bits(base)[:, 1::2], base_bits[:, 1::2])
    assert bool((counts[0][:, 0] > 0).all())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mixed_lists_split_between_threads(threads):
    """fp32, bf16, 8-bit and float64 accumulators in one call; with 2 threads the second
    starts inside the 8-bit tensor, at a block."""
    sizes = [1001, 70000, 5000, 300, 777, 4096]
    formats = ["fp32", "8bit", "bf16", "8bit", "fp64", "bf16"]
    dtypes = [torch.float32] * 4 + [torch.float64, torch.bfloat16]
    case = Case(sizes, formats, seed=11, dtypes=dtypes)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counts = run_steps(case, threshold=0.455)
    finally:
        torch.set_num_threads(saved)
    assert bool((counts[:, 0] > 0).all())


def test_chunk_plan_cuts_8bit_tensors_at_blocks():
    numels, alignments = [1001, 70000, 5000], [1, BLOCK, 1]
    table, part_starts, _ = torch.ops.classp_fused._chunk_plan(numels, 2, alignments)
    cut = sum(numels) // 2 - numels[0]  # where an even split would cut the 8-bit tensor
    assert cut % BLOCK != 0
    assert table[part_starts[1]].tolist() == [1, -(-cut // BLOCK) * BLOCK, 65536]
    for parts in (2, 3, 7, 64):
        table, part_starts, _ = torch.ops.classp_fused._chunk_plan(numels, parts, alignments)
        tensor, begin, end = table.unbind(1)
        assert bool((begin[tensor == 1] % BLOCK == 0).all())
        assert torch.equal(torch.zeros(3, dtype=torch.int64).index_add_(0, tensor, end - begin),
                           torch.tensor(numels))
        assert len(part_starts) == parts + 1 and part_starts[-1] == len(table)
        assert bool((part_starts.diff() >= 0).all())
    with pytest.raises(RuntimeError, match="alignment must divide"):
        torch.ops.classp_fused._chunk_plan(numels, 2, [1, 300, 1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset", [2 ** 32 - 30000, 2 ** 40 + 5])
def test_index_offsets_of_shards(fmt, offset):
    """Bits of elements from a global index; the first straddles 2**32 inside a block."""
    run_steps(Case([70000, 300], [fmt, fmt], seed=12, offsets=[offset, 7]), threshold=0.455)


@pytest.mark.parametrize("fmt", FORMATS)
def test_updated_elements_never_read_back_zero(fmt):
    """Accumulators from zero, tiny updates beside a huge value in every block: every updated
    element reads back positive (8-bit: code 1 at least)."""
    n = 70000
    g = torch.Generator().manual_seed(13)
    values = torch.zeros(n)
    values[::BLOCK] = 1e6
    no_bits = torch.zeros(n, dtype=torch.int64)
    if fmt == "bf16":
        acc, scales = state_formats.round_bf16(values, no_bits), None
    else:
        acc, scales = state_formats.encode_blocks(values, no_bits)
    params = random_like(n, torch.float32, g)
    case_state = ([params], [acc], [scales])
    mine = tuple([None if t is None else t.clone() for t in group] for group in case_state)
    ref = tuple([None if t is None else t.clone() for t in group] for group in case_state)
    for k in range(3):
        grads = [random_like(n, torch.float32, g, scale=1e-12)]
        counts = step_both(mine, ref, grads, torch.tensor([100 + k]), [0], **HYPER,
                           threshold=0.0)
        assert_same(mine, ref, counts)
        assert counts[0][0, 0] == n
        acc = mine[1][0]
        decoded = acc.float() if fmt == "bf16" else state_formats.decode(acc, mine[2][0])
        assert bool((decoded > 0).all())


def test_blocks_without_selected_elements_are_untouched():
    """Every third 8-bit block has no selected element (small, NaN or infinite gradients) and
    a poisoned scale (not a power of two, NaN, infinite, subnormal): its codes and scale stay
    byte for byte; the other blocks are partly selected."""
    n = 70000
    case = Case([n], ["8bit"], seed=14)
    quiet = torch.zeros(state_formats.num_blocks(n), dtype=torch.bool)
    quiet[::3] = True
    poison = torch.tensor([3.0, float("nan"), float("inf"), 2.0 ** -149, -0.0])
    case.scales[0][quiet] = poison.repeat(int(quiet.sum()) // 5 + 1)[:int(quiet.sum())]
    in_quiet = quiet.repeat_interleave(BLOCK)[:n]

    def grads():
        g = case.grads()[0]
        small = 0.01 * g
        small[::7] = float("nan")
        small[3::7] = -float("inf")
        return [torch.where(in_quiet, small, g)]

    mine, ref = case.state(), case.state()
    codes_before, scales_before = mine[1][0].clone(), bits(mine[2][0]).clone()
    for _ in range(2):
        counts = step_both(mine, ref, grads(), case.keys(), case.offsets, **HYPER,
                           threshold=0.455)
        assert_same(mine, ref, counts)
    assert torch.equal(mine[1][0][in_quiet], codes_before[in_quiet])
    assert torch.equal(bits(mine[2][0])[quiet], scales_before[quiet])
    assert not torch.equal(bits(mine[2][0])[~quiet], scales_before[~quiet])
    assert 0 < counts[0][0, 0] < int((~in_quiet).sum())


def test_unselected_bf16_elements_keep_their_bits():
    """Rounding a group back whole keeps the bits of its unselected elements, also NaN payloads
    (quiet and signalling), -0.0 and subnormals."""
    n = 70000
    case = Case([n], ["bf16"], seed=15)
    patterns = torch.tensor([0x7F81, 0xFFC5 - 0x10000, 0x7FC1, 0x8000 - 0x10000, 0x0001],
                            dtype=torch.int16)
    raw = bits(case.accs[0]).clone()
    raw[::5] = patterns.repeat(n // 25 + 1)[:len(raw[::5])]
    case.accs[0] = raw.view(torch.bfloat16)
    grad = case.grads()[0]
    grad[::5] = 0.01
    mine, ref = case.state(), case.state()
    before = bits(mine[1][0]).clone()
    counts = step_both(mine, ref, [grad], case.keys(), case.offsets, **HYPER, threshold=0.455)
    assert_same(mine, ref, counts)
    selected = grad * grad > 0.455
    assert torch.equal(bits(mine[1][0])[~selected], before[~selected])
    assert bool((bits(mine[1][0])[selected] != before[selected]).any())


OP = torch.ops.classp_fused.classp_step_ if _extension.LOAD_ERROR is None else None


def op_call(params, grads, accs, acc_scales, keys, offsets):
    """The op itself (no Python validation): no penalty, no gradient means."""
    return OP(params, grads, accs, torch.tensor(0.1, dtype=torch.float64), 0.0, 1e-5, 1.0, True,
              None, None, [], [], "none", 0.0, [], 0.0, [], acc_scales, keys, offsets)


def bad_arguments():
    """(arguments changed from a valid 8-bit + bf16 call, the error's pattern)."""
    scales = torch.ones(state_formats.num_blocks(70000))
    keys = torch.tensor([1, 2])
    return [
        (dict(acc_scales=[]), r"acc_scales has 0 tensors, but accs\[0\] is uint8"),
        (dict(acc_scales=[scales, scales]), r"acc_scales has 2 tensors, expected one per uint8"),
        (dict(acc_scales=[scales.double()]),
         r"acc_scales\[0\] \(of accs\[0\]\) must be a contiguous float32 tensor of shape "
         r"\(274,\)"),
        (dict(acc_scales=[scales[:-1]]), r"acc_scales\[0\] .* shape \(274,\)"),
        (dict(acc_scales=[scales.reshape(2, 137)]), r"acc_scales\[0\] .* shape \(274,\)"),
        (dict(acc_scales=[torch.ones(548)[::2]]), r"acc_scales\[0\] .* must be a contiguous"),
        (dict(keys=None), r"rounding_keys is required when an accumulator is compressed "
                          r"\(accs\[0\] is Byte\)"),
        (dict(keys=keys.int()), r"rounding_keys must be an int64 tensor of shape \(2,\)"),
        (dict(keys=torch.tensor([1, 2, 3])), r"rounding_keys must be an int64 tensor"),
        (dict(offsets=[0]), r"index_offsets must have one entry per param \(2\), got 1"),
        (dict(offsets=[0, -1]), r"index_offsets\[1\] must be >= 0, got -1"),
    ]


@pytest.mark.parametrize("change,error", bad_arguments())
def test_op_checks_compressed_arguments_and_changes_nothing(change, error):
    case = Case([70000, 4096], ["8bit", "bf16"], seed=16)
    params, accs, scales = case.state()
    args = {**dict(acc_scales=[scales[0]], keys=torch.tensor([1, 2]), offsets=[0, 0]), **change}
    before = [bits(t).clone() for t in params + accs + [scales[0]]]
    with pytest.raises(RuntimeError, match=error):
        op_call(params, case.grads(), accs, args["acc_scales"], args["keys"], args["offsets"])
    assert all(torch.equal(b, bits(t)) for b, t in zip(before, params + accs + [scales[0]]))


def test_op_checks_compressed_accumulators():
    g = torch.Generator().manual_seed(17)
    param = random_like((64, 80), torch.float32, g)
    grad = random_like((64, 80), torch.float32, g)
    transposed = torch.zeros(80, 64, dtype=torch.bfloat16).t()
    with pytest.raises(RuntimeError, match=r"accs\[0\] \(a compressed BFloat16 accumulator\) "
                                           r"must be contiguous"):
        op_call([param], [grad], [transposed], [], torch.tensor([1]), [0])
    with pytest.raises(RuntimeError, match=r"accs\[0\] has dtype BFloat16, expected Double"):
        op_call([param.double()], [grad.double()], [torch.zeros(64, 80, dtype=torch.bfloat16)],
                [], torch.tensor([1]), [0])
    with pytest.raises(RuntimeError, match=r"index_offsets must be empty without rounding_keys"):
        op_call([param], [grad], [torch.zeros(64, 80)], [], None, [0])
    # without compressed accumulators the keys and offsets may be given or not
    op_call([param], [grad], [torch.ones(64, 80)], [], torch.tensor([1]), [5])
    op_call([param], [grad], [torch.ones(64, 80)], [], None, [])


def test_opcheck_with_compressed_accumulators():
    case = Case([300, 4096 + 13, 70], ["8bit", "bf16", "fp32"], seed=18)
    params, accs, scales = case.state()
    torch.library.opcheck(OP.default, (params, case.grads(), accs,
                                       torch.tensor(0.1, dtype=torch.float64), 0.455, 1e-5, 1.0,
                                       True, None, None, [], [], "none", 0.0, [], 0.0, [],
                                       [scales[0]], torch.tensor([1, 2, 3]), [0, 0, 9]))
