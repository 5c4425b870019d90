"""CLASSP(state_dtype="bf16" | "8bit"): compressed accumulators in the optimizer.

Every backend that steps compressed state (its module's ``COMPRESSED_STATE``) gives the
reference's codes, scales and bfloat16 bits bit for bit; state_dict converts between formats and
resumes bit for bit; the rounding tracks the exact accumulator.
"""
import copy
import functools
import pickle

import pytest
import torch
from torch import nn

import distributed_helpers
from classp_fused import CLASSP, classp_step_, optim, state_formats
from classp_fused.backends import foreach, param_dtypes, steps_compressed_state
from classp_fused.backends.step_spec import CompressedState, Penalty, step_spec
from classp_fused.checkpoint import load_checkpoint, save_checkpoint
from classp_fused.reference import classp_step_ as reference_step_
from classp_fused.reference import compute_dtype
from classp_fused.state_formats import BLOCK, num_blocks, tensor_key
from distributed_helpers import requires_gloo
from helpers import CPU_BACKENDS, bits, peak_extra_bytes, random_like, random_with_zeros
from test_optim_contract import assert_unchanged, snapshot

COMPRESSED = ("bf16", "8bit")
HYPER = dict(lr=0.05, threshold=1e-3, eps=1e-5)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """A CPU backend that steps compressed accumulators (its module's ``COMPRESSED_STATE``);
    the others are skipped."""
    if not steps_compressed_state(request.param):
        pytest.skip(f"backend {request.param!r} does not step compressed accumulators")
    return request.param


def _params(generator, backend="torch"):
    """The params ``backend`` steps, of: a large param (several foreach chunks, a short last block), a transposed one (not
    contiguous, several chunks), a bf16 one, and two that stay exact: small, float64."""
    params = [nn.Parameter(random_like((300, 250), generator=generator)),
            nn.Parameter(random_like((180, 200), generator=generator).t()),
            nn.Parameter(random_like((80, 64), torch.bfloat16, generator)),
            nn.Parameter(random_like((100,), generator=generator)),
            nn.Parameter(random_like((5000,), torch.float64, generator))]
    return [p for p in params if p.dtype in param_dtypes(backend)]


def _grads(params, steps, generator):
    return [[random_with_zeros(p.shape, p.dtype, generator, scale=0.1) for p in params]
            for _ in range(steps)]


def _reference_run(params, grads_per_step, state_dtype, seed=0, relative_threshold=0.0,
                   **hyper):
    """The reference step (classp_fused.reference) on clones, with the formats' own state and
    the keys of ``tensor_key(seed, step)``: (params, accs, scales, grad means)."""
    params = [p.detach().clone() for p in params]
    accs, scales = [], []
    for p in params:
        dtype = state_formats.compressed_dtype(p, state_dtype)
        accs.append(torch.zeros(p.shape, dtype=dtype or compute_dtype(p)))
        scales.append(torch.zeros(num_blocks(p.numel())) if dtype == torch.uint8 else None)
    means = [torch.zeros((), dtype=compute_dtype(p)) for p in params]
    hyper = {"power": 1.0, "apply_scaling": True, **hyper}
    for step, grads in enumerate(grads_per_step):
        keys = tensor_key(seed, torch.full((len(params),), float(step)))
        reference_step_(params, grads, accs, **hyper, relative_threshold=relative_threshold,
                        grad_sq_means=means if relative_threshold > 0 else None,
                        compressed=CompressedState(scales, keys, [0] * len(params)))
    return params, accs, scales, means


def _train(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("state_dtype", COMPRESSED)
@pytest.mark.parametrize("options", [dict(power=1.0), dict(power=2.0, relative_threshold=0.5)],
                         ids=["power1", "power2-relative"])
def test_steps_match_the_reference_bit_for_bit(backend, state_dtype, options):
    g = torch.Generator().manual_seed(0)
    params = _params(g, backend)
    grads = _grads(params, 4, g)
    expected = _reference_run(params, grads, state_dtype, seed=7, **HYPER, **options)
    optimizer = CLASSP(params, **HYPER, **options, backend=backend, state_dtype=state_dtype,
                       state_seed=7)
    _train(optimizer, params, grads)
    assert len(optimizer._plans) == 1  # the steps after the first ran on the group's plan
    for p, ref_p, ref_acc, ref_scales, ref_mean in zip(params, *expected):
        state = optimizer.state[p]
        assert state["accumulator"].dtype == ref_acc.dtype and state["step"].item() == 4
        if ref_acc.dtype in (torch.bfloat16, torch.uint8):
            if backend in ("torch", "foreach"):  # the reference's own ops
                assert torch.equal(bits(p), bits(ref_p))
            else:
                torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
            assert torch.equal(state["accumulator"], ref_acc)
        else:  # exact accumulators: the backend's own arithmetic
            torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state["accumulator"], ref_acc, rtol=1e-5, atol=1e-6)
        if ref_scales is None:
            assert "accumulator_scales" not in state
        else:
            assert torch.equal(state["accumulator_scales"], ref_scales)
        if "relative_threshold" in options:
            torch.testing.assert_close(state["grad_sq_mean"], ref_mean, rtol=1e-5, atol=0)


