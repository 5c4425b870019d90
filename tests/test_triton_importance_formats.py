"""The Triton backend with importances in every importance format (the param's dtype, bfloat16,
8-bit codes with block scales) against the reference backend: bit for bit in the interpreter
(params too), on the GPU accumulators and scales bit for bit and params to a tolerance."""
import dataclasses

import pytest
import torch

import classp_fused
from classp_fused.backends import triton as triton_backend
from compressed_cases import copies
from helpers import bits
from importance_cases import (COMPRESSED_MEMBERS, TRANSPOSED_MEMBERS, Member,
                              assert_matches_reference, make_case, mixed_members, off_alignment)
from triton_aot import compile_results

DEVICE = next((d for d in ("cuda", "cpu") if triton_backend.is_available(torch.device(d))), None)
pytestmark = [
    pytest.mark.skipif(DEVICE is None, reason="triton is not installed, or no GPU and "
                                              "TRITON_INTERPRET is not 1"),
    # masked-out elements run through log2(0) and x/0 in the interpreter's numpy
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]
EXACT = DEVICE == "cpu"  # the GPU's division may differ from the reference's by an ulp
FORMS = ["explicit", "proximal"]


def _traced_body():
    """The op body torch.compile traces (concatenated copies), run eagerly."""
    return triton_backend.classp_step_triton.set_kernel_enabled(DEVICE, False)


def _check(members, form, **options):
    return assert_matches_reference(triton_backend.step, DEVICE, members, form,
                                    exact_params=EXACT, **options)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_formats_and_uncovered_tensors(dtype, form):
    """8-bit, bfloat16 and param-dtype importances of odd sizes in one call, beside a tensor
    the penalty does not cover."""
    _check(mixed_members(dtype), form)


@pytest.mark.parametrize("form", FORMS)
def test_beside_compressed_accumulators(form):
    _check(COMPRESSED_MEMBERS, form)


@pytest.mark.parametrize("power, apply_scaling", [(1.0, True), (2.0, False)])
def test_power_one_and_no_scaling(power, apply_scaling):
    hyper = dict(lr=0.05, threshold=0.01, eps=1e-5, power=power, apply_scaling=apply_scaling)
    _check(mixed_members(torch.float32)[:2], "proximal", hyper=hyper)


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_params(form):
    _check(TRANSPOSED_MEMBERS, form)


def test_importances_off_16_bytes():
    """Codes, block scales and bfloat16 importances that do not start on 16 bytes: stepped
    through aligned copies."""
    _check(COMPRESSED_MEMBERS[:3] + mixed_members(torch.float16)[:2], "explicit",
           layout=off_alignment)


def _public_step(params, grads, accs, spec):
    """The public entry point, naming the triton backend."""
    return classp_fused.classp_step_(params, grads, accs, lr=spec.lr, threshold=spec.threshold,
                                     eps=spec.eps, power=spec.power,
                                     apply_scaling=spec.apply_scaling, penalty=spec.penalty,
                                     compressed=spec.compressed, backend="triton")


def test_public_entry_point_validates_and_steps():
    assert_matches_reference(_public_step, DEVICE,
                             COMPRESSED_MEMBERS[:2] + mixed_members(torch.float32)[:3],
                             "proximal", exact_params=EXACT)


def test_one_launch_per_importance_format(monkeypatch):
    launches = []
    launch = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: (
        launches.append(None if args[4] is None else args[4].dtype), launch(*args, **kwargs)))
    _check(mixed_members(torch.float32), "explicit", steps=1)
    assert sorted(map(str, launches)) == sorted(map(str, [torch.uint8, torch.bfloat16, None,
                                                          torch.float32]))


@pytest.mark.parametrize("form", FORMS)
def test_traced_body_equals_the_eager_step(form, monkeypatch):
    """The op body torch.compile traces (with the in-place kernel switched off) leaves the
    eager step's state, bit for bit, and matches the reference."""
    members = COMPRESSED_MEMBERS[:2] + mixed_members(torch.float32)
    kernels = []
    launch = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: (
        kernels.append(args[0]), launch(*args, **kwargs)))
    traced = _check(members, form, context=_traced_body)
    assert kernels and all(k is triton_backend._classp_kernel_autotuned for k in kernels)
    eager = _check(members, form)
    assert kernels[-1] is triton_backend._classp_kernel
    for mine, theirs in zip(traced.state(), eager.state()):
        assert torch.equal(bits(mine), bits(theirs))


def _op_arguments(members, form):
    """The op's arguments for one step of ``make_case(members, form)`` on DEVICE."""
    case = make_case(members, form).on(DEVICE)
    spec = case.spec(0)
    return (case.params, copies(case.grads(0), DEVICE), case.accs,
            *spec.op_arguments(torch.tensor(0.05, device=DEVICE)))


