"""The Triton backend against the reference: on the GPU, or on the CPU through the interpreter."""
import itertools

import pytest
import torch

import classp_fused
from classp_fused.backends import triton as triton_backend
from classp_fused.backends.step_spec import Penalty, step_spec
from classp_fused.reference import classp_step_ as reference_step_
from helpers import bits, random_like
from triton_aot import compile_results

DEVICE = next((d for d in ("cuda", "cpu") if triton_backend.is_available(torch.device(d))), None)
pytestmark = [
    pytest.mark.skipif(DEVICE is None, reason="triton is not installed, or no GPU and "
                                              "TRITON_INTERPRET is not 1"),
    # masked-out elements run through log2(0) and x/0 in the interpreter's numpy
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]
CHUNK = triton_backend.CHUNK
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
HYPER = dict(lr=0.05, threshold=0.01, eps=1e-5, power=1.0, apply_scaling=True)
# importances, anchors, penalty_form, penalty_scale, importance_scales, relative_threshold,
# grad_sq_means, acc_scales, rounding_keys, index_offsets
NO_PENALTY = ([], [], "none", 0.0, [], 0.0, [], [], None, [])


def _case(shapes, dtype=torch.float32, seed=0, grad_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ([random_like(s, dtype, g) for s in shapes],
            [random_like(s, dtype, g, scale=0.6 * grad_scale) for s in shapes],
            [torch.rand(s, generator=g) + 1e-3 for s in shapes])


def _on_device(case):
    """Copies of ``case`` on DEVICE: on the CPU too, so that the reference steps its own."""
    return tuple([t.to(DEVICE, copy=True) for t in ts] for ts in case)


def _step(params, grads, accs, hyper, grad_scale=None, found_inf=None):
    """The op itself, with lr, grad_scale and found_inf on the params' device."""
    return triton_backend.classp_step_triton(
        params, grads, accs, torch.tensor(float(hyper["lr"]), device=DEVICE), hyper["threshold"],
        hyper["eps"], hyper["power"], hyper["apply_scaling"],
        None if grad_scale is None else grad_scale.to(DEVICE),
        None if found_inf is None else found_inf.to(DEVICE), *NO_PENALTY)


def _check_against_reference(shapes, dtype, hyper, steps=2, exact=False, **amp):
    """Run ``steps`` steps on the kernel and on the reference; compare counts, params and accs."""
    ref = _case(shapes, dtype, grad_scale=float(amp.get("grad_scale", 1.0)))
    ours = _on_device(ref)
    for _ in range(steps):
        counts = _step(*ours, hyper, **amp)
        assert torch.equal(counts.cpu(), reference_step_(*ref, **hyper, **amp))
    for mine, theirs in zip(ours[0] + ours[2], ref[0] + ref[2]):
        if exact:
            assert torch.equal(bits(mine.cpu()), bits(theirs))
        else:
            torch.testing.assert_close(mine.cpu(), theirs, **TOLERANCE[theirs.dtype])
    return ours, counts


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("threshold", [0.0, 0.09, 1e30])
@pytest.mark.parametrize("apply_scaling", [True, False])
def test_powers_thresholds_and_scaling(power, threshold, apply_scaling):
    hyper = dict(HYPER, power=power, threshold=threshold, apply_scaling=apply_scaling)
    _, counts = _check_against_reference([(257,), (3, 41)], torch.float32, hyper)
    if threshold == 1e30:
        assert counts[:, 0].sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_param_dtypes(dtype, power):
    _check_against_reference([(1000,), (7, 9)], dtype, dict(HYPER, power=power))


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU's division and rsqrt may differ by an ulp")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fast_powers_are_bit_exact_in_the_interpreter(dtype, power):
    _check_against_reference([(CHUNK + 77,)], dtype, dict(HYPER, power=power), exact=True)


@pytest.mark.parametrize("shapes", [[(0,)], [(1,)], [()], [(0,), (5,), (0, 3)], [(4099,)],
                                    [(CHUNK,)], [(2 * CHUNK + 5,), (3,)]],
                         ids=["empty", "one", "0-dim", "with-empty", "odd", "chunk", "chunks+tail"])
def test_sizes(shapes):
    _check_against_reference(shapes, torch.float32, HYPER)


def test_many_tensors_of_three_dtypes_take_one_launch_per_dtype(monkeypatch):
    launches = []
    launch = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: (
        launches.append(args[1].dtype), launch(*args, **kwargs)))
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 300, (60,), generator=g).tolist()
    dtypes = itertools.cycle([torch.float32, torch.bfloat16, torch.float16])
    ref = [[], [], []]
    for size, dtype in zip(sizes, dtypes):
        for dest, t in zip(ref, _case([(size,)], dtype, seed=size)):
            dest.extend(t)
    ours = _on_device(ref)
    counts = _step(*ours, HYPER)
    assert sorted(map(str, launches)) == ["torch.bfloat16", "torch.float16", "torch.float32"]
    assert torch.equal(counts.cpu(), reference_step_(*ref, **HYPER))
    for mine, theirs in zip(ours[0] + ours[2], ref[0] + ref[2]):
        torch.testing.assert_close(mine.cpu(), theirs, **TOLERANCE[theirs.dtype])