@pytest.mark.parametrize("state_dtype", COMPRESSED)
@pytest.mark.parametrize("form", [None, "explicit", "proximal"])
def test_foreach_steps_compressed_chunks_like_the_reference(state_dtype, form):
    """Every option of the step on a transposed tensor of several chunks (a short last block),
    an AMP scale, gradient means and a penalty, against the reference on the whole tensor."""
    g = torch.Generator().manual_seed(1)
    param = random_like((300, 250), generator=g).t()
    grad = random_with_zeros(param.shape, generator=g, scale=200.0)
    dtype = state_formats.compressed_dtype(param, state_dtype)
    acc = torch.zeros(param.shape, dtype=dtype)
    scales = torch.zeros(num_blocks(param.numel())) if dtype == torch.uint8 else None
    mean = torch.tensor(1e-3)
    terms = [random_like(param.shape, generator=g).abs(), random_like(param.shape, generator=g)]
    penalty = None if form is None else Penalty(form, 0.3, [terms[0].t().contiguous().t()],
                                                [terms[1]])
    runs = []
    for backend in ("foreach", "torch"):
        p, a, m = param.clone(), acc.clone(), mean.clone()  # clone keeps the transposed layout
        s = None if scales is None else scales.clone()
        for step in range(3):
            counts = classp_step_(
                [p], [grad], [a], **HYPER, grad_scale=torch.tensor(256.0),
                found_inf=torch.tensor(0.0), penalty=penalty, relative_threshold=0.5,
                grad_sq_means=[m], backend=backend,
                compressed=CompressedState([s], tensor_key(3, torch.tensor([step])), [5]))
        runs.append((p, a, s, m, counts))
    (p, a, s, m, counts), (ref_p, ref_a, ref_s, ref_m, ref_counts) = runs
    assert not p.is_contiguous() and param.numel() > 2 * foreach.chunk_elements(p.device)
    assert torch.equal(bits(p), bits(ref_p)) and torch.equal(a, ref_a)
    assert s is None or torch.equal(s, ref_s)
    assert torch.equal(counts, ref_counts) and 0 < counts[0, 0] < param.numel()
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=0)


def test_foreach_temporaries_stay_bounded_by_a_chunk():
    """An 8-bit step's extra memory does not grow with the tensor: it is bounded by a chunk."""
    peaks = []
    for n in (2 ** 20, 2 ** 22):
        param, grad = torch.zeros(n), torch.full((n,), 0.5)
        acc = torch.zeros(n, dtype=torch.uint8)
        compressed = CompressedState([torch.zeros(num_blocks(n))],
                                     torch.zeros(1, dtype=torch.int64), [0])
        spec = step_spec(0.05, 0.0, 1e-5, 1.0, True, compressed=compressed)
        peaks.append(peak_extra_bytes(lambda: foreach.step([param], [grad], [acc], spec)))
        assert (acc != 0).all()
    assert peaks[1] <= peaks[0] * 1.01 and peaks[0] < 2 ** 20 * 4


def test_fp32_state_is_unchanged_and_steps_without_compressed_state(monkeypatch, backend):
    """state_dtype="fp32" (and compressed formats on params that all stay exact) step as the
    default optimizer does, with no compressed state in the step."""
    specs = []
    run_backend = optim.run_backend
    monkeypatch.setattr(optim, "run_backend", lambda name, params, grads, accs, spec: (
        specs.append(spec), run_backend(name, params, grads, accs, spec))[1])
    runs = []
    for state_dtype, shapes in (("fp32", [(60, 70), (10,)]), (None, [(60, 70), (10,)]),
                                ("8bit", [(60, 60), (10,)])):
        params = [nn.Parameter(torch.full(s, 0.5)) for s in shapes]
        grads = _grads(params, 3, torch.Generator().manual_seed(3))
        kwargs = {} if state_dtype is None else dict(state_dtype=state_dtype)
        optimizer = CLASSP(params, **HYPER, backend=backend, **kwargs)
        _train(optimizer, params, grads)
        for p in params:
            assert optimizer.state[p].keys() == {"step", "accumulator"}
            assert optimizer.state[p]["accumulator"].dtype == torch.float32
        runs.append((params, optimizer))
    assert specs and all(spec.compressed is None for spec in specs)
    (fp32, fp32_opt), (default, default_opt) = runs[:2]
    for p, q in zip(fp32, default):
        assert torch.equal(p, q)
        assert torch.equal(fp32_opt.state[p]["accumulator"], default_opt.state[q]["accumulator"])


@pytest.mark.parametrize("state_dtype", COMPRESSED)
def test_small_and_float64_params_stay_exact(state_dtype):
    params = [nn.Parameter(torch.ones(4095)), nn.Parameter(torch.ones(4096)),
              nn.Parameter(torch.ones(64, 64, dtype=torch.float64)),
              nn.Parameter(torch.ones(4096, dtype=torch.float16))]
    optimizer = CLASSP(params, lr=0.1, backend="torch", state_dtype=state_dtype)
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    optimizer.step()
    compressed = torch.bfloat16 if state_dtype == "bf16" else torch.uint8
    dtypes = [optimizer.state[p]["accumulator"].dtype for p in params]
    assert dtypes == [torch.float32, compressed, torch.float64, compressed]
    assert [("accumulator_scales" in optimizer.state[p]) for p in params] == [
        False, state_dtype == "8bit", False, state_dtype == "8bit"]


@pytest.mark.parametrize("state_dtype, per_element", [("fp32", 4.0), ("bf16", 2.0),
                                                      ("8bit", 1.05)])
def test_state_bytes_per_element(state_dtype, per_element):
    p = nn.Parameter(torch.zeros(512, 1024))
    optimizer = CLASSP([p], lr=0.1, backend="torch", state_dtype=state_dtype)
    p.grad = torch.ones_like(p)
    optimizer.step()
    expected = {"fp32": 4, "bf16": 2, "8bit": 1 + 4 / BLOCK}[state_dtype] * p.numel() + 4
    assert optimizer.state_bytes() == expected <= per_element * p.numel() + 4


