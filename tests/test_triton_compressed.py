"""The Triton backend with compressed accumulators (bfloat16, 8-bit codes) against the reference,
bit for bit on codes, scales and bfloat16 bits: on the GPU, or on the CPU through the
interpreter."""
import contextlib

import pytest
import torch

import classp_fused
from classp_fused import state_formats
from classp_fused.backends import triton as triton_backend
from classp_fused.backends.step_spec import step_spec
from classp_fused.reference import classp_step_ as reference_step_
from compressed_cases import (HYPER, STEPS, assert_same_state, compare_steps, compressed,
                              copies, make_grads, make_state, powers_of_four, step_keys)
from helpers import bits
from triton_aot import compile_results

DEVICE = next((d for d in ("cuda", "cpu") if triton_backend.is_available(torch.device(d))), None)
pytestmark = [
    pytest.mark.skipif(DEVICE is None, reason="triton is not installed, or no GPU and "
                                              "TRITON_INTERPRET is not 1"),
    # masked-out elements run through log2(0) and x/0 in the interpreter's numpy
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]
CHUNK = triton_backend.CHUNK


def _traced_body():
    """The op body torch.compile traces (concatenated copies), run eagerly."""
    return triton_backend.classp_step_triton.set_kernel_enabled(DEVICE, False)


def _run(shapes, formats, hyper=HYPER, *, traced=False, **options):
    """``compare_steps`` of the triton backend: on the tensors by address, or (``traced``) the
    op body torch.compile traces."""
    context = _traced_body if traced else contextlib.nullcontext
    return compare_steps(triton_backend.step, DEVICE, shapes, formats, hyper, context=context,
                         **options)


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 4096 + 13, 70_000])
def test_sizes(fmt, numel):
    _run([(numel,)], [fmt])


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_powers_and_scaling(fmt, power, apply_scaling):
    _run([(CHUNK + 300,), (17, 19)], [fmt, fmt],
         dict(HYPER, power=power, apply_scaling=apply_scaling))


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_generic_power_on_exact_powers(fmt):
    shapes = [(CHUNK + 300,), (300,)]
    _run(shapes, [fmt, fmt], dict(HYPER, power=1.5), grads=lambda step: powers_of_four(
        shapes, step))


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_generic_power_on_random_gradients(fmt):
    """|g|**1.5 as exp2(1.5 * log2|g|) may differ from torch.pow by an ulp, and a code may then
    round the other way: counts and params as the reference's, accumulators within a code (bf16:
    one bit of 2**-8) and almost all bit for bit."""
    shapes = [(CHUNK + 300,)]
    ref = make_state(shapes, [fmt])
    ours = tuple(copies(ts, DEVICE) for ts in ref)
    hyper = dict(HYPER, power=1.5)
    for step in range(STEPS):
        grads = make_grads(shapes, seed=step)
        keys = step_keys(1, step)
        expected = reference_step_(ref[0], grads, ref[1], **hyper,
                                   compressed=compressed(ref[2], keys, [0], "cpu"))
        counts = triton_backend.step(ours[0], copies(grads, DEVICE), ours[1], step_spec(
            **hyper, compressed=compressed(ours[2], keys, [0], DEVICE)))
        assert torch.equal(counts.cpu(), expected)
    torch.testing.assert_close(ours[0][0].cpu(), ref[0][0], rtol=1e-5, atol=1e-6)
    mine, theirs = ours[1][0].cpu(), ref[1][0]
    assert (bits(mine) != bits(theirs)).float().mean() < 1e-3
    if fmt == "8bit":
        mine = state_formats.decode(mine, ours[2][0].cpu())
        theirs = state_formats.decode(theirs, ref[2][0])
    torch.testing.assert_close(mine.float(), theirs.float(), rtol=2 ** -3, atol=0)


def _blockwise_grads(shapes, step):
    """Gradients that leave whole blocks of 256 unselected (even blocks: |g| < 1e-3) and select
    part of the others (normal, scale 0.6, against the threshold 0.09)."""
    grads = make_grads(shapes, seed=step)
    for grad in grads:
        flat = grad.view(-1)
        for start in range(0, flat.numel(), 2 * state_formats.BLOCK):
            flat[start:start + state_formats.BLOCK] *= 1e-3
    return grads


