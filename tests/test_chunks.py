"""Chunk views (``classp_fused.chunks``) and the penalty passes that run on them: tensors of one
shape cut alike in logical order whatever their strides, runs of at most a chunk; the gradient
and proximal passes in chunks equal to one pass over whole tensors bit for bit, with
temporaries that do not grow with the params. The passes take the chunked path here also on
the CPU, where the extension's ops take them otherwise (test_penalty_kernels.py)."""
import pytest
import torch

from classp_fused import chunks
from classp_fused.regularizers import penalty as penalty_ops
from helpers import bits, laid_out, peak_extra_bytes

CHUNK = 64


@pytest.mark.parametrize("shape, layouts", [
    ((CHUNK + 1,), ("contiguous", "contiguous")), ((5 * CHUNK + 3,), ("offset", "contiguous")),
    ((40, 9), ("contiguous", "transposed")), ((9, 40), ("strided", "transposed")),
    ((130, 1), ("transposed", "contiguous")), ((3, 5, 13), ("offset", "contiguous")),
    ((2, 3, 200), ("contiguous", "offset"))])
def test_chunks_cut_tensors_of_one_shape_alike_in_logical_order(shape, layouts):
    g = torch.Generator().manual_seed(0)
    tensors = [laid_out(shape, torch.float32, g, layout) for layout in layouts]
    cut = chunks.chunks(tensors, CHUNK)
    assert len(cut[0]) == len(cut[1])
    for t, views in zip(tensors, cut):
        assert all(0 < v.numel() <= CHUNK for v in views)
        assert all(v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                   for v in views)  # views, no copies
        assert torch.equal(torch.cat([v.reshape(-1) for v in views]), t.reshape(-1))
    assert [v.shape for v in cut[0]] == [v.shape for v in cut[1]]


def test_batches_pack_aligned_pieces_in_runs_of_at_most_a_chunk():
    sizes = [10, 0, 3 * CHUNK + 7, 40, 30, CHUNK, 1]
    values = [torch.arange(n, dtype=torch.float32) for n in sizes]
    doubled = [2 * v for v in values]
    scalars = [float(i) for i in range(len(sizes))]
    runs = list(chunks.batches([values, doubled, scalars], CHUNK))
    assert all(sum(v.numel() for v in run[0]) <= CHUNK for run in runs)
    pieces = [piece for run in runs for piece in zip(*run)]
    assert [s for _, _, s in pieces] == [0.0, 2.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    for value, double, _ in pieces:
        assert torch.equal(2 * value, double)
    assert torch.equal(torch.cat([v for v, _, _ in pieces]), torch.cat(values))
    assert list(chunks.batches([[], []], CHUNK)) == []


# (shape, layout): chunk boundaries inside tensors, just under and over a chunk, odd sizes,
# a scalar, non-contiguous tensors cut by rows
PENALIZED = [((CHUNK - 1,), "contiguous"), ((CHUNK + 1,), "offset"),
             ((5 * CHUNK + 3,), "contiguous"), ((), "contiguous"), ((40, 9), "transposed"),
             ((6, 50), "strided"), ((3, 5, 13), "contiguous"), ((0, 4), "contiguous")]
# add with alpha rounds once in ATen's vector loop and twice in its scalar tail for 16-bit
# dtypes, so there layouts that change which loop an element meets (rows of a non-contiguous
# tensor) are left out: chunks of a multiple of 64 elements reproduce a one-thread pass
CONTIGUOUS_ONLY = (torch.bfloat16, torch.float16)


def _penalty_case(dtype, seed):
    """Params (one without .grad), importances, anchors and step sizes (floats, a param-shaped
    tensor, a 0-dim tensor) laid out as PENALIZED."""
    g = torch.Generator().manual_seed(seed)
    cases = [(s, lay) for s, lay in PENALIZED
             if dtype not in CONTIGUOUS_ONLY or lay in ("contiguous", "offset")]
    params, importances, anchors, steps = [], [], [], []
    for i, (shape, layout) in enumerate(cases):
        param = torch.nn.Parameter(laid_out(shape, dtype, g, layout))
        param.grad = None if i == 1 else laid_out(shape, dtype, g, layout, 0.1)
        params.append(param)
        importances.append(laid_out(shape, dtype, g, "contiguous").abs())
        anchors.append(laid_out(shape, dtype, g, layout))
        steps.append([0.01, laid_out(shape, torch.float32, g, "contiguous").abs() * 0.01,
                      torch.tensor(1e30)][i % 3])
    return params, importances, anchors, steps


@pytest.mark.parametrize("grad_scale", [None, 512.0, torch.tensor(0.25)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_penalty_passes_in_chunks_equal_whole_tensor_passes_bit_for_bit(monkeypatch, dtype,
                                                                       grad_scale):
    monkeypatch.setattr(penalty_ops, "CPU_KERNELS", False)
    results = []
    for chunk in (CHUNK, 10 ** 9):
        monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", chunk)
        params, importances, anchors, steps = _penalty_case(dtype, seed=3)
        penalty_ops.add_penalty_grad_(params, importances, anchors, 1.5, grad_scale)
        grads = [p.grad.clone() for p in params]
        penalty_ops.proximal_step_(params, importances, anchors, steps, 1.5)
        results.append((grads, [p.detach() for p in params]))
    for mine, theirs in zip(*(grads + values for grads, values in results)):
        assert mine.stride() == theirs.stride()
        assert torch.equal(bits(mine), bits(theirs))


def test_penalty_passes_allocate_a_bounded_scratch_whatever_the_params_size(monkeypatch):
    """Peak extra memory (allocated bytes): under a tenth of the params' bytes and the same for
    a large tensor of 16 or 64 chunks beside 200 small ones."""
    monkeypatch.setattr(penalty_ops, "CPU_KERNELS", False)
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 1024)
    peaks = []
    for large in (16 * 1024, 64 * 1024):
        g = torch.Generator().manual_seed(4)
        sizes = [large] + [1 + 37 * i % 300 for i in range(200)]
        params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        importances = [torch.rand(n, generator=g) for n in sizes]
        anchors = [torch.randn(n, generator=g) for n in sizes]
        bound = 0.1 * sum(p.numel() * p.element_size() for p in params)
        peak = max(peak_extra_bytes(lambda: penalty_ops.add_penalty_grad_(
                       params, importances, anchors, 2.0, torch.tensor(0.5))),
                   peak_extra_bytes(lambda: penalty_ops.proximal_step_(
                       params, importances, anchors, [1e-3] * len(params), 2.0)))
        assert peak <= bound
        peaks.append(peak)
    assert peaks[1] == peaks[0]