def test_repeated_steps_reuse_the_chunk_table(monkeypatch):
    """Tables are cached by their entries (relative offsets, sizes): earlier tests may have
    cached those of this test's tensors, so it starts from an empty cache."""
    monkeypatch.setattr(triton_backend, "_tables", type(triton_backend._tables)())
    built = []
    chunk_table = triton_backend.chunk_table
    monkeypatch.setattr(triton_backend, "chunk_table", lambda *args: (
        built.append(args[0]), chunk_table(*args))[1])
    params, grads, accs = _on_device(_case([(300,), (20, 20)]))
    _step(params, grads, accs, HYPER)
    _step(params, grads, accs, HYPER)
    assert len(built) == 1
    _step(params[:1], grads[:1], accs[:1], HYPER)  # another set of tensors: another table
    assert len(built) == 2


def test_persistent_programs_cover_every_chunk():
    """More chunks than programs: each program strides over several chunks of several rows."""
    assert triton_backend._grid(4 * triton_backend.INTERPRETED_PROGRAMS + 1, torch.device("cpu")) \
        == triton_backend.INTERPRETED_PROGRAMS
    assert triton_backend._grid(9, torch.device("cpu")) == 3  # three chunks each, not 4+4+1
    _check_against_reference([(5,), (CHUNK + 1,), (7,), (2 * CHUNK,), (1,), (3, 3), (CHUNK,),
                              (200,), (2,), (CHUNK + 3,)], torch.float32, HYPER, steps=1)


def test_non_contiguous_and_misaligned_members_are_written_through():
    g = torch.Generator().manual_seed(9)
    bases = [random_like(shape, generator=g).to(DEVICE) for shape in ((40, 30), (40, 30), (201,))]
    base_g = random_like((40, 30), generator=g).to(DEVICE)
    base_a = torch.rand(1201, generator=g).to(DEVICE)
    params = [bases[0].t(), bases[1][:, ::3], bases[2][1:]]  # the last starts 4 bytes in
    grads = [base_g.t().contiguous(), base_g[:, 1::3], base_g.view(-1)[5:205]]
    accs = [base_a[1:].view(30, 40), torch.rand(40, 10, generator=g).to(DEVICE),
            torch.rand(200, generator=g).to(DEVICE)]
    assert not params[1].is_contiguous() and params[2].data_ptr() % 16
    ref = [[t.cpu().clone() for t in ts] for ts in (params, grads, accs)]
    hyper = dict(HYPER, threshold=0.02)
    assert torch.equal(_step(params, grads, accs, hyper).cpu(), reference_step_(*ref, **hyper))
    for mine, theirs in zip(params + accs, ref[0] + ref[2]):
        torch.testing.assert_close(mine.cpu(), theirs, **TOLERANCE[torch.float32])
    torch.testing.assert_close(bases[0].t().cpu(), ref[0][0], **TOLERANCE[torch.float32])


def test_neighbours_are_neither_read_nor_written():
    """Tensors inside poisoned buffers, the group's first at the highest address."""
    numels = [CHUNK + 3, 5, 17]
    buffers = [torch.full((sum(numels) + 64,), float("nan"), device=DEVICE) for _ in range(3)]
    poison = [bits(b).clone() for b in buffers]
    starts = [64, 8, 24]  # 16-byte aligned, so stepped in place
    views = [[b[s:s + n] for s, n in zip(starts, numels)] for b in buffers]
    for view, values in zip(views, _case([(n,) for n in numels])):
        for v, x in zip(view, values):
            v.copy_(x)
    ref = [[v.cpu().clone() for v in vs] for vs in views]
    counts = _step(*views, HYPER)
    assert torch.equal(counts.cpu(), reference_step_(*ref, **HYPER))
    assert counts[:, 1].sum() == 0  # no poisoned gradient was read
    inside = torch.zeros(buffers[0].numel(), dtype=torch.bool)
    for s, n in zip(starts, numels):
        inside[s:s + n] = True
    for buffer, before in zip(buffers, poison):
        assert torch.equal(bits(buffer).cpu()[~inside], before.cpu()[~inside])