@pytest.mark.parametrize("state_dtype", COMPRESSED)
def test_found_inf_step_changes_nothing(backend, state_dtype):
    g = torch.Generator().manual_seed(4)
    params = _params(g, backend)
    optimizer = CLASSP(params, **HYPER, backend=backend, state_dtype=state_dtype)
    _train(optimizer, params, _grads(params, 2, g))
    for p, grad in zip(params, _grads(params, 1, g)[0]):
        p.grad = grad * 1024
    before = snapshot(optimizer)
    del before["telemetry"]  # the step counts no update
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf
    assert optimizer.last_update_fraction == 0.0
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("state_dtype", COMPRESSED)
def test_resume_from_a_checkpoint_continues_bit_for_bit(tmp_path, backend, state_dtype):
    g = torch.Generator().manual_seed(5)
    params = _params(g, backend)
    initial = [p.detach().clone() for p in params]
    grads = _grads(params, 6, g)
    straight = CLASSP(params, **HYPER, backend=backend, state_dtype=state_dtype, state_seed=11)
    _train(straight, params, grads)

    first = [nn.Parameter(t.clone()) for t in initial]
    optimizer = CLASSP(first, **HYPER, backend=backend, state_dtype=state_dtype, state_seed=11)
    _train(optimizer, first, grads[:3])
    path = tmp_path / "run.pt"
    save_checkpoint({"params": [p.detach() for p in first], "optimizer": optimizer.state_dict()},
                    path)
    saved = load_checkpoint(path)
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    resumed_optimizer = CLASSP(resumed, **HYPER, backend=backend, state_dtype=state_dtype,
                               state_seed=11)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _train(resumed_optimizer, resumed, grads[3:])
    for p, q in zip(resumed, params):
        assert torch.equal(bits(p), bits(q))
        for key, value in straight.state[q].items():
            assert torch.equal(resumed_optimizer.state[p][key], value), key


@functools.lru_cache(maxsize=None)
def _trained_once(state_dtype, steps, seed):
    g = torch.Generator().manual_seed(6)
    params = _params(g)
    optimizer = CLASSP(params, **HYPER, backend="torch", state_dtype=state_dtype,
                       state_seed=seed)
    _train(optimizer, params, _grads(params, steps, g))
    return optimizer


def _trained(state_dtype, steps=3, seed=0):
    """A copy of an optimizer (and its params) trained ``steps`` steps on ``_params``."""
    optimizer = copy.deepcopy(_trained_once(state_dtype, steps, seed))
    return optimizer.param_groups[0]["params"], optimizer


def _fresh(params, state_dtype, seed=0):
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    return copies, CLASSP(copies, **HYPER, backend="torch", state_dtype=state_dtype,
                          state_seed=seed)


def _decoded(state):
    acc = state["accumulator"]
    if acc.dtype != torch.uint8:
        return acc.to(torch.float64 if acc.dtype == torch.float64 else torch.float32)
    return state_formats.decode(acc.reshape(-1), state["accumulator_scales"]).reshape(acc.shape)


def test_fp32_state_loads_into_8bit_and_back_within_the_quantization_error(tmp_path):
    params, optimizer = _trained("fp32")
    path = tmp_path / "fp32.pt"
    save_checkpoint(optimizer.state_dict(), path)
    quantized = []
    for _ in range(2):  # twice: the rounding is deterministic
        copies, eight = _fresh(params, "8bit", seed=3)
        eight.load_state_dict(load_checkpoint(path))
        quantized.append([eight.state[p] for p in copies])
    for p, a, b in zip(params, *quantized):
        exact = optimizer.state[p]["accumulator"]
        assert a["accumulator"].dtype == (state_formats.compressed_dtype(p, "8bit")
                                          or exact.dtype)
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert a["step"].item() == 3
        if a["accumulator"].dtype == torch.uint8:
            scale = a["accumulator_scales"].repeat_interleave(BLOCK)[:p.numel()].view(p.shape)
            error = (_decoded(a) - exact).abs()
            assert (error <= exact * 2 ** -3 + scale * 2 ** -34).all()
            assert ((_decoded(a) > 0) == (exact > 0)).all()
        else:
            assert torch.equal(a["accumulator"], exact)
    save_checkpoint(eight.state_dict(), path)
    back_params, back = _fresh(params, "fp32")
    back.load_state_dict(load_checkpoint(path))
    for p, q in zip(copies, back_params):
        assert back.state[q].keys() == {"step", "accumulator"}
        assert back.state[q]["accumulator"].dtype == compute_dtype(q)
        assert torch.equal(back.state[q]["accumulator"], _decoded(eight.state[p]))


def test_fp32_state_loads_into_bf16_rounded_with_the_params_key_at_its_step():
    params, optimizer = _trained("fp32", steps=5)
    copies, bf16 = _fresh(params, "bf16", seed=9)
    bf16.load_state_dict(optimizer.state_dict())
    value = optimizer.state[params[0]]["accumulator"].reshape(-1)
    bits_ = state_formats.element_bits(tensor_key(9, torch.tensor(5.0)),
                                       torch.arange(value.numel()))
    expected = state_formats.round_bf16(value, bits_).view(params[0].shape)
    assert torch.equal(bf16.state[copies[0]]["accumulator"], expected)


@pytest.mark.parametrize("source, target", [("8bit", "8bit"), ("bf16", "bf16"),
                                            ("bf16", "8bit"), ("8bit", "bf16")])
