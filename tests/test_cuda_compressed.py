"""The CUDA kernel with compressed accumulators (bfloat16, 8-bit codes) against the reference, bit
for bit on codes, scales and bfloat16 bits; and compressed steps of both GPU backends captured
in a CUDA graph. Needs a GPU (the kernel is compiled without one by tests/test_cuda_compile.py)."""
import pytest
import torch

from classp_fused import available_backends
from classp_fused.backends import cuda as cuda_backend
from classp_fused.backends import triton as triton_backend
from classp_fused.backends.step_spec import step_spec
from classp_fused.reference import classp_step_ as reference_step_
from compressed_cases import (HYPER, compare_steps, compressed, copies, make_grads, make_state,
                              powers_of_four, step_keys)
from helpers import bits

GPU_BACKENDS = [name for name in ("cuda", "triton")
                if torch.cuda.is_available() and name in available_backends("cuda")]
pytestmark = pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="needs a GPU")
CHUNK = 1 << 16  # the CUDA kernel's chunk (csrc/classp_plan.h)


def _run(shapes, formats, hyper=HYPER, **options):
    return compare_steps(cuda_backend.step, "cuda", shapes, formats, hyper, **options)


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("numel", [0, 1, 7, 255, 256, 257, 4096 + 13, 70_000, 2 * CHUNK + 300])
def test_sizes(fmt, numel):
    _run([(numel,)], [fmt])


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_powers_and_scaling(fmt, power, apply_scaling):
    _run([(CHUNK + 300,), (17, 19)], [fmt, fmt],
         hyper=dict(HYPER, power=power, apply_scaling=apply_scaling))


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_generic_power_on_exact_powers(fmt):
    """Gradients +-4**k (``powers_of_four``): |g|**1.5 = 8**k exactly, as torch.pow and as
    exp2f(1.5 * log2f|g|)."""
    shapes = [(CHUNK + 300,), (300,)]
    _run(shapes, [fmt, fmt], hyper=dict(HYPER, power=1.5),
         grads=lambda step: powers_of_four(shapes, step))


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1e30])
def test_thresholds(fmt, threshold):
    """All, part and none of the blocks selected."""
    _run([(CHUNK + 5000,)], [fmt], hyper=dict(HYPER, threshold=threshold))


@pytest.mark.parametrize("grad_scale", [256.0, 3.0])
def test_grad_scale(grad_scale):
    shapes = [(CHUNK + 300,), (9, 9), (5000,)]
    _run(shapes, ["8bit", "bf16", "8bit"], grad_scale=torch.tensor(grad_scale),
         grads=lambda step: [g * grad_scale for g in make_grads(shapes, seed=step)])


def test_found_inf_changes_and_counts_nothing():
    shapes = [(CHUNK + 300,), (700,), (300,)]
    params, accs, scales = (copies(ts, "cuda") for ts in make_state(shapes,
                                                                   ["8bit", "bf16", "fp32"]))
    before = [bits(t).clone() for t in params + accs + [scales[0]]]
    spec = step_spec(0.05, 0.0, 1e-5, 2.0, True, torch.tensor(8.0, device="cuda"),
                     torch.tensor(1.0, device="cuda"),
                     compressed=compressed(scales, step_keys(3, 0), [0, 0, 0], "cuda"))
    counts = cuda_backend.step(params, copies(make_grads(shapes), "cuda"), accs, spec)
    assert torch.equal(counts.cpu(), torch.zeros(3, 2, dtype=torch.int64))
    assert all(torch.equal(bits(t), b) for t, b in zip(params + accs + [scales[0]], before))


@pytest.mark.parametrize("form", ["explicit", "proximal"])
def test_penalties(form):
    _run([(CHUNK + 300,), (300,), (5, 7)], ["8bit", "bf16", "8bit"], penalty=(form, 0.5))


def test_relative_threshold():
    _run([(CHUNK + 300,), (600,)], ["8bit", "bf16"], relative_threshold=0.8)


