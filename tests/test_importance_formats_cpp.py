"""The C++ CPU kernels read a penalty's importance in every importance format
(classp_fused/state_formats.py: the param's dtype, bfloat16, 8-bit codes with block scales).

The fused step (backend "cpp") against the reference (backend "torch") bit for bit: each param
dtype, format, form and power; odd sizes, several tensors in one call, tensors split between two
threads anywhere, non-contiguous params with contiguous importances, lists mixing formats,
tensors without a penalty and compressed accumulators. The penalty ops against float64 math on
the decoded importances. Bad formats and scales are refused by every op, changing nothing."""
import pytest
import torch

from classp_fused import _extension, state_formats
from classp_fused.backends import classp_step_
from classp_fused.backends.step_spec import CompressedState, Penalty
from compressed_cases import accumulator_values, step_keys, stored
from helpers import bits, laid_out, random_like

pytestmark = pytest.mark.skipif(not _extension.has_kernel("CPU"),
                                reason=f"C++ extension not built: {_extension.LOAD_ERROR}")

STEP_OP = torch.ops.classp_fused.classp_step_ if _extension.LOAD_ERROR is None else None
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORMS = ("explicit", "proximal")
STORAGE = {"bf16": torch.bfloat16, "8bit": torch.uint8}
HYPER = dict(lr=0.05, threshold=0.01, eps=1e-5, apply_scaling=True)
SCALE = 0.5
# odd sizes: a tensor past a work chunk (65536) and the per-thread minimum, tails of every
# length class, a 2-d tensor
SHAPES = [(4097,), (70001,), (257,), (33, 129)]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6),
             torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture(autouse=True)