def test_compressed_state_loads_into_each_format(tmp_path, source, target):
    """Into its own format as it is (codes, scales, bits); into the other through fp32."""
    params, optimizer = _trained(source)
    path = tmp_path / "run.pt"
    save_checkpoint(optimizer.state_dict(), path)
    copies, other = _fresh(params, target)
    other.load_state_dict(load_checkpoint(path))
    for p, q in zip(params, copies):
        saved, loaded = optimizer.state[p], other.state[q]
        if source == target:
            assert loaded.keys() == saved.keys()
            assert all(torch.equal(loaded[key], saved[key]) for key in saved)
            assert loaded["accumulator"] is not saved["accumulator"]
            continue
        dtype = state_formats.compressed_dtype(q, target)
        assert loaded["accumulator"].dtype == (dtype or saved["accumulator"].dtype)
        assert ("accumulator_scales" in loaded) == (dtype == torch.uint8)
        torch.testing.assert_close(_decoded(loaded), _decoded(saved), rtol=2 ** -3, atol=1e-5)
    train = _grads(copies, 1, torch.Generator().manual_seed(8))
    _train(other, copies, train)  # the loaded state steps


def _state_edit(index, **entries):
    def edit(state_dict):
        state_dict["state"][index].update(entries)
        for key, value in list(state_dict["state"][index].items()):
            if value is None:
                del state_dict["state"][index][key]
    return edit


def _scale_edit(index, value):
    def edit(state_dict):
        state_dict["state"][index]["accumulator_scales"][1] = value
    return edit


def _exponent_edit(index, value=None, dtype=torch.int8, keep_scales=False):
    """Give entry ``index`` its codes' per-element exponents (in place of its block scales
    unless ``keep_scales``), ``value`` at element 5, as ``dtype``."""
    def edit(state_dict):
        entry = state_dict["state"][index]
        scales = entry["accumulator_scales"] if keep_scales else entry.pop("accumulator_scales")
        exponents = state_formats.element_exponents(scales, entry["accumulator"].numel())
        if value is not None:
            exponents[5] = value
        entry["accumulator_exponents"] = exponents.view(entry["accumulator"].shape).to(dtype)
    return edit


BAD_LOADS = {
    "scale 3": (_scale_edit(0, 3.0), r"\['accumulator_scales'\] has 1 of its 293 scales "
                                     r"neither 0 nor a power of two"),
    "scale 2**-116": (_scale_edit(0, 2.0 ** -116), r"neither 0 nor a power of two"),
    "scale inf": (_scale_edit(0, float("inf")), r"neither 0 nor a power of two"),
    "scale NaN": (_scale_edit(0, float("nan")), r"neither 0 nor a power of two"),
    "scale -1": (_scale_edit(0, -1.0), r"neither 0 nor a power of two"),
    "scales missing": (_state_edit(0, accumulator_scales=None),
                       r"\['accumulator_scales'\] are missing: 8-bit"),
    "scales float64": (lambda sd: sd["state"][0].update(
        accumulator_scales=sd["state"][0]["accumulator_scales"].double()),
        r"\['accumulator_scales'\] must be a float32 tensor of shape \(293,\)"),
    "scales short": (lambda sd: sd["state"][0].update(
        accumulator_scales=sd["state"][0]["accumulator_scales"][1:]),
        r"must be a float32 tensor of shape \(293,\)"),
    "scales beside fp32": (_state_edit(3, accumulator_scales=torch.ones(1)),
                           r"only 8-bit \(uint8\) accumulator codes have block scales"),
    "codes of another shape": (lambda sd: sd["state"][0].update(
        accumulator=sd["state"][0]["accumulator"].reshape(250, 300)),
        r"\['accumulator'\] has shape \(250, 300\), expected the param's \(300, 250\)"),
    "bf16 negative": (_state_edit(2, accumulator=-torch.ones(80, 64, dtype=torch.bfloat16),
                                  accumulator_scales=None),
                      r"has 5120 of its 5120 elements negative or NaN"),
    "bf16 NaN": (_state_edit(2, accumulator=torch.full((80, 64), float("nan"),
                                                       dtype=torch.bfloat16),
                             accumulator_scales=None),
                 r"negative or NaN"),
    "codes int8": (_state_edit(0, accumulator=torch.zeros(300, 250, dtype=torch.int8)),
                   r"must be a floating-point tensor \(or uint8 8-bit codes\)"),
    "exponent -116": (_exponent_edit(0, -116),
                      r"\['accumulator_exponents'\] has 1 of its 75000 elements outside "
                      r"\[-115, 127\] and not -128"),
    "exponents int16": (_exponent_edit(0, dtype=torch.int16),
                        r"\['accumulator_exponents'\] must be a dense int8 tensor of the codes' "
                        r"shape \(300, 250\)"),
    "exponents beside scales": (_exponent_edit(0, keep_scales=True),
                                r"or 'accumulator_exponents' in place of 'accumulator_scales'"),
    "exponents beside fp32": (_state_edit(3, accumulator_exponents=torch.zeros(
        100, dtype=torch.int8)), r"\['accumulator_exponents'\]: only 8-bit \(uint8\) "
                                 r"accumulator codes have block scales"),
}


@pytest.mark.parametrize("case", BAD_LOADS)
@pytest.mark.parametrize("target", ("fp32", "8bit"))
def test_bad_compressed_state_is_refused_and_changes_nothing(case, target):
    edit, message = BAD_LOADS[case]
    params, saved = _trained("8bit")
    state_dict = copy.deepcopy(saved.state_dict())
    edit(state_dict)
    copies, optimizer = _trained(target)
    before = snapshot(optimizer)
    with pytest.raises((TypeError, ValueError), match=message):
        optimizer.load_state_dict(state_dict)
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("target", ("fp32", "bf16", "8bit"))
def test_per_element_exponents_load_as_the_block_scales_do(target):
    """The form a DTensor param's 8-bit codes take in a state dict loads into a plain param
    (a sharded checkpoint gathered into one process) as its block scales do."""
    params, saved = _trained("8bit")
    state_dict = saved.state_dict()
    edited = copy.deepcopy(state_dict)
    _exponent_edit(0)(edited)
    _exponent_edit(1)(edited)
    runs = [_trained(target)[1] for _ in range(2)]
    runs[0].load_state_dict(state_dict)
    runs[1].load_state_dict(edited)
    for p, q in zip(*(run.param_groups[0]["params"] for run in runs)):
        mine, theirs = runs[1].state[q], runs[0].state[p]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[key], theirs[key]) for key in mine)