def test_nonfinite_gradients_are_counted_and_skipped():
    shapes = [(CHUNK + 300,), (13, 7)]

    def grads(step):
        out = make_grads(shapes, seed=step)
        for grad in out:
            flat = grad.view(-1)
            flat[step::7] = float("nan")
            flat[step + 3::11] = float("inf")
        return out
    _run(shapes, ["8bit", "bf16"], hyper=dict(HYPER, threshold=0.0), grads=grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_param_dtypes(dtype, fmt):
    _run([(CHUNK + 300,), (300,)], [fmt, fmt], dtype=dtype)


def test_mixed_lists_with_float64():
    shapes = [(CHUNK + 300,), (0,), (257,), (600,), (40, 30), (256,), (500,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float16,
              torch.float32, torch.float64]
    _run(shapes, ["8bit", "8bit", "bf16", "fp32", "8bit", "bf16", "fp32"], dtype=dtypes,
         grads=lambda step: make_grads(shapes, dtypes, seed=step))


def test_index_offsets_past_two_to_the_32():
    _run([(CHUNK + 300,), (3000,)], ["8bit", "bf16"], offsets=[2 ** 32 - 1000, 2 ** 33 + 5])


def test_non_contiguous_params_and_misaligned_accumulators():
    """A transposed param, codes, scales and bfloat16 bits off 16-byte boundaries: the kernel's
    element-at-a-time paths."""
    shapes = [(70, 60), (600,), (300,)]
    params, accs, scales = make_state(shapes, ["8bit", "8bit", "bf16"])
    ours_params = copies(params, "cuda")
    ours_params[0] = ours_params[0].t().contiguous().t()
    ours_accs = []
    for t in accs:
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device="cuda")
        ours_accs.append(buffer[1:].view(t.shape))
        ours_accs[-1].copy_(t)
    ours_scales = copies(scales, "cuda")
    grads = make_grads(shapes)
    keys = step_keys(3, 0)
    expected = reference_step_(params, grads, accs, **HYPER,
                               compressed=compressed(scales, keys, [0, 0, 0], "cpu"))
    counts = cuda_backend.step(ours_params, copies(grads, "cuda"), ours_accs, step_spec(
        **HYPER, compressed=compressed(ours_scales, keys, [0, 0, 0], "cuda")))
    assert torch.equal(counts.cpu(), expected)
    for mine, theirs in zip(ours_accs + ours_scales[:2], accs + scales[:2]):
        assert torch.equal(bits(mine.cpu()), bits(theirs))


def test_bad_compressed_arguments_are_refused_by_name():
    shapes = [(300,), (600,)]
    params, accs, scales = (copies(ts, "cuda") for ts in make_state(shapes, ["8bit", "bf16"]))
    args = [params, copies(make_grads(shapes), "cuda"), accs, torch.tensor(0.05), 0.01, 1e-5, 2.0,
            True, None, None, [], [], "none", 0.0, [], 0.0, [], [scales[0]],
            step_keys(2, 0).cuda(), [0, 0]]
    op = torch.ops.classp_fused.classp_step_
    with pytest.raises(RuntimeError, match="acc_scales"):
        op(*args[:17], [], *args[18:])
    with pytest.raises(RuntimeError, match="rounding_keys"):
        op(*args[:18], None, args[19])
    with pytest.raises(RuntimeError, match="rounding_keys is on"):
        op(*args[:18], args[18].cpu(), args[19])
    with pytest.raises(RuntimeError, match="index_offsets"):
        op(*args[:19], [0])
    with pytest.raises(RuntimeError, match=r"scales of accs\[0\]"):
        op(*args[:17], [torch.ones(1, device="cuda")], *args[18:])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_captured_steps_read_the_keys_on_the_device(backend):
    """A compressed step captured in a CUDA graph and replayed with new keys written into the
    keys tensor equals eager steps with those keys, bit for bit."""
    step = {"cuda": cuda_backend.step, "triton": triton_backend.step}[backend]
    shapes = [(CHUNK + 300,), (5000,), (300,)]
    formats = ["8bit", "bf16", "fp32"]
    grads = copies(make_grads(shapes), "cuda")
    eager = tuple(copies(ts, "cuda") for ts in make_state(shapes, formats))
    graphed = tuple(copies(ts, "cuda") for ts in make_state(shapes, formats))
    keys = step_keys(3, 0).cuda()

    def graphed_step():
        step(graphed[0], grads, graphed[1], step_spec(
            **HYPER, compressed=compressed(graphed[2], keys, [0, 0, 0], "cuda")))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed_step()  # the warm-up: step 0
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_step()
    step(eager[0], grads, eager[1], step_spec(
        **HYPER, compressed=compressed(eager[2], step_keys(3, 0), [0, 0, 0], "cuda")))
    for count in (1, 2):
        keys.copy_(step_keys(3, count))
        graph.replay()
        step(eager[0], grads, eager[1], step_spec(
            **HYPER, compressed=compressed(eager[2], step_keys(3, count), [0, 0, 0], "cuda")))
    torch.cuda.synchronize()
    for mine, theirs in zip(graphed[0] + graphed[1] + graphed[2][:1],
                            eager[0] + eager[1] + eager[2][:1]):
        assert torch.equal(bits(mine), bits(theirs))