def _any_per_block(flags: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(state_formats.num_blocks(flags.numel()) * state_formats.BLOCK,
                         dtype=torch.bool)
    padded[:flags.numel()] = flags.reshape(-1)
    return padded.view(-1, state_formats.BLOCK).any(dim=1)


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("selection", ["part", "all", "none"])
def test_selected_blocks(fmt, selection):
    """Blocks with no selected element keep their codes (bits) and scale bit for bit; those
    with normal gradients are rewritten."""
    shapes = [(CHUNK + 13 * state_formats.BLOCK + 5,)]
    threshold = {"part": 0.09, "all": 0.0, "none": 1e30}[selection]
    before = make_state(shapes, [fmt])
    ours, _ = _run(shapes, [fmt], dict(HYPER, threshold=threshold), steps=1,
                   grads=lambda step: _blockwise_grads(shapes, step))
    selected = _any_per_block(_blockwise_grads(shapes, 0)[0] ** 2 > threshold)
    blocks = selected.numel()
    expected = {"none": torch.zeros(blocks, dtype=torch.bool),
                "all": torch.ones(blocks, dtype=torch.bool),
                "part": torch.arange(blocks) % 2 == 1}[selection]
    assert torch.equal(selected, expected)
    changed = _any_per_block(bits(ours[1][0].cpu()) != bits(before[1][0]))
    if fmt == "8bit":
        changed |= ours[2][0].cpu() != before[2][0]
    assert not (changed & ~selected).any()
    assert torch.equal(changed[1::2], selected[1::2])


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_grad_scale(fmt):
    for grad_scale in (256.0, 3.0):
        _run([(CHUNK + 300,), (9, 9)], [fmt, fmt], grad_scale=torch.tensor(grad_scale),
             grads=lambda step: [g * grad_scale for g in make_grads([(CHUNK + 300,), (9, 9)],
                                                                    seed=step)])


@pytest.mark.parametrize("traced", [False, True])
def test_found_inf_changes_and_counts_nothing(traced):
    shapes = [(CHUNK + 300,), (700,), (300,)]
    params, accs, scales = (copies(ts, DEVICE) for ts in make_state(shapes,
                                                                   ["8bit", "bf16", "fp32"]))
    before = [bits(t).clone() for t in params + accs + [scales[0]]]
    spec = step_spec(0.05, 0.0, 1e-5, 2.0, True, torch.tensor(8.0, device=DEVICE),
                     torch.tensor(1.0, device=DEVICE),
                     compressed=compressed(scales, step_keys(3, 0), [0, 0, 0], DEVICE))
    with _traced_body() if traced else contextlib.nullcontext():
        counts = triton_backend.step(params, copies(make_grads(shapes), DEVICE), accs, spec)
    assert torch.equal(counts.cpu(), torch.zeros(3, 2, dtype=torch.int64))
    assert all(torch.equal(bits(t), b) for t, b in zip(params + accs + [scales[0]], before))


@pytest.mark.parametrize("form", ["explicit", "proximal"])
def test_penalties(form):
    shapes = [(CHUNK + 300,), (300,), (5, 7)]
    _run(shapes, ["8bit", "bf16", "8bit"], penalty=(form, 0.5))


def test_relative_threshold():
    shapes = [(CHUNK + 300,), (600,)]
    _run(shapes, ["8bit", "bf16"], relative_threshold=0.8)


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_nonfinite_gradients_are_counted_and_skipped(fmt):
    shapes = [(CHUNK + 300,), (13, 7)]

    def grads(step):
        out = make_grads(shapes, seed=step)
        for grad in out:
            flat = grad.view(-1)
            flat[step::7] = float("nan")
            flat[step + 3::11] = float("inf")
            flat[5::13] = -float("inf")
        return out
    _run(shapes, [fmt, fmt], dict(HYPER, threshold=0.0), grads=grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_param_dtypes(dtype, fmt):
    _run([(CHUNK + 300,), (300,)], [fmt, fmt], dtype=dtype)


# fp32, bf16 and 8-bit accumulators of float32 and bfloat16 params, and an empty tensor
MIXED = dict(shapes=[(CHUNK + 300,), (0,), (257,), (600,), (40, 30), (256,)],
             formats=["8bit", "8bit", "bf16", "fp32", "8bit", "bf16"],
             dtype=[torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16,
                    torch.float32])


def _mixed_grads(step):
    return make_grads(MIXED["shapes"], MIXED["dtype"], seed=step)


def test_mixed_lists_take_one_launch_per_dtype_and_format(monkeypatch):
    launches = []
    launch = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: (
        launches.append((args[1].dtype, args[3].dtype)), launch(*args, **kwargs)))
    _run(**MIXED, steps=2, grads=_mixed_grads)
    assert sorted(map(str, launches[:5])) == sorted(map(str, [
        (torch.float32, torch.uint8), (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32), (torch.bfloat16, torch.uint8),
        (torch.float32, torch.bfloat16)]))


def test_index_offsets_past_two_to_the_32():
    """Local shards: element indices from their offsets, a tensor straddling 2**32."""
    shapes = [(CHUNK + 300,), (3000,)]
    _run(shapes, ["8bit", "bf16"], offsets=[2 ** 32 - 1000, 2 ** 33 + 5])


def test_traced_body_steps_concatenated_copies(monkeypatch):
    """The op body torch.compile traces, run eagerly with the in-place kernel switched off."""
    kernels = []
    launch = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: (
        kernels.append(args[0]), launch(*args, **kwargs)))
    _run(**MIXED, traced=True, offsets=[0, 0, 7, 0, 2 ** 32 - 300, 3],
         grad_scale=torch.tensor(2.0), grads=lambda step: [2 * g for g in _mixed_grads(step)])
    assert kernels and all(k is triton_backend._classp_kernel_autotuned for k in kernels)
    for form in ("explicit", "proximal"):
        _run(**MIXED, traced=True, penalty=(form, 0.5), steps=2, grads=_mixed_grads)