def test_a_stepped_state_entry_edited_to_another_format_fails_the_step():
    params, optimizer = _trained("8bit")
    grads = _grads(params, 1, torch.Generator().manual_seed(9))[0]
    for p, grad in zip(params, grads):
        p.grad = grad
    edits = [
        (lambda s: s.update(accumulator=torch.zeros(300, 250)), TypeError,
         r"the accumulator of param group 0, param 0 must be a torch.uint8 tensor under "
         r"state_dtype='8bit'"),
        (lambda s: s.update(accumulator_scales=torch.zeros(3)), TypeError,
         r"the accumulator_scales of param group 0, param 0 must be a float32 tensor of shape "
         r"\(293,\)"),
        (lambda s: s.pop("accumulator_scales"), ValueError,
         r"the accumulator_scales of param group 0, param 0 are missing"),
        (lambda s: setattr(s["accumulator"], "data", torch.zeros(300, 250)), TypeError,
         r"must be a torch.uint8 tensor"),
        (lambda s: setattr(s["accumulator_scales"], "data", torch.zeros(292)), TypeError,
         r"must be a float32 tensor of shape \(293,\)"),
    ]
    for edit, error, message in edits:
        state = optimizer.state[params[0]]
        kept = dict(state)
        data = {key: kept[key].data for key in ("accumulator", "accumulator_scales")}
        edit(state)
        before = snapshot(optimizer)
        with pytest.raises(error, match=message):
            optimizer.step()
        assert_unchanged(optimizer, before)
        state.clear()
        state.update(kept)
        for key, t in data.items():
            kept[key].data = t
        optimizer.step()  # as it was, it steps


@pytest.mark.parametrize("state_dtype", COMPRESSED)
def test_pickle_and_deepcopy_keep_the_format_and_continue_identically(state_dtype):
    params, optimizer = _trained(state_dtype, seed=5)
    grads = _grads(params, 2, torch.Generator().manual_seed(10))
    copies = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    for other in copies:
        assert (other.state_dtype, other.state_seed) == (state_dtype, 5)
    results = []
    for other in copies + [optimizer]:
        mine = [p for group in other.param_groups for p in group["params"]]
        _train(other, mine, grads)
        results.append([(bits(p), *other.state[p].values()) for p in mine])
    for a, b in zip(results, results[1:]):
        for x, y in zip(a, b):
            assert all(torch.equal(s, t) for s, t in zip(x, y))


def test_bad_options_are_refused_naming_them():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"state_dtype must be one of \('fp32', 'bf16', "
                                         r"'8bit'\), got 'int8'"):
        CLASSP(p, lr=0.1, state_dtype="int8")
    for seed in (-1, 2 ** 32, 1.5, True, "0"):
        with pytest.raises(ValueError, match=r"state_seed must be an int in \[0, 2\*\*32\)"):
            CLASSP(p, lr=0.1, state_dtype="8bit", state_seed=seed)
    with pytest.raises(ValueError, match=r"state_dtype='bf16' needs mode='paper'"):
        CLASSP(p, lr=0.1, mode="legacy", backend="torch", state_dtype="bf16")
    for name in CPU_BACKENDS:
        if not steps_compressed_state(name):
            with pytest.raises(ValueError, match=rf"state_dtype='8bit' needs a backend that "
                                                 rf"steps compressed accumulators \(.*\), got "
                                                 rf"backend='{name}'"):
                CLASSP(p, lr=0.1, backend=name, state_dtype="8bit")


def test_auto_picks_a_backend_that_steps_compressed_state():
    p = nn.Parameter(torch.zeros(64, 64))
    optimizer = CLASSP([p], lr=0.1, state_dtype="8bit")
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert steps_compressed_state(optimizer.backend)
    assert optimizer.state[p]["accumulator"].dtype == torch.uint8


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_the_op_refuses_compressed_state_where_the_backend_does_not_step_it(name):
    """A backend's module says whether it steps compressed accumulators (``COMPRESSED_STATE``;
    those that do are held to the reference above); the op entry point refuses them for the
    others, before their kernel could read codes as floats."""
    if steps_compressed_state(name):
        pytest.skip(f"backend {name!r} steps compressed accumulators")
    n = state_formats.MIN_COMPRESSED_NUMEL
    acc = torch.zeros(n, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=rf"backend '{name}' does not step compressed "
                                        rf"accumulators \(bfloat16, uint8 codes\); these do: "):
        classp_step_([torch.zeros(n)], [torch.ones(n)], [acc], lr=0.1, backend=name,
                     compressed=CompressedState([None], torch.zeros(1, dtype=torch.int64), [0]))
    assert not acc.any()


# Per element the stochastic rounding error is a random walk, unbiased: after T roundings its
# relative spread is about sqrt(T/3) / (2.4 * 2**mantissa bits), 4% for bf16 and 80% for 8-bit
# codes (3 mantissa bits) after 2000 (seen: 0.83 to 1.21 and 0.44 to 3.0 of the exact value on
# 20k elements); a stall (rounding to nearest) leaves elements at a fraction of theirs.
STALL_FACTOR = {"bf16": 1.5, "8bit": 4.0}