def two_threads():
    """Two threads: a call over more than 2 * 32768 elements is split between them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def importance_values(shape, g):
    """Positive float32 values spread over 2**-30 .. 2**10 (an 8-bit block uses many codes,
    its small values below 2**-31 of the block scale), every 13th an exact zero."""
    n = torch.Size(shape).numel()
    x = torch.exp2(torch.rand(n, generator=g) * 40 - 30) * (0.5 + torch.rand(n, generator=g))
    x[::13] = 0.0
    return x.view(shape)


def stored_importance(shape, dtype, g):
    """An importance of ``shape`` stored as ``dtype`` (contiguous): (stored, scales or None)."""
    return state_formats.encode_importance(importance_values(shape, g), dtype)


def make_case(shapes, dtype, g, layout="contiguous"):
    """Params, grads and float32 accumulators of ``shapes`` laid out as ``layout``, and anchors
    near the params (contiguous)."""
    params = [laid_out(s, dtype, g, layout) for s in shapes]
    grads = [laid_out(s, dtype, g, layout, 0.6) for s in shapes]
    accs = [laid_out(s, torch.float32, g, layout).abs() + 0.01 for s in shapes]
    anchors = [(p.float() + random_like(p.shape, torch.float32, g, 0.5)).to(dtype).contiguous()
               for p in params]
    return params, grads, accs, anchors


def clones(tensors):
    return [None if t is None else t.clone() for t in tensors]


def step(backend, params, grads, accs, penalty, power, compressed=None):
    """One step of clones of ``params`` and ``accs`` (and of ``compressed``'s scales) with
    gradient means poisoned with NaN (written, not read: tau = 0); returns (params, accs,
    scales, means, counts)."""
    params, accs = clones(params), clones(accs)
    means = [torch.tensor(float("nan"), dtype=torch.float64 if p.dtype == torch.float64
                          else torch.float32) for p in params]
    if compressed is not None:
        compressed = CompressedState(clones(compressed.scales), compressed.keys,
                                     compressed.offsets)
    counts = classp_step_(params, grads, accs, **HYPER, power=power, penalty=penalty,
                          grad_sq_means=means, compressed=compressed, backend=backend)
    scales = [] if compressed is None else [s for s in compressed.scales if s is not None]
    return params, accs, scales, means, counts


def assert_same_bits(mine, theirs):
    """Two results of ``step``: params, accumulators, their scales and counts bit for bit; the
    gradient means (sums in another order) to float32 rounding, none left NaN."""
    names = ("params", "accs", "acc scales")
    for name, ours, refs in zip(names, mine, theirs):
        assert len(ours) == len(refs)
        for i, (a, b) in enumerate(zip(ours, refs)):
            assert a.dtype == b.dtype and a.stride() == b.stride(), (name, i)
            assert torch.equal(bits(a), bits(b)), (
                f"{name}[{i}]: {int((bits(a) != bits(b)).sum())} elements differ")
    for a, b in zip(mine[3], theirs[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert torch.equal(mine[4], theirs[4])
    assert mine[4][:, 0].sum() > 0  # a step that selects nothing would compare nothing


@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fmt", sorted(STORAGE))
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_the_step_reads_each_format_as_the_reference_does(dtype, fmt, form, power):
    g = torch.Generator().manual_seed(1)
    params, grads, accs, anchors = make_case(SHAPES, dtype, g)
    weights, scales = zip(*[stored_importance(s, STORAGE[fmt], g) for s in SHAPES])
    penalty = Penalty(form, SCALE, weights, anchors, scales)
    mine = step("cpp", params, grads, accs, penalty, power)
    reference = step("torch", params, grads, accs, penalty, power)
    if power == 1.5:  # the generic power's exp2 and log2 are ulps from torch's
        assert torch.equal(mine[4], reference[4])
        for ours, refs in zip(mine[:2], reference[:2]):
            for a, b in zip(ours, refs):
                torch.testing.assert_close(a, b, **TOLERANCE[a.dtype])
    else:
        assert_same_bits(mine, reference)
    if dtype == torch.float32:  # the same step with the decoded values in float32
        decoded = [state_formats.importance_values(w, s, torch.float32)
                   for w, s in zip(weights, scales)]
        plain = step("cpp", params, grads, accs, Penalty(form, SCALE, decoded, anchors), power)
        assert_same_bits(mine, plain)


@pytest.mark.parametrize("first", [0, 3, 300])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_tensor_split_between_threads(dtype, form, first):
    """An 8-bit importance whose tensor two threads share: the even split falls inside one of
    its 8-bit blocks (the kernel moves it to the block's end)."""
    shapes = [(first,), (70001,)] if first else [(70001,)]
    numels = [s[0] for s in shapes]
    table, part_starts, _ = torch.ops.classp_fused._chunk_plan(numels, 2, [])
    cut = table[part_starts[1]]
    assert cut[0] == len(shapes) - 1 and cut[1] % state_formats.BLOCK != 0
    g = torch.Generator().manual_seed(2 + first)
    params, grads, accs, anchors = make_case(shapes, dtype, g)
    weights, scales = zip(*[stored_importance(s, torch.uint8, g) for s in shapes])
    penalty = Penalty(form, SCALE, weights, anchors, scales)
    assert_same_bits(step("cpp", params, grads, accs, penalty, 2.0),
                     step("torch", params, grads, accs, penalty, 2.0))


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
@pytest.mark.parametrize("fmt", sorted(STORAGE))
@pytest.mark.parametrize("form", FORMS)
def test_params_laid_out_unlike_their_contiguous_importances(form, fmt, layout):
    """Transposed and gapped params (stepped on contiguous copies), and misaligned ones (one
    element into their storage, stepped in place)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 257), (17, 29)]
    params, grads, accs, anchors = make_case(shapes, torch.float32, g, layout)
    weights, scales = zip(*[stored_importance(p.shape, STORAGE[fmt], g) for p in params])
    assert all(w.is_contiguous() and (p.storage_offset() == 1 if layout == "offset"
                                      else not p.is_contiguous())
               for w, p in zip(weights, params))
    penalty = Penalty(form, SCALE, weights, anchors, scales)
    assert_same_bits(step("cpp", params, grads, accs, penalty, 2.0),
                     step("torch", params, grads, accs, penalty, 2.0))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_lists_mixing_formats_accumulators_and_tensors_without_a_penalty(dtype, form):
    """Per tensor an importance format (or no penalty) and an accumulator format, and a float64
    param with its own dtype's importance."""
    g = torch.Generator().manual_seed(4)
    rows = [((5000,), None, "8bit"), ((70001,), "8bit", "fp32"), ((4099,), "param", "bf16"),
            ((1000,), "8bit", "8bit"), ((513,), "bf16", "fp32"), ((3, 300), "8bit", "bf16"),
            ((257,), None, "fp32"), ((600,), "param", "fp32")]
    params, grads, _, anchors = make_case([shape for shape, _, _ in rows], dtype, g)
    params[-1], grads[-1], anchors[-1] = (t.double() for t in (params[-1], grads[-1],
                                                              anchors[-1]))
    weights, weight_scales, accs, acc_scales = [], [], [], []
    for (shape, fmt, acc_fmt), p in zip(rows, params):
        if fmt == "bf16" and dtype == torch.bfloat16:
            fmt = "8bit"
        storage = p.dtype if fmt == "param" else STORAGE.get(fmt)
        weight, scale = (None, None) if fmt is None else stored_importance(shape, storage, g)
        weights.append(weight)
        weight_scales.append(scale)
        acc, acc_scale = stored(accumulator_values(shape, g), acc_fmt, g)
        accs.append(acc.double() if p.dtype == torch.float64 else acc)
        acc_scales.append(acc_scale)
    penalty = Penalty(form, SCALE, weights, [None if w is None else m
                                             for w, m in zip(weights, anchors)], weight_scales)
    compressed = CompressedState(acc_scales, step_keys(len(rows), 3), [0] * len(rows))
    assert_same_bits(step("cpp", params, grads, accs, penalty, 2.0, compressed),
                     step("torch", params, grads, accs, penalty, 2.0, compressed))


def penalty_op_case(dtype, fmt, g):
    """Params (the last transposed), grads, importances stored in ``fmt`` with their scales
    (those of the uint8 ones), anchors, and the importances' float64 values."""
    shapes = SHAPES[:3] + [(129, 33)]
    params = [random_like(s, dtype, g) for s in shapes]
    params[-1] = params[-1].t()
    grads = [random_like(p.shape, dtype, g, 0.6) for p in params]
    stored_weights = [stored_importance(p.shape, STORAGE[fmt], g) for p in params]
    weights = [w for w, _ in stored_weights]
    scales = [s for _, s in stored_weights if s is not None]
    anchors = [(p.float() + random_like(p.shape, torch.float32, g, 0.5)).to(dtype)
               for p in params]
    values = [state_formats.importance_values(w, s, torch.float64) for w, s in stored_weights]
    return params, grads, weights, scales, anchors, values


FACTOR = 1.5


def add_penalty_grad(params, grads, weights, scales, anchors, grad_scale):
    """The op on clones of ``grads``; returns them."""
    grads = clones(grads)
    torch.ops.classp_fused.add_penalty_grad_(params, weights, scales, anchors, grads, FACTOR,
                                             grad_scale)
    return grads


def proximal_step(params, weights, scales, anchors, etas):
    """The op on clones of ``params``, eta a tensor per even param, a float per odd one;
    returns them."""
    params = clones(params)
    torch.ops.classp_fused.proximal_step_(
        params, weights, scales, anchors,
        [eta if i % 2 == 0 else None for i, eta in enumerate(etas)],
        [0.0 if i % 2 == 0 else 0.3 for i in range(len(etas))], FACTOR)
    return params


@pytest.mark.parametrize("fmt", sorted(STORAGE))
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_add_penalty_grad_op_reads_each_format(dtype, fmt):
    g = torch.Generator().manual_seed(5)
    params, grads, weights, scales, anchors, values = penalty_op_case(dtype, fmt, g)
    grad_scale = torch.tensor(0.25)
    result = add_penalty_grad(params, grads, weights, scales, anchors, grad_scale)
    for r, p, grad, w, m in zip(result, params, grads, values, anchors):
        assert r.dtype == dtype and r.stride() == grad.stride()
        want = grad.double() + FACTOR * w * (p.double() - m.double()) * 0.25
        torch.testing.assert_close(r, want.to(dtype), **TOLERANCE[dtype])
    if dtype == torch.float32:  # the same pass with the decoded values in float32
        decoded = [w.float() for w in values]
        plain = add_penalty_grad(params, grads, decoded, [], anchors, grad_scale)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(result, plain))


@pytest.mark.parametrize("fmt", sorted(STORAGE))
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_proximal_step_op_reads_each_format(dtype, fmt):
    g = torch.Generator().manual_seed(6)
    params, _, weights, scales, anchors, values = penalty_op_case(dtype, fmt, g)
    etas = [torch.rand(p.shape, generator=g) * 0.1 for p in params]
    result = proximal_step(params, weights, scales, anchors, etas)
    for i, (r, p, w, m, eta) in enumerate(zip(result, params, values, anchors, etas)):
        assert r.dtype == dtype and r.stride() == p.stride()
        c = FACTOR * w * (eta.double() if i % 2 == 0 else 0.3)
        want = p.double() + c / (1 + c) * (m.double() - p.double())
        torch.testing.assert_close(r, want.to(dtype), **TOLERANCE[dtype])
        assert torch.equal(r[w == 0], p[w == 0])  # zero codes: no pull
    if dtype == torch.float32:
        decoded = [w.float() for w in values]
        plain = proximal_step(params, decoded, [], anchors, etas)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(result, plain))