def test_non_contiguous_params_and_misaligned_accumulators():
    """A transposed param (its accumulator row-major), codes, scales and bfloat16 bits that do
    not start on 16 bytes: stepped through copies, written back."""
    shapes = [(70, 60), (600,), (300,)]
    params, accs, scales = make_state(shapes, ["8bit", "8bit", "bf16"])
    ref = (params, accs, scales)
    ours_params = copies(params, DEVICE)
    ours_params[0] = ours_params[0].t().contiguous().t()  # same values, column-major
    ours_accs, ours_scales = [], []
    for t in accs:
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device=DEVICE)
        ours_accs.append(buffer[1:].view(t.shape))
        ours_accs[-1].copy_(t)
    for s in scales:
        if s is None:
            ours_scales.append(None)
            continue
        buffer = torch.zeros(s.numel() + 1, device=DEVICE)
        ours_scales.append(buffer[1:])
        ours_scales[-1].copy_(s)
    assert not ours_params[0].is_contiguous() and ours_accs[0].data_ptr() % 16
    grads = make_grads(shapes)
    keys = step_keys(3, 0)
    expected = reference_step_(ref[0], grads, ref[1], **HYPER,
                               compressed=compressed(ref[2], keys, [0, 0, 0], "cpu"))
    counts = triton_backend.step(ours_params, copies(grads, DEVICE), ours_accs, step_spec(
        **HYPER, compressed=compressed(ours_scales, keys, [0, 0, 0], DEVICE)))
    assert torch.equal(counts.cpu(), expected)
    assert_same_state((ours_params, ours_accs, ours_scales), ref)


def test_public_entry_point_validates_and_steps():
    shapes = [(300,), (5000,)]
    ref = make_state(shapes, ["8bit", "bf16"])
    ours = tuple(copies(ts, DEVICE) for ts in ref)
    grads = make_grads(shapes)
    keys = step_keys(2, 0)
    expected = reference_step_(ref[0], grads, ref[1], **HYPER,
                               compressed=compressed(ref[2], keys, [0, 0], "cpu"))
    counts = classp_fused.classp_step_(ours[0], copies(grads, DEVICE), ours[1], **HYPER,
                                       compressed=compressed(ours[2], keys, [0, 0], DEVICE),
                                       backend="triton")
    assert torch.equal(counts.cpu(), expected)
    assert_same_state(ours, ref)


def _op_arguments(shapes, formats):
    params, accs, scales = (copies(ts, DEVICE) for ts in make_state(shapes, formats))
    return (params, copies(make_grads(shapes), DEVICE), accs,
            torch.tensor(0.05, device=DEVICE), 0.01, 1e-5, 2.0, True, None, None, [], [],
            "none", 0.0, [], 0.0, [], [s for s in scales if s is not None],
            step_keys(len(shapes), 0).to(DEVICE), [0] * len(shapes))