def test_compressed_accumulators_track_the_exact_one():
    """2000 steps on 20k elements whose gradients span two decades, a tenth of them starting
    halfway: the compressed accumulators' means, over all elements, the late ones and the
    smallest and largest gradients, are within 2% of the exact ones, and no element stalls
    (each within ``STALL_FACTOR`` of its exact value)."""
    n, steps = 20_000, 2000
    g = torch.Generator().manual_seed(12)
    magnitude = 10 ** (-2 * torch.rand(n, generator=g))
    late = torch.rand(n, generator=g) < 0.1
    params = {name: nn.Parameter(torch.zeros(n)) for name in COMPRESSED}
    optimizers = {name: CLASSP([p], lr=0.0, backend="foreach", state_dtype=name)
                  for name, p in params.items()}
    exact = torch.zeros(n)  # the fp32 accumulator: the sum of |g|
    for step in range(steps):
        grad = magnitude * torch.rand(n, generator=g)
        if step < steps // 2:
            grad = torch.where(late, 0.0, grad)
        exact += grad
        for name, p in params.items():
            p.grad = grad
            optimizers[name].step()
    for name in COMPRESSED:
        rounded = _decoded(optimizers[name].state[params[name]])
        for part in (slice(None), late, magnitude < 0.03, magnitude > 0.3):
            assert abs(rounded[part].mean() / exact[part].mean() - 1) < 0.02, name
        ratio = rounded / exact
        assert 1 / STALL_FACTOR[name] < ratio.min() and ratio.max() < STALL_FACTOR[name], name


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", COMPRESSED)
def test_compiled_training_with_compressed_state_matches_eager(backend, state_dtype):
    import torch._dynamo

    def train_step(model, optimizer, x):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    inputs = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(0))
    runs = []
    for step_fn in (train_step, torch.compile(train_step)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 2))
        optimizer = CLASSP(model.parameters(), lr=torch.tensor(0.05), threshold=1e-8,
                           backend=backend, state_dtype=state_dtype)
        for x in inputs:
            step_fn(model, optimizer, x)
        runs.append((model, optimizer))
    torch._dynamo.reset()
    (eager, eager_opt), (compiled, compiled_opt) = runs
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        mine, theirs = compiled_opt.state[q], eager_opt.state[p]
        assert mine.keys() == theirs.keys() and mine["step"].item() == 3
        assert mine["accumulator"].dtype == theirs["accumulator"].dtype
        # compiled gradients differ in rounding: a rounding may take the next code
        torch.testing.assert_close(_decoded(mine), _decoded(theirs), rtol=2 ** -3, atol=1e-9)


# ---------------------------------------------------------------- DTensors (2 gloo ranks)
def dtensor_ranks(rank, backends):
    """bf16 state of a DTensor param sharded by rows (FSDP2's layout; the second rank's shard
    starts at element 3300) steps, saves and loads as the whole param does in one process;
    shards that are not runs of the whole are refused where compressed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (distributed_helpers.WORLD_SIZE,))
    g = torch.Generator().manual_seed(0)
    full = torch.randn(65, 100, generator=g)
    grads = [torch.randn(65, 100, generator=g) for _ in range(3)]
    for backend in backends:
        sharded = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        whole = nn.Parameter(full.clone())
        runs = [CLASSP([p], **HYPER, backend=backend, state_dtype="bf16")
                for p in (sharded, whole)]
        for grad in grads:
            sharded.grad = distribute_tensor(grad, mesh, [Shard(0)])
            whole.grad = grad.clone()
            for optimizer in runs:
                optimizer.step()
        acc = runs[0].state[sharded]["accumulator"]
        assert acc.dtype == torch.bfloat16 and acc.to_local().shape[0] == (33 if rank == 0 else 32)
        assert torch.equal(acc.full_tensor(), runs[1].state[whole]["accumulator"])
        assert torch.equal(sharded.full_tensor(), whole)

        fp32 = [CLASSP([p], **HYPER, backend=backend) for p in (sharded, whole)]
        for optimizer, run in zip(fp32, runs):  # bf16 -> fp32 -> bf16
            optimizer.load_state_dict(run.state_dict())
            run.load_state_dict(optimizer.state_dict())
        assert torch.equal(runs[0].state[sharded]["accumulator"].full_tensor(),
                           runs[1].state[whole]["accumulator"])
        fp32[1].state[whole]["accumulator"].add_(1 / 3)  # values to round
        fp32[0].state[sharded]["accumulator"].add_(1 / 3)
        for optimizer, run in zip(fp32, runs):
            run.load_state_dict(optimizer.state_dict())
        assert torch.equal(runs[0].state[sharded]["accumulator"].full_tensor(),
                           runs[1].state[whole]["accumulator"])

        small = nn.Parameter(distribute_tensor(full[:10, :10], mesh, [Shard(1)]))
        small.grad = distribute_tensor(grads[0][:10, :10], mesh, [Shard(1)])
        optimizer = CLASSP([small], **HYPER, backend=backend, state_dtype="bf16")
        optimizer.step()  # small: an exact accumulator, whatever its placement
        assert optimizer.state[small]["accumulator"].dtype == torch.float32

        for state_dtype in COMPRESSED:
            p = nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))
            p.grad = distribute_tensor(grads[0], mesh, p.placements)
            optimizer = CLASSP([p], **HYPER, backend=backend, state_dtype=state_dtype)
            with pytest.raises(ValueError, match=r"local shards that are runs of consecutive"):
                optimizer.step()
            assert not optimizer.state


@requires_gloo
def test_dtensor_bf16_state_draws_the_bits_of_the_whole_param():
    backends = [name for name in CPU_BACKENDS if steps_compressed_state(name)]
    distributed_helpers.run_ranks(dtensor_ranks, backends, timeout_s=300,
                                  collective_timeout_s=60)


# ---------------------------------------------------------------- 8-bit DTensors (2 gloo ranks)
class Shards(nn.Module):
    """Params whose 2-rank FSDP2 shards are runs of whole 8-bit blocks (``aligned``, 4096
    elements a rank), whose second shard starts inside a block (``unaligned``: at element
    2500, in the block from 2304), and one the first rank holds alone (``single``: the second
    rank's shard is empty)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.aligned = nn.Parameter(torch.randn(16, 512, generator=g))
        self.unaligned = nn.Parameter(torch.randn(10, 500, generator=g))
        self.single = nn.Parameter(torch.randn(1, 4096, generator=g))


def _shard_grads(steps, seed=1):
    """Per step a gradient per param of ``Shards``, its rows of scales 2**0, 2**3, ..., 2**27
    (so that a block spanning two rows mixes scales) and a few zeros."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 512), (10, 500), (1, 4096)]
    return [[random_with_zeros(shape, torch.float32, g)
             * 2.0 ** (3 * (torch.arange(shape[0]) % 10)).reshape(-1, 1) for shape in shapes]
            for _ in range(steps)]


def _fully_sharded(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Shards(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (distributed_helpers.WORLD_SIZE,)))
    return model


def _step_with(optimizer, params, grads):
    """Set ``grads`` (whole tensors; a DTensor param gets its shard) and step."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, grad in zip(params, grads):
        p.grad = (distribute_tensor(grad, p.device_mesh, p.placements)
                  if isinstance(p, DTensor) else grad.clone())
    optimizer.step()


def _whole_values(state):
    """The whole accumulator of a (DTensor) param's 8-bit state, decoded: codes and values."""
    from torch.distributed.tensor import DTensor

    acc = state["accumulator"]
    local = acc.to_local() if isinstance(acc, DTensor) else acc
    values = state_formats.decode(local.reshape(-1), state["accumulator_scales"]).view(local.shape)
    if isinstance(acc, DTensor):
        values = DTensor.from_local(values, acc.device_mesh, acc.placements, shape=acc.shape,
                                    stride=acc.stride()).full_tensor()
        acc = acc.full_tensor()
    return acc, values


def _whole_run(params, optimizer):
    """Per param (plain or DTensor): its whole value, whole accumulator codes and their
    decoded values, and its step count."""
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p.detach(),
             *_whole_values(optimizer.state[p]), optimizer.state[p]["step"]) for p in params]


