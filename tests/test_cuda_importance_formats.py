"""The CUDA kernel with importances in every importance format (the param's dtype, bfloat16,
8-bit codes with block scales) against the reference backend: counts, accumulators and their
scales bit for bit, params to a tolerance. Needs a GPU (the kernel is compiled without one by
tests/test_cuda_compile.py)."""
import dataclasses

import pytest
import torch

from classp_fused import available_backends
from classp_fused.backends import cuda as cuda_backend
from compressed_cases import copies
from helpers import bits
from importance_cases import (COMPRESSED_MEMBERS, TRANSPOSED_MEMBERS, Member,
                              assert_matches_reference, make_case, mixed_members, off_alignment)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in available_backends("cuda")),
    reason="needs a GPU")
CHUNK = 1 << 16  # the CUDA kernel's chunk (csrc/classp_plan.h)
FORMS = ["explicit", "proximal"]


def _check(members, form, **options):
    return assert_matches_reference(cuda_backend.step, "cuda", members, form,
                                    exact_params=False, **options)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_formats_and_uncovered_tensors(dtype, form):
    _check(mixed_members(dtype), form)


@pytest.mark.parametrize("form", FORMS)
def test_beside_compressed_accumulators(form):
    _check(COMPRESSED_MEMBERS, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("acc", ["fp32", "bf16", "8bit"])
def test_tensors_over_several_chunks(acc, form):
    """Chunks after the first read their importances' scales from their own first block on."""
    _check([Member((2 * CHUNK + 300,), importance="8bit", acc=acc),
            Member((CHUNK + 5000,), importance="bf16", acc=acc),
            Member((CHUNK + 17,), torch.float16, "8bit", acc)], form)


@pytest.mark.parametrize("power, apply_scaling", [(1.0, True), (2.0, False)])
def test_powers_and_no_scaling(power, apply_scaling):
    hyper = dict(lr=0.05, threshold=0.01, eps=1e-5, power=power, apply_scaling=apply_scaling)
    _check(mixed_members(torch.float32)[:2] + COMPRESSED_MEMBERS[:1], "proximal", hyper=hyper)


def test_float64_params_beside_compressed_importances():
    _check([Member((500,), torch.float64, "param"), Member((5000,), torch.float32, "8bit"),
            Member((300,), torch.float64, None)], "explicit")


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_params(form):
    _check(TRANSPOSED_MEMBERS, form)


def test_importances_off_16_bytes():
    """Codes, block scales and bfloat16 importances that do not start on 16 bytes: the
    kernel's element-at-a-time paths."""
    _check(COMPRESSED_MEMBERS[:3] + mixed_members(torch.float16)[:2], "explicit",
           layout=off_alignment)


def test_found_inf_leaves_everything_alone():
    case = make_case(COMPRESSED_MEMBERS[:3], "proximal").on("cuda")
    before = [bits(t).clone() for t in case.state()]
    spec = dataclasses.replace(case.spec(0), found_inf=torch.tensor(1.0, device="cuda"))
    counts = cuda_backend.step(case.params, copies(case.grads(0), "cuda"), case.accs, spec)
    assert not counts.any()
    assert all(torch.equal(bits(t), b) for t, b in zip(case.state(), before))
