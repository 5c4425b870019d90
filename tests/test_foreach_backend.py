"""The foreach backend's layout: segment ends cached per layout, write-back through any mix of
contiguous and strided members, dtype groups returned in the caller's order; large tensors
stepped in chunks exactly as whole, with a scratch that does not grow with the params."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from classp_fused import chunks, classp_step_
from classp_fused.backends import foreach
from classp_fused.backends.step_spec import Penalty, step_spec
from classp_fused.reference import classp_step_ as reference_step_
from helpers import bits, laid_out, peak_extra_bytes, random_like

HYPER = dict(lr=0.05, threshold=0.02, eps=1e-5, power=1.0, apply_scaling=True)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def _case(shapes, generator, dtypes=(torch.float32,)):
    params = [random_like(s, dtypes[i % len(dtypes)], generator) for i, s in enumerate(shapes)]
    grads = [random_like(p.shape, p.dtype, generator, scale=0.3) for p in params]
    accs = [torch.rand(p.shape, generator=generator) for p in params]
    return params, grads, accs


def _assert_steps_like_reference(params, grads, accs):
    """Step with foreach and, on clones, with the reference; returns the reference's results."""
    ref = tuple([t.clone() for t in ts] for ts in (params, grads, accs))
    counts = classp_step_(params, grads, accs, backend="foreach", **HYPER)
    assert torch.equal(counts, reference_step_(*ref, **HYPER))
    for mine, theirs in zip(params + accs, ref[0] + ref[2]):
        torch.testing.assert_close(mine, theirs, **TOLERANCE[mine.dtype])
    return ref


def test_layouts_alternating_between_steps_keep_their_own_counts():
    g = torch.Generator().manual_seed(3)
    layouts = [[(5,), (300,), (7, 11)], [(300,), (5,), (11, 7)], [(5,), (300,), (77,)],
               [(1,), (1,)]]
    for shapes in layouts + layouts[::-1]:  # the same numels in a new order, repeated layouts
        _assert_steps_like_reference(*_case(shapes, g))


def test_contiguous_and_strided_params_in_one_group_are_written_through():
    g = torch.Generator().manual_seed(4)
    base = random_like((20, 30), generator=g)
    params, grads, accs = _case([(9,), (4, 5)], g)
    params.append(base.t())  # a strided view: the whole group takes the general write-back
    grads.append(random_like((30, 20), generator=g, scale=0.3))
    accs.append(torch.rand(30, 20, generator=g))
    before = base.clone()
    ref_params, _, _ = _assert_steps_like_reference(params, grads, accs)
    assert not torch.equal(base, before)
    torch.testing.assert_close(base, ref_params[2].t(), rtol=0, atol=0)  # the storage itself


def test_interleaved_dtypes_and_empty_members_keep_their_rows():
    g = torch.Generator().manual_seed(5)
    shapes = [(13,), (0,), (6, 6), (), (40,), (0, 4), (129,)]
    _assert_steps_like_reference(*_case(shapes, g, (torch.float32, torch.bfloat16,
                                                    torch.float16)))


def test_a_step_on_fake_tensors_leaves_nothing_fake_for_real_steps_of_that_layout():
    g = torch.Generator().manual_seed(6)
    shapes = [(17,), (3, 23), (101,)]
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in ts] for ts in _case(shapes, g)]
        foreach.step(*fake, step_spec(0.05, 0.02, 1e-5, 1.0, True))
    _assert_steps_like_reference(*_case(shapes, g))


CHUNK = 64


# chunk boundaries inside tensors, tensors just under and over a chunk, odd sizes, a scalar,
# non-contiguous tensors cut by rows (each: shape, its layout, the penalty's layout or None)
CHUNKED = [((CHUNK - 1,), "contiguous", "contiguous"), ((CHUNK,), "contiguous", None),
           ((CHUNK + 1,), "offset", "contiguous"), ((5 * CHUNK + 3,), "contiguous", "offset"),
           ((), "contiguous", "contiguous"), ((7, 11), "contiguous", None),
           ((40, 9), "transposed", "contiguous"), ((6, 50), "strided", "transposed"),
           ((3, 5, 13), "contiguous", "contiguous"), ((1,), "contiguous", None)]


def _chunked_case(dtype, seed):
    """Params, grads (non-finite in places), accumulators, importances and anchors of CHUNKED."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    params, grads, accs, importances, anchors = [], [], [], [], []
    for shape, layout, penalty_layout in CHUNKED:
        params.append(laid_out(shape, dtype, g, layout))
        grads.append(laid_out(shape, dtype, g, layout, 0.3))
        accs.append(laid_out(shape, wide, g, layout).abs())
        covered = penalty_layout is not None
        importances.append(laid_out(shape, dtype, g, penalty_layout).abs() if covered else None)
        anchors.append(laid_out(shape, dtype, g, penalty_layout) if covered else None)
    for grad in grads[3:5]:
        grad.view(-1)[::29] = float("nan")
        grad.view(-1)[3::31] = float("inf")
    return params, grads, accs, importances, anchors


@pytest.mark.parametrize("amp", [None, "scaled", "overflowed"])
@pytest.mark.parametrize("power, apply_scaling", [(1.0, True), (2.0, True), (1.0, False)])
@pytest.mark.parametrize("form", [None, "explicit", "proximal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_chunked_steps_equal_whole_tensor_steps_bit_for_bit(monkeypatch, dtype, form, power,
                                                             apply_scaling, amp):
    results = []
    for chunk in (CHUNK, 10 ** 9):  # cut in chunks and packed in flat buffers; all in one
        monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", chunk)
        params, grads, accs, importances, anchors = _chunked_case(dtype, seed=7)
        penalty = None if form is None else Penalty(form, 0.5, importances, anchors)
        grad_scale = None if amp is None else torch.tensor([4.0])
        found_inf = None if amp is None else torch.tensor([float(amp == "overflowed")])
        spec = step_spec(0.05, 0.02, 1e-5, power, apply_scaling, grad_scale, found_inf, penalty)
        results.append((foreach.step(params, grads, accs, spec), params + accs))
    (counts, chunked), (whole_counts, whole) = results
    assert torch.equal(counts, whole_counts)
    assert counts[:, 0].sum() > 0 if amp != "overflowed" else counts.sum() == 0
    for mine, theirs in zip(chunked, whole):
        assert mine.stride() == theirs.stride()
        assert torch.equal(bits(mine), bits(theirs))


@pytest.mark.parametrize("form", [None, "proximal"])
def test_a_step_allocates_a_bounded_scratch_whatever_the_params_size(monkeypatch, form):
    """Peak extra memory (allocated bytes): under a tenth of the params' bytes and the same for
    a large tensor of 256 or 1024 chunks beside 200 small ones."""
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 1024)
    peaks = []
    for large in (256 * 1024, 1024 * 1024):
        g = torch.Generator().manual_seed(8)
        sizes = [large] + [1 + 37 * i % 300 for i in range(200)]
        params, grads, importances, anchors = ([torch.randn(n, generator=g) for n in sizes]
                                               for _ in range(4))
        accs = [torch.zeros(n) for n in sizes]
        penalty = None if form is None else Penalty(form, 0.5, importances, anchors)
        spec = step_spec(0.05, 0.0, 1e-5, 1.0, True, penalty=penalty)
        peaks.append(peak_extra_bytes(lambda: foreach.step(params, grads, accs, spec)))
        assert peaks[-1] <= 0.1 * sum(p.numel() * p.element_size() for p in params)
    assert peaks[1] <= peaks[0] * 1.01