def test_bad_importance_arguments_are_refused_by_name():
    members = [Member((300,), importance="8bit"), Member((600,), importance="bf16")]
    args = list(_op_arguments(members, "explicit"))
    importances, importance_scales = args[10], args[14]
    assert len(importance_scales) == 1  # those of the uint8 importance only
    with pytest.raises(ValueError, match="importance_scales must hold one"):
        triton_backend.classp_step_triton(*args[:14], [], *args[15:])
    wrong = [torch.ones(1, device=DEVICE)]
    with pytest.raises(ValueError, match=r"scales of importances\[0\]"):
        triton_backend.classp_step_triton(*args[:14], wrong, *args[15:])
    wide = [importances[0], importances[1].double()]
    with pytest.raises(TypeError, match=r"importances\[1\] has dtype torch.float64"):
        triton_backend.classp_step_triton(*args[:10], wide, *args[11:])


def test_opcheck_with_compressed_importances():
    members = [Member((300,), importance="8bit", acc="8bit"), Member((600,), importance="bf16"),
               Member((40,), importance=None), Member((70,), torch.bfloat16, "8bit", "bf16")]
    for form in FORMS:
        torch.library.opcheck(triton_backend.classp_step_triton, _op_arguments(members, form))


def test_found_inf_leaves_everything_alone():
    case = make_case(COMPRESSED_MEMBERS[:3], "proximal").on(DEVICE)
    before = [bits(t).clone() for t in case.state()]
    spec = dataclasses.replace(case.spec(0), found_inf=torch.tensor(1.0, device=DEVICE))
    counts = triton_backend.step(case.params, copies(case.grads(0), DEVICE), case.accs, spec)
    assert not counts.any()
    assert all(torch.equal(bits(t), b) for t, b in zip(case.state(), before))


AOT_SCRIPT = r"""
import json
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from classp_fused.backends.triton import _classp_kernel

SIZES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1}
ACCS = {0: "*fp32", 1: "*bf16", 2: "*u8"}
results = []
# param dtype, accumulator format (0 fp32, 1 bf16, 2 8-bit), importance dtype, penalty
variants = [("fp32", 0, "u8", 1), ("fp32", 0, "bf16", 2), ("fp32", 2, "u8", 1),
            ("fp32", 1, "bf16", 1), ("fp16", 0, "bf16", 2), ("fp16", 0, "u8", 1),
            ("bf16", 2, "u8", 2)]
for dtype, acc_format, weights, penalty in variants:
    codes = weights == "u8"
    signature = dict(p_ptr="*" + dtype, g_ptr="*" + dtype, a_ptr=ACCS[acc_format],
                     w_ptr="*" + weights, m_ptr="*" + dtype, table_ptr="*i64",
                     num_chunks="i64", counts_ptr="*i64", lr_ptr="*fp64", lr_value="fp32",
                     grad_scale_ptr="*fp32", found_inf_ptr="*fp32", threshold="fp32",
                     eps="fp32", power="fp32", factor="fp32", cap="fp32",
                     thresholds_ptr="constexpr", sums_ptr="constexpr", sizes_ptr="constexpr",
                     scales_ptr="*fp32" if acc_format == 2 else "constexpr",
                     keys_ptr="*i64" if acc_format else "constexpr",
                     w_scales_ptr="*fp32" if codes else "constexpr", FAST_POWER="constexpr",
                     APPLY_SCALING="constexpr", PENALTY="constexpr", ACC_FORMAT="constexpr",
                     GROUP="constexpr", ACC_ALIGN="constexpr", W_ALIGN="constexpr",
                     BLOCK_SIZE="constexpr")
    constexprs = dict(FAST_POWER=2, APPLY_SCALING=True, PENALTY=penalty, ACC_FORMAT=acc_format,
                      GROUP=32 // SIZES[dtype], ACC_ALIGN=16 // (4, 2, 1)[acc_format],
                      W_ALIGN=16 // SIZES[weights], BLOCK_SIZE=1024, thresholds_ptr=None,
                      sums_ptr=None, sizes_ptr=None)
    constexprs.update({name: None for name, absent in (
        ("scales_ptr", acc_format != 2), ("keys_ptr", not acc_format),
        ("w_scales_ptr", not codes)) if absent})
    aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(signature.values())
               if v.startswith("*")}
    kernel = triton.compile(ASTSource(_classp_kernel, signature, constexprs, aligned),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = kernel.asm["ptx"]
    streamed = re.findall(r"ld\.global\.L1::evict_first[\w:.]*\.v([24])\.b32", ptx)
    results.append(dict(variant=f"{dtype} acc {acc_format} importance {weights} "
                                f"penalty {penalty}", cubin=len(kernel.asm["cubin"]),
                        streamed_bytes=4 * sum(int(n) for n in streamed),
                        expected_bytes=8 * (2 * SIZES[dtype] + SIZES[weights]),
                        mul_rn=len(re.findall(r"mul\.rn\.f32", ptx))))
print(json.dumps(results))
"""


def test_importance_formats_compile_for_sm90_ahead_of_time():
    """Real GPU code for bfloat16 and 8-bit importances, without a GPU: full blocks (1024
    elements, 4 warps: 8 per thread) stream grads, importances and anchors in vector loads
    with the evict-first hint, exactly their bytes (8-bit codes in 8-byte loads)."""
    results = compile_results(AOT_SCRIPT)
    assert len(results) == 7
    for result in results:
        assert result["cubin"] > 0 and result["mul_rn"] > 0, result
        assert result["streamed_bytes"] == result["expected_bytes"], result