def bad_input_case():
    """Three float32 params of 300 elements, importances in each format (uint8 second, bf16
    third) with the scales of the uint8 one, anchors, grads and accumulators."""
    g = torch.Generator().manual_seed(7)
    params = [random_like(300, torch.float32, g) for _ in range(3)]
    weights, scales = zip(*[stored_importance((300,), dtype, g)
                            for dtype in (torch.float32, torch.uint8, torch.bfloat16)])
    return dict(params=params, weights=list(weights), scales=[scales[1]],
                anchors=[p + 0.1 for p in params],
                grads=[random_like(300, torch.float32, g) for _ in params],
                accs=[torch.rand(300, generator=g) for _ in params])


def _float64_params(a):
    for key in ("params", "anchors", "grads", "accs"):
        a[key] = [t.double() for t in a[key]]
    a["weights"][0] = a["weights"][0].double()


def _non_contiguous_codes(a):
    for key in ("params", "anchors", "grads", "accs", "weights"):
        a[key] = [t.view(20, 15) for t in a[key]]
    a["weights"][1] = a["weights"][1].view(15, 20).t()


BAD_INPUTS = {
    "uint8 importance of a float64 param": (
        _float64_params,
        r"importances\[1\] has dtype Byte, expected an importance format of the param's Double"),
    "float16 importance of a float32 param": (
        lambda a: a["weights"].__setitem__(0, a["weights"][0].half()),
        r"importances\[0\] has dtype Half, expected an importance format of the param's Float"),
    "missing scales": (lambda a: a.update(scales=[]),
                       r"importance_scales has 0 tensors, but importances\[1\] is uint8"),
    "extra scales": (lambda a: a["scales"].append(torch.ones(2)),
                     r"importance_scales has 2 tensors, expected one per uint8"),
    "scales of the wrong shape": (
        lambda a: a["scales"].__setitem__(0, torch.ones(3)),
        r"importance_scales\[0\] \(of importances\[1\]\) must be a contiguous float32 "
        r"tensor of shape \(2,\)"),
    "float64 scales": (lambda a: a["scales"].__setitem__(0, a["scales"][0].double()),
                       r"importance_scales\[0\] \(of importances\[1\]\) must be a contiguous"),
    "non-contiguous codes": (_non_contiguous_codes,
                             r"importances\[1\] \(uint8 8-bit codes\) must be contiguous"),
}