def _assert_same_runs(run, ref_run, exact):
    """Two ``_whole_run`` results are equal: bit for bit where ``exact[i]``, else within the
    8-bit format's rounding (one code step)."""
    for (value, codes, acc, step), (ref_value, ref_codes, ref_acc, ref_step), same in zip(
            run, ref_run, exact):
        if same:
            assert torch.equal(value, ref_value) and torch.equal(codes, ref_codes)
            assert torch.equal(acc, ref_acc)
        else:
            torch.testing.assert_close(acc, ref_acc, rtol=2 ** -3, atol=0)
            torch.testing.assert_close(value, ref_value, rtol=0, atol=0.2 * HYPER["lr"])
        assert torch.equal(step, ref_step)


def _local_state(optimizer, params):
    """Copies of the local tensors of each param's state."""
    return [{key: (t.to_local() if hasattr(t, "to_local") else t).clone()
             for key, t in optimizer.state[p].items()} for p in params]


def dtensor_8bit_ranks(rank, backends):
    """8-bit state of FSDP2 shards steps as the whole params do in one process: bit for bit
    where the shards' blocks are the whole's, within a rounding where a shard starts inside a
    block, also after both load the whole's state (8-bit, then exact); its state dict carries
    per-element exponents and loads back bit for bit; bad exponents, on one rank only, are
    refused by every rank, changing nothing."""
    from torch.distributed.tensor import DTensor

    grads = _shard_grads(5)
    for backend in backends:
        model = _fully_sharded()
        params = list(model.parameters())
        ref_params = list(Shards().parameters())
        runs = [CLASSP(ps, **HYPER, backend=backend, state_dtype="8bit", state_seed=7)
                for ps in (params, ref_params)]
        for step_grads in grads[:3]:
            for optimizer, ps in zip(runs, (params, ref_params)):
                _step_with(optimizer, ps, step_grads)
        _assert_same_runs(_whole_run(params, runs[0]), _whole_run(ref_params, runs[1]),
                          exact=[True, False, True])
        # the whole state of one process, 8-bit and exact, loads into the shards
        exact = CLASSP(ref_params, **HYPER, backend=backend, state_seed=7)
        exact.load_state_dict(runs[1].state_dict())
        for source, step_grads in zip((runs[1], exact), grads[3:]):
            whole_state = copy.deepcopy(source.state_dict())
            for optimizer, ps in zip(runs, (params, ref_params)):
                optimizer.load_state_dict(whole_state)
                _step_with(optimizer, ps, step_grads)
            _assert_same_runs(_whole_run(params, runs[0]), _whole_run(ref_params, runs[1]),
                              exact=[True, False, True])
        scales = runs[0].state[params[0]]["accumulator_scales"]
        assert type(scales) is torch.Tensor and scales.shape == (16,)
        assert torch.equal(scales, runs[1].state[ref_params[0]]["accumulator_scales"]
                           [16 * rank:16 * rank + 16])

        state_dict = runs[0].state_dict()
        for index, p in enumerate(params):
            entry = state_dict["state"][index]
            assert sorted(entry) == ["accumulator", "accumulator_exponents", "step"]
            exponents = entry["accumulator_exponents"]
            assert isinstance(exponents, DTensor) and exponents.dtype == torch.int8
            assert exponents.placements == p.placements and exponents.shape == p.shape
            assert "accumulator_scales" in runs[0].state[p]  # the live state keeps its scales
        before = _local_state(runs[0], params)
        restored = CLASSP(params, **HYPER, backend=backend, state_dtype="8bit", state_seed=7)
        restored.load_state_dict(state_dict)
        for saved, loaded in zip(before, _local_state(restored, params)):
            assert saved.keys() == loaded.keys()
            assert all(torch.equal(saved[key], loaded[key]) for key in saved)

        exponents = state_dict["state"][0]["accumulator_exponents"]
        if rank == 1:
            exponents.to_local()[3, 7] = -120
        with pytest.raises(ValueError, match=r"param group 0, param 0: state_dict\['state'\]\[0\]"
                                             r"\['accumulator_exponents'\] has 1 of its 8192 "
                                             r"elements outside \[-115, 127\] and not -128"):
            restored.load_state_dict(state_dict)
        state_dict["state"][0]["accumulator_exponents"] = exponents.to(torch.int32)
        with pytest.raises(TypeError, match=r"\['accumulator_exponents'\] must be a dense int8 "
                                            r"DTensor of the codes' shape \(16, 512\)"):
            restored.load_state_dict(state_dict)
        for saved, kept in zip(before, _local_state(restored, params)):
            assert all(torch.equal(saved[key], kept[key]) for key in saved)