def test_bad_compressed_arguments_are_refused_by_name():
    args = list(_op_arguments([(300,), (600,)], ["8bit", "bf16"]))
    with pytest.raises(ValueError, match="acc_scales"):
        triton_backend.classp_step_triton(*args[:17], [], *args[18:])
    with pytest.raises(ValueError, match="rounding_keys"):
        triton_backend.classp_step_triton(*args[:18], None, args[19])
    with pytest.raises(ValueError, match="index_offsets"):
        triton_backend.classp_step_triton(*args[:19], [0])
    wrong = [torch.ones(1, device=DEVICE)]
    with pytest.raises(ValueError, match=r"scales of accs\[0\]"):
        triton_backend.classp_step_triton(*args[:17], wrong, *args[18:])


def test_opcheck_with_compressed_accumulators():
    args = _op_arguments([(300,), (600,), (40,)], ["8bit", "bf16", "fp32"])
    torch.library.opcheck(triton_backend.classp_step_triton, args)


AOT_SCRIPT = r"""
import json
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from classp_fused.backends.triton import _classp_kernel

results = []
# param dtype, accumulator format (1 bf16, 2 8-bit), power path, penalty
variants = [(d, f, p, 0) for d in ("fp32", "bf16") for f in (1, 2) for p in (1, 2, 0)]
variants += [("fp16", 2, 2, 1), ("fp32", 2, 1, 2)]
for dtype, acc_format, power, penalty in variants:
    weights = "*" + dtype if penalty else "constexpr"
    signature = dict(p_ptr="*" + dtype, g_ptr="*" + dtype,
                     a_ptr="*bf16" if acc_format == 1 else "*u8", w_ptr=weights, m_ptr=weights,
                     table_ptr="*i64", num_chunks="i64", counts_ptr="*i64", lr_ptr="*fp64",
                     lr_value="fp32", grad_scale_ptr="*fp32", found_inf_ptr="*fp32",
                     threshold="fp32", eps="fp32", power="fp32", factor="fp32", cap="fp32",
                     thresholds_ptr="constexpr", sums_ptr="constexpr", sizes_ptr="constexpr",
                     scales_ptr="*fp32" if acc_format == 2 else "constexpr", keys_ptr="*i64",
                     w_scales_ptr="constexpr", FAST_POWER="constexpr", APPLY_SCALING="constexpr",
                     PENALTY="constexpr", ACC_FORMAT="constexpr", GROUP="constexpr",
                     ACC_ALIGN="constexpr", W_ALIGN="constexpr", BLOCK_SIZE="constexpr")
    constexprs = dict(FAST_POWER=power, APPLY_SCALING=True, PENALTY=penalty,
                      ACC_FORMAT=acc_format, GROUP=8 if dtype == "fp32" else 16,
                      ACC_ALIGN=8 if acc_format == 1 else 16,
                      W_ALIGN=4 if dtype == "fp32" else 8, BLOCK_SIZE=1024,
                      thresholds_ptr=None, sums_ptr=None, sizes_ptr=None, w_scales_ptr=None)
    if not penalty:
        constexprs.update(w_ptr=None, m_ptr=None)
    if acc_format != 2:
        constexprs.update(scales_ptr=None)
    aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(signature.values())
               if v.startswith("*")}
    kernel = triton.compile(ASTSource(_classp_kernel, signature, constexprs, aligned),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"ld\.global[\w:.]*\.v4", ptx)
    results.append(dict(variant=f"{dtype} format {acc_format} power path {power} "
                                f"penalty {penalty}", power=power, cubin=len(kernel.asm["cubin"]),
                        mul_rn=len(re.findall(r"mul\.rn\.f32", ptx)),
                        div_rn=len(re.findall(r"div\.rn\.f32", ptx)),
                        flushed=re.findall(r"(?:mul|add|sub|max|min|setp)[\w.]*\.ftz[\w.]*", ptx),
                        ld_v4=len(loads), st_v4=len(re.findall(r"st\.global[\w:.]*\.v4", ptx))))
print(json.dumps(results))
"""


def test_compressed_kernels_compile_for_sm90_ahead_of_time():
    """Real GPU code for the compressed formats, without a GPU: the lowering of the bit
    arithmetic and the block reductions, the rounded products and quotients (PTX instructions
    with an explicit rounding, no flush of subnormals in the arithmetic the codes come from,
    whatever the fusion option), and vector loads and stores of full blocks."""
    results = compile_results(AOT_SCRIPT)
    assert len(results) == 14
    for result in results:
        assert result["cubin"] > 0, result
        assert result["mul_rn"] > 0 and result["div_rn"] > 0, result
        if result["power"]:  # exp2 and log2 of the generic power flush subnormals
            assert not result["flushed"], result
        assert result["ld_v4"] >= 2 and result["st_v4"] >= 1, result