def call(op, a):
    """Op ``op`` on the arguments ``a`` of bad_input_case."""
    if op == "classp_step_":
        return STEP_OP(a["params"], a["grads"], a["accs"], torch.tensor(0.1), 0.0, 1e-5, 2.0,
                       True, None, None, a["weights"], a["anchors"], "explicit", 0.5,
                       a["scales"], 0.0, [], [], None, [])
    if op == "add_penalty_grad_":
        return torch.ops.classp_fused.add_penalty_grad_(a["params"], a["weights"], a["scales"],
                                                        a["anchors"], a["grads"], 2.0, None)
    return torch.ops.classp_fused.proximal_step_(a["params"], a["weights"], a["scales"],
                                                 a["anchors"], [], [0.1] * 3, 2.0)


OPS = ("classp_step_", "add_penalty_grad_", "proximal_step_")


@pytest.mark.parametrize("op", OPS)
def test_the_ops_take_the_good_case(op):
    """The case bad_input_case spoils: accepted, and every op changes what it writes."""
    a = bad_input_case()
    before = {k: clones(v) for k, v in a.items()}
    call(op, a)
    written = {"classp_step_": "params", "add_penalty_grad_": "grads",
               "proximal_step_": "params"}[op]
    assert not any(torch.equal(x, y) for x, y in zip(a[written], before[written]))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_the_ops_refuse_bad_formats_and_scales_and_change_nothing(op, bad):
    a = bad_input_case()
    change, match = BAD_INPUTS[bad]
    change(a)
    before = {k: clones(v) for k, v in a.items()}
    with pytest.raises(RuntimeError, match=match):
        call(op, a)
    for key, tensors in a.items():
        assert all(torch.equal(bits(x), bits(y)) for x, y in zip(tensors, before[key])), key


def test_opcheck_with_bfloat16_and_8bit_importances():
    a = bad_input_case()
    lr = torch.tensor(0.1, dtype=torch.float64)
    for form in FORMS:
        torch.library.opcheck(STEP_OP.default,
                              (a["params"], a["grads"], a["accs"], lr, 0.0, 1e-5, 2.0, True,
                               None, None, a["weights"], a["anchors"], form, 0.5, a["scales"],
                               0.0, [], [], None, []))
    torch.library.opcheck(torch.ops.classp_fused.add_penalty_grad_.default,
                          (a["params"], a["weights"], a["scales"], a["anchors"], a["grads"],
                           2.0, torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.classp_fused.proximal_step_.default,
                          (a["params"], a["weights"], a["scales"], a["anchors"],
                           [None, torch.rand(300), torch.tensor(0.2)], [0.1, 0.0, 0.0], 2.0))