def test_grad_scale_unscales_inside_the_kernel():
    _check_against_reference([(500,), (9, 9)], torch.float32, dict(HYPER, power=2.0),
                             grad_scale=torch.tensor(256.0))


def test_found_inf_changes_and_counts_nothing():
    params, grads, accs = _on_device(_case([(CHUNK + 9,), (9, 9)]))
    grads[0][::3] = float("nan")
    before = [bits(t).clone() for t in params + accs]
    counts = _step(params, grads, accs, HYPER, grad_scale=torch.tensor(8.0),
                   found_inf=torch.tensor(1.0))
    assert torch.equal(counts.cpu(), torch.zeros(2, 2, dtype=torch.int64))
    assert all(torch.equal(bits(t), b) for t, b in zip(params + accs, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_gradients_are_counted_and_skipped(dtype):
    ref = _case([(CHUNK + 300,), (13, 7)], dtype)
    for grad in ref[1]:
        flat = grad.view(-1)
        for i, value in zip(range(0, flat.numel(), 7), itertools.cycle(
                [float("nan"), float("inf"), -float("inf")])):
            flat[i] = value
    ours = _on_device(ref)
    before = [bits(t).clone() for t in ours[0] + ours[2]]
    counts = _step(*ours, dict(HYPER, threshold=0.0))
    assert torch.equal(counts.cpu(), reference_step_(*ref, **dict(HYPER, threshold=0.0)))
    assert counts[:, 1].tolist() == [-(-t.numel() // 7) for t in ref[1]]
    for t, b, grad in zip(ours[0] + ours[2], before, ours[1] * 2):
        skipped = ~torch.isfinite(grad)
        assert torch.equal(bits(t)[skipped], b[skipped])
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_out_elements_are_bit_identical(dtype):
    g = torch.Generator().manual_seed(2)
    param = random_like((CHUNK + 31,), dtype, g)
    param[::5] = -0.0
    param[1::97] = float("nan")
    grad = random_like((CHUNK + 31,), dtype, g, scale=0.3)
    acc = torch.rand(CHUNK + 31, generator=g)
    masked_out = grad.float() ** 2 <= 0.09
    before_p, before_a = bits(param).clone(), bits(acc).clone()
    param, grad, acc = param.to(DEVICE), grad.to(DEVICE), acc.to(DEVICE)
    counts = _step([param], [grad], [acc], dict(HYPER, threshold=0.09))
    assert counts[0, 0] == (~masked_out).sum()
    assert torch.equal(bits(param).cpu()[masked_out], before_p[masked_out])
    assert torch.equal(bits(acc).cpu()[masked_out], before_a[masked_out])
    assert (bits(acc).cpu()[~masked_out] != before_a[~masked_out]).all()


def test_lr_is_read_from_its_tensor():
    lr = torch.tensor(0.05, dtype=torch.float64)
    params, grads, accs = _on_device(_case([(700,)]))
    ref = _case([(700,)])
    triton_backend.step(params, grads, accs, step_spec(lr, 0.01, 1e-5, 1.0, True))
    lr.fill_(0.0)
    triton_backend.step(params, grads, accs, step_spec(lr, 0.01, 1e-5, 1.0, True))
    reference_step_(*ref, **HYPER)
    torch.testing.assert_close(params[0].cpu(), ref[0][0], **TOLERANCE[torch.float32])


def test_public_entry_point_and_optimizer():
    params, grads, accs = _on_device(_case([(64,), (8, 8)]))
    ref = _case([(64,), (8, 8)])
    counts = classp_fused.classp_step_(params, grads, accs, backend="triton", **HYPER)
    assert torch.equal(counts.cpu(), reference_step_(*ref, **HYPER))
    model = torch.nn.Linear(6, 3).to(DEVICE)
    before = model.weight.detach().clone()
    opt = classp_fused.CLASSP(model.parameters(), lr=0.05, backend="triton")
    model(torch.randn(4, 6, device=DEVICE)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)


def test_traceable_body_steps_concatenated_copies(monkeypatch):
    """The op body torch.compile traces, run eagerly with the in-place kernel switched off."""
    kernels = []
    launch = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: (
        kernels.append(args[0]), launch(*args, **kwargs)))
    shapes = [(CHUNK + 5,), (3, 7), (0,), (1,)]
    for dtype in (torch.float32, torch.bfloat16):
        ref = _case(shapes, dtype)
        ours = _on_device(ref)
        with triton_backend.classp_step_triton.set_kernel_enabled(DEVICE, False):
            counts = _step(*ours, dict(HYPER, power=2.0), grad_scale=torch.tensor(2.0))
        assert kernels.pop() is triton_backend._classp_kernel_autotuned
        expected = reference_step_(*ref, **dict(HYPER, power=2.0), grad_scale=torch.tensor(2.0))
        assert torch.equal(counts.cpu(), expected)
        for mine, theirs in zip(ours[0] + ours[2], ref[0] + ref[2]):
            torch.testing.assert_close(mine.cpu(), theirs, **TOLERANCE[theirs.dtype])


@pytest.mark.parametrize("form", ["explicit", "proximal"])
def test_traceable_body_takes_the_penalty(form):
    """The op body torch.compile traces, with a penalty on all params but one."""
    shapes = [(CHUNK + 5,), (3, 7), (0,), (9,)]
    for dtype in (torch.float32, torch.bfloat16):
        ref = _case(shapes, dtype, seed=2)
        g = torch.Generator().manual_seed(3)
        importances = [random_like(s, dtype, g).abs() for s in shapes]
        anchors = [random_like(s, dtype, g) for s in shapes]
        importances[3] = anchors[3] = None
        ours = _on_device(ref)
        penalty = ([None if t is None else t.to(DEVICE) for t in importances],
                   [None if t is None else t.to(DEVICE) for t in anchors], form, 0.5, [], 0.0,
                   [], [], None, [])
        with triton_backend.classp_step_triton.set_kernel_enabled(DEVICE, False):
            counts = triton_backend.classp_step_triton(
                *ours, torch.tensor(0.05, device=DEVICE), 0.01, 1e-5, 2.0, True, None, None,
                *penalty)
        expected = reference_step_(*ref, **dict(HYPER, power=2.0),
                                   penalty=Penalty(form, 0.5, importances, anchors))
        assert torch.equal(counts.cpu(), expected)
        for mine, theirs in zip(ours[0] + ours[2], ref[0] + ref[2]):
            torch.testing.assert_close(mine.cpu(), theirs, **TOLERANCE[theirs.dtype])


def test_float64_params_are_refused_by_name():
    p = torch.ones(3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="torch.float64"):
        _step([p], [p.clone()], [torch.zeros_like(p)], HYPER)


def test_is_available():
    assert triton_backend.is_available(torch.device(DEVICE))
    assert not triton_backend.is_available(torch.device("meta"))
    assert triton_backend.is_available(torch.device("cuda")) == (
        DEVICE == "cuda" and not triton_backend.INTERPRET)


@pytest.mark.parametrize("amp", [False, True])
def test_opcheck(amp):
    params, grads, accs = _on_device(_case([(300,), (4, 5)]))
    bf16 = _on_device(_case([(70,)], torch.bfloat16))
    extra = [torch.tensor(v, device=DEVICE) if amp else None for v in (2.0, 0.0)]
    args = (params + bf16[0], grads + bf16[1], accs + bf16[2], torch.tensor(0.05, device=DEVICE),
            0.01, 1e-5, 2.0, True, *extra)
    torch.library.opcheck(triton_backend.classp_step_triton, (*args, *NO_PENALTY))
    covered = [p.abs() for p in args[0]]
    covered[1] = None  # a param the penalty does not cover
    anchors = [None if w is None else w.neg() for w in covered]
    for form in ("explicit", "proximal"):
        torch.library.opcheck(triton_backend.classp_step_triton,
                              (*args, covered, anchors, form, 0.5, [], 0.0, [], [], None, []))


def test_chunk_table_offsets_past_two_to_the_31():
    """The chunk map in int64, built for numels and offsets no test could allocate."""
    big = 2 ** 31 + 5
    table = triton_backend.chunk_table(((0, 2 ** 33, -(2 ** 32), big, 3, 2 ** 34, 5, 6,
                                         2 ** 35, 2 ** 36),
                                        (big + 11, 2 ** 40, 7, 9, 0, 0, 0, 0, 0, 0)))
    n_big = -(-big // CHUNK)
    assert table.dtype == torch.int64 and table.shape == (n_big + 1, triton_backend.TABLE_COLUMNS)
    last = n_big - 1
    assert table[last].tolist() == [last * CHUNK, 2 ** 33 + last * CHUNK,
                                    -(2 ** 32) + last * CHUNK, big - last * CHUNK, 3,
                                    2 ** 34 + last * CHUNK, 5 + last * CHUNK,
                                    6 + last * CHUNK // 256, 2 ** 35 + last * CHUNK,
                                    2 ** 36 + last * CHUNK // 256]
    assert table[last - 1, 3] == CHUNK and table[last, 0] >= 2 ** 31
    assert table[-1].tolist() == [big + 11, 2 ** 40, 7, 9, 0, 0, 0, 0, 0, 0]
    assert torch.equal(table[:n_big, 3].sum(), torch.tensor(big))


AOT_SCRIPT = r"""
import json
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from classp_fused.backends.triton import _classp_kernel

results = []
variants = [(d, p, True, 0, False) for d in ("fp32", "bf16", "fp16") for p in (1, 2, 0)]
variants += [("fp32", 1, False, 0, False)]
variants += [(d, p, True, penalty, False)
             for d in ("fp32", "bf16") for p in (2, 0) for penalty in (1, 2)]
variants += [(d, 1, True, 1, True) for d in ("fp32", "bf16")]  # the relative threshold
for dtype, power, amp, penalty, relative in variants:
    scalar = "*fp32" if amp else "constexpr"
    # amp: grad_scale and found_inf pointers and a tensor lr; else neither, and lr by value
    lr = "*fp64" if amp else "constexpr"
    weights = "*" + dtype if penalty else "constexpr"  # importances and anchors
    signature = dict(p_ptr="*" + dtype, g_ptr="*" + dtype, a_ptr="*fp32", w_ptr=weights,
                     m_ptr=weights, table_ptr="*i64",
                     num_chunks="i64" if amp else "i32",  # as Triton types the int it gets
                     counts_ptr="*i64", lr_ptr=lr, lr_value="fp32",
                     grad_scale_ptr=scalar, found_inf_ptr=scalar, threshold="fp32", eps="fp32",
                     power="fp32", factor="fp32", cap="fp32",
                     thresholds_ptr="*fp32" if relative else "constexpr",
                     sums_ptr="*fp32" if relative else "constexpr",
                     sizes_ptr="*i64" if relative else "constexpr", scales_ptr="constexpr",
                     keys_ptr="constexpr", w_scales_ptr="constexpr", FAST_POWER="constexpr",
                     APPLY_SCALING="constexpr", PENALTY="constexpr", ACC_FORMAT="constexpr",
                     GROUP="constexpr", ACC_ALIGN="constexpr", W_ALIGN="constexpr",
                     BLOCK_SIZE="constexpr")
    constexprs = dict(FAST_POWER=power, APPLY_SCALING=amp, PENALTY=penalty, ACC_FORMAT=0,
                      GROUP=8 if dtype == "fp32" else 16, ACC_ALIGN=4,
                      W_ALIGN=4 if dtype == "fp32" else 8, BLOCK_SIZE=1024,
                      scales_ptr=None, keys_ptr=None, w_scales_ptr=None)
    if not amp:
        constexprs.update(lr_ptr=None, grad_scale_ptr=None, found_inf_ptr=None)
    if not penalty:
        constexprs.update(w_ptr=None, m_ptr=None)
    if not relative:
        constexprs.update(thresholds_ptr=None, sums_ptr=None, sizes_ptr=None)
    aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(signature.values())
               if v.startswith("*")}
    kernel = triton.compile(ASTSource(_classp_kernel, signature, constexprs, aligned),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"ld\.global[\w:.]*\.v4", ptx)
    results.append(dict(variant=f"{dtype} power path {power} amp {amp} penalty {penalty} "
                                f"relative {relative}",
                        penalty=penalty, cubin=len(kernel.asm["cubin"]), ld_v4=len(loads),
                        ld_v4_evict_first=sum("evict_first" in load for load in loads),
                        st_v4=len(re.findall(r"st\.global[\w:.]*\.v4", ptx))))
print(json.dumps(results))
"""


def test_kernel_compiles_for_sm90_ahead_of_time():
    """Real GPU code for every power path and dtype, without a GPU: catches GPU-only lowering
    errors the interpreter cannot, and checks that full blocks use 128-bit loads and stores."""
    results = compile_results(AOT_SCRIPT)
    assert len(results) == 20
    for result in results:
        assert result["cubin"] > 0, result
        # params, grads and accs of a full block (with a penalty also importances and anchors):
        # vector loads, grads (importances, anchors) with the evict-first hint; params and
        # accs: vector stores
        streamed = 3 if result["penalty"] else 1
        assert result["ld_v4"] >= 2 + streamed and result["st_v4"] >= 2, result
        assert result["ld_v4_evict_first"] >= streamed, result
        assert result["ld_v4_evict_first"] >= 1, result