@requires_gloo
def test_dtensor_8bit_state_steps_as_the_whole_param_and_refuses_bad_exponents():
    backends = [name for name in CPU_BACKENDS if steps_compressed_state(name)]
    distributed_helpers.run_ranks(dtensor_8bit_ranks, backends, timeout_s=300,
                                  collective_timeout_s=60)


def _dcp_load(model, optimizer, checkpoint_id):
    """Load a DCP checkpoint into ``model`` and ``optimizer`` through their state dicts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def dtensor_8bit_checkpoint_ranks(rank, backend, checkpoint_dir):
    """A DCP checkpoint of 8-bit state on FSDP2 shards: loaded on the same shards, the run
    continues bit for bit; loaded into one process (``dcp_to_torch_save``), every value comes
    back exactly (the whole's block that the second shard starts inside mixes two scales and
    is encoded again; they are one binade apart, so no value is rounded), and the run
    continues as the sharded one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    grads = _shard_grads(4, seed=2)
    model = _fully_sharded()
    params = list(model.parameters())
    optimizer = CLASSP(params, **HYPER, backend=backend, state_dtype="8bit", state_seed=3)
    for step_grads in grads[:2]:
        _step_with(optimizer, params, step_grads)
    model_state, optim_state = get_state_dict(model, optimizer)
    path = f"{checkpoint_dir}/sharded"
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    saved = [_whole_values(optimizer.state[p])[1] for p in params]
    for step_grads in grads[2:]:
        _step_with(optimizer, params, step_grads)

    restored = _fully_sharded(seed=5)
    restored_params = list(restored.parameters())
    restored_optimizer = CLASSP(restored_params, **HYPER, backend=backend, state_dtype="8bit",
                                state_seed=3)
    _dcp_load(restored, restored_optimizer, path)
    for step_grads in grads[2:]:
        _step_with(restored_optimizer, restored_params, step_grads)
    sharded_run = _whole_run(params, optimizer)
    _assert_same_runs(_whole_run(restored_params, restored_optimizer), sharded_run, [True] * 3)

    dist.barrier()
    if rank == 0:
        dcp_to_torch_save(path, f"{checkpoint_dir}/whole.pt")
        whole = torch.load(f"{checkpoint_dir}/whole.pt", weights_only=False)
        plain = Shards(seed=5)
        plain_params = list(plain.parameters())
        plain_optimizer = CLASSP(plain_params, **HYPER, backend=backend, state_dtype="8bit",
                                 state_seed=3)
        set_state_dict(plain, plain_optimizer, model_state_dict=whole["model"],
                       optim_state_dict=whole["optim"])
        for (name, p), values in zip(plain.named_parameters(), saved):
            codes, loaded = _whole_values(plain_optimizer.state[p])
            assert torch.equal(loaded, values)
            changed = codes != whole["optim"]["state"][name]["accumulator"]
            if name == "unaligned":  # elements 2304..2499 of the block from 2304 were encoded
                # with rank 0's scale, 2500..2559 with rank 1's: the block is encoded again
                mixed = changed.view(-1)[2304:2560]
                assert torch.equal(mixed[:196], codes.view(-1)[2304:2500] != 0)
                assert not mixed[196:].any() and not changed.view(-1)[:2304].any()
            else:
                assert not changed.any()
        for step_grads in grads[2:]:
            _step_with(plain_optimizer, plain_params, step_grads)
        _assert_same_runs(_whole_run(plain_params, plain_optimizer), sharded_run,
                          [True, False, True])
    dist.barrier()


@requires_gloo
def test_dtensor_8bit_checkpoint_resumes_bit_for_bit_and_loads_into_one_process(tmp_path):
    backend = next(name for name in ("cpp", "foreach") if name in CPU_BACKENDS)
    distributed_helpers.run_ranks(dtensor_8bit_checkpoint_ranks, backend, str(tmp_path),
                                  timeout_s=300, collective_timeout_s=60)
