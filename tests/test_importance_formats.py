"""MAS and EWC with their importance stored compressed (``state_dtype="bf16"|"8bit"``).

A compressed state must behave exactly as a ``"param"`` regularizer holding its decoded values:
penalty, gradient, proximal step, stability bounds and an attached CLASSP step give the same
bits, on the C++-op path and on the chunked path. Task boundaries round the float32 merge of
the decoded old importance and the new one to nearest; loads convert across formats, check
everything first and change nothing when they refuse; state_bytes counts what is stored.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

from classp_fused import CLASSP, chunks
from classp_fused.cl.methods import build_method, resolve_hparams
from classp_fused.regularizers import EWC, MAS
from classp_fused.regularizers import penalty as penalty_ops
from classp_fused.state_formats import (BLOCK, element_exponents, encode_importance,
                                        importance_dtype, importance_values, num_blocks)
from distributed_helpers import WORLD_SIZE, requires_gloo, run_ranks
from helpers import CPU_BACKENDS, bits, peak_extra_bytes
from test_regularizer_state import edited, refused

METHODS = {
    "mas-sum": (MAS, {"lam": 1.5}),
    "mas-ema": (MAS, {"lam": 1.5, "accumulate": "ema", "alpha": 0.3}),
    "ewc-separate": (EWC, {"lam": 2.0}),
    "ewc-online": (EWC, {"lam": 2.0, "mode": "online", "gamma": 0.6}),
}
COMPRESSED = ("bf16", "8bit")
# The backends of an attached CLASSP step, each against the reference's step.
STEP_BACKENDS = ["torch", "foreach"] + [b for b in ("cpp", "triton") if b in CPU_BACKENDS]
# The penalty passes' C++ ops where the extension is built, and the chunked multi-tensor ops.
PATHS = [pytest.param(True, id="cpu-op", marks=pytest.mark.skipif(
             not penalty_ops.CPU_KERNELS, reason="C++ extension not built")),
         pytest.param(False, id="chunked")]


def use_path(monkeypatch, cpu_op):
    """Send the compressed state and its decoded twin through one path: the C++ ops when
    ``cpu_op``, else the chunked ops."""
    monkeypatch.setattr(penalty_ops, "CPU_KERNELS", cpu_op)


class Net(nn.Module):
    """A 61x70 weight (4270 elements: compressed, its last 8-bit block partial), stored
    transposed (not contiguous) unless ``contiguous``, a 5x61 head and biases (small: kept in
    the param's dtype)."""

    def __init__(self, dtype=torch.float32, seed=0, contiguous=False):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Linear(70, 61), nn.Linear(61, 5)
        if not contiguous:
            self.body.weight = nn.Parameter(self.body.weight.detach().t().contiguous().t())
        self.to(dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def task_data(task, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + task)
    return [(torch.randn(n, 70, generator=gen).to(dtype), torch.randint(0, 5, (n,), generator=gen))
            for n in (6, 4)]


def perturb_(model, seed, scale=0.2):
    """Move every param by a seeded random step (the same one on FSDP2 shards)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            delta = scale * torch.randn(p.shape, generator=gen).to(p.dtype)
            if hasattr(p, "device_mesh"):  # a DTensor: this rank's part of the step
                from torch.distributed.tensor import distribute_tensor
                delta = distribute_tensor(delta, p.device_mesh, p.placements)
            p.add_(delta)


def consolidated(name, state_dtype, tasks=2, dtype=torch.float32):
    """A model and its regularizer in ``state_dtype`` after ``tasks`` boundaries, the model
    moved away from the anchors after each."""
    method, kwargs = METHODS[name]
    model = Net(dtype)
    reg = method(model, **kwargs, state_dtype=state_dtype)
    for task in range(tasks):
        reg.consolidate(task_data(task, dtype))
        perturb_(model, seed=10 + task)
    return model, reg


def twin_of(name, model, reg):
    """A ``"param"`` regularizer of ``METHODS[name]`` on a copy of ``model``, holding ``reg``'s
    state decoded."""
    method, kwargs = METHODS[name]
    copied = copy.deepcopy(model)
    twin = method(copied, **kwargs)
    twin.load_state_dict(reg.state_dict())
    return copied, twin


def decoded(reg):
    """``reg``'s importances decoded to float32."""
    return {n: importance_values(t, reg._importance_scales.get(n), torch.float32)
            for n, t in reg._importance.items()}


def saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("method", [MAS, EWC])
@pytest.mark.parametrize("value", ["fp32", "BF16", None, 8, ("8bit",)])
def test_a_bad_state_dtype_is_refused(method, value):
    with pytest.raises(ValueError, match=r"state_dtype must be one of \('param', 'bf16', '8bit'\)"):
        method(Net(), lam=1.0, state_dtype=value)


@pytest.mark.parametrize("state_dtype", ["param", *COMPRESSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_importance_is_stored_in_its_format(state_dtype, dtype):
    model, reg = consolidated("ewc-separate", state_dtype, tasks=1, dtype=dtype)
    params = dict(model.named_parameters())
    for name, stored in reg._importance.items():
        p = params[name]
        assert stored.dtype == importance_dtype(p, state_dtype)
        assert reg.anchor[name].dtype == p.dtype
        assert reg.importance[name].dtype == p.dtype
        assert torch.equal(reg.importance[name],
                           importance_values(stored, reg._importance_scales.get(name), p.dtype))
        if stored.dtype == torch.uint8:
            assert stored.is_contiguous()
            scales = reg._importance_scales[name]
            assert scales.dtype == torch.float32 and scales.shape == (num_blocks(p.numel()),)
    compressed = {n for n, t in reg._importance.items() if t.dtype != params[n].dtype}
    expect = {"param": set(), "bf16": {"body.weight"} if dtype == torch.float32 else set(),
              "8bit": {"body.weight"} if dtype != torch.float64 else set()}[state_dtype]
    assert compressed == expect
    assert reg._importance_scales.keys() == (expect if state_dtype == "8bit" else set())


@pytest.mark.parametrize("name", METHODS)
def test_each_boundary_rounds_the_float32_merge_of_the_decoded_state(name):
    """Over three tasks (a frozen weight in the second), the 8-bit state after each boundary is
    the float32 merge of its decoded old state with the new task, rounded to nearest: the
    state a "param" regularizer holding the decoded values reaches, encoded; within half a
    step (1/16 relative) of it above 2**-31 of each block's scale, and within three such
    roundings of a "param" regularizer's whole run."""
    method, kwargs = METHODS[name]
    model = Net()
    reg, exact = method(model, **kwargs, state_dtype="8bit"), method(model, **kwargs)
    top = torch.zeros(num_blocks(model.body.weight.numel()))  # the largest scale of each block
    for task in range(3):
        copied, twin = twin_of(name, model, reg) if task else (model, method(model, **kwargs))
        model.body.weight.requires_grad_(task != 1)
        copied.body.weight.requires_grad_(task != 1)
        for r in (reg, twin, exact):
            r.consolidate(task_data(task))
        for key in ("anchor", "importance"):
            for n in getattr(twin, key):
                if key == "anchor" or reg._importance[n].dtype != torch.uint8:
                    assert torch.equal(getattr(reg, key)[n], getattr(twin, key)[n]), (task, n)
        assert reg._residual.keys() == twin._residual.keys()
        for n, r in twin._residual.items():
            assert torch.equal(reg._residual[n], r)
        merged = twin.importance["body.weight"]
        codes, scales = encode_importance(merged, torch.uint8)
        assert torch.equal(reg._importance["body.weight"], codes)
        assert torch.equal(reg._importance_scales["body.weight"], scales)
        assert_within_roundings(decoded(reg)["body.weight"], merged, scales, 1)
        top = torch.maximum(top, scales)
        perturb_(model, seed=20 + task)
    assert_within_roundings(decoded(reg)["body.weight"], exact.importance["body.weight"], top, 3)


def assert_within_roundings(values, exact, scales, roundings):
    """|values - exact| <= ((17/16)**roundings - 1) * exact where exact >= 2**-31 of its
    block's scale in ``scales``, at most ``roundings`` half-steps of 2**-34 of it below."""
    s = scales.repeat_interleave(BLOCK)[:exact.numel()].view(exact.shape)
    error = (values.double() - exact.double()).abs()
    large = exact >= 2.0 ** -31 * s
    assert large.any()
    assert bool((error[large] <= ((17 / 16) ** roundings - 1) * exact[large]).all())
    assert bool((error[~large] <= roundings * 2.0 ** -35 * s[~large]).all())


@pytest.mark.parametrize("name", ["mas-sum", "ewc-separate"])
@pytest.mark.parametrize("state_dtype", COMPRESSED)
@pytest.mark.parametrize("cpu_op", PATHS)
def test_penalty_gradient_and_proximal_step_equal_the_decoded_state_bit_for_bit(
        monkeypatch, name, state_dtype, cpu_op):
    use_path(monkeypatch, cpu_op)
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 700)  # pieces across partial blocks
    model, reg = consolidated(name, state_dtype)
    copied, twin = twin_of(name, model, reg)
    assert any(t.dtype != torch.float32 for t in reg._importance.values())
    for m in (model, copied):
        m(task_data(5)[0][0]).pow(2).sum().backward()
    penalties = [r.penalty() for r in (reg, twin)]
    assert torch.equal(*penalties)
    grads = [torch.autograd.grad(pen, list(m.parameters()))
             for pen, m in zip(penalties, (model, copied))]
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(*grads))
    reg.add_penalty_grad_()
    twin.add_penalty_grad_()
    assert_same_params_and_grads(model, copied)
    assert reg.stability_bounds(lr=0.1) == twin.stability_bounds(lr=0.1)
    for r in (reg, twin):
        r.proximal_step_(lr=0.3)
    assert_same_params_and_grads(model, copied)
    optimizers = [CLASSP(m.parameters(), lr=0.1, threshold=1e-4, backend="torch")
                  for m in (model, copied)]
    for r, optimizer in zip((reg, twin), optimizers):
        optimizer.step()  # CLASSP's step sizes: a tensor per param
        r.proximal_step_(optimizer)
    assert_same_params_and_grads(model, copied)
    assert reg.stability_bounds(optimizers[0]) == twin.stability_bounds(optimizers[1])


def assert_same_params_and_grads(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(bits(p), bits(q))
        assert torch.equal(bits(p.grad), bits(q.grad))


@pytest.mark.parametrize("cpu_op", PATHS)
def test_bf16_params_take_the_8bit_penalty_gradient_of_the_decoded_state(monkeypatch, cpu_op):
    use_path(monkeypatch, cpu_op)
    model, reg = consolidated("mas-sum", "8bit", dtype=torch.bfloat16)
    copied, twin = twin_of("mas-sum", model, reg)
    assert reg._importance["body.weight"].dtype == torch.uint8
    for m in (model, copied):
        m(task_data(5, torch.bfloat16)[0][0]).float().pow(2).sum().backward()
    reg.add_penalty_grad_()
    twin.add_penalty_grad_()
    assert_same_params_and_grads(model, copied)


def test_the_chunked_passes_decode_in_chunk_sized_pieces(monkeypatch):
    """Peak extra memory of the chunked passes with 8-bit importances: the same for a tensor
    of 16 or 64 chunks (no temporary the tensor's size), a few chunks' float32 temporaries;
    a chunk size that is not a multiple of 256 is cut to whole blocks (1000 to 768), so a
    chunk decodes no more than its own."""
    monkeypatch.setattr(penalty_ops, "CPU_KERNELS", False)
    peaks = {}
    for chunk, n in ((1024, 16 * 1024), (1024, 64 * 1024), (1000, 16 * 1024), (768, 16 * 1024)):
        monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", chunk)
        g = torch.Generator().manual_seed(4)
        params = [nn.Parameter(torch.randn(n, generator=g))]
        params[0].grad = torch.randn(n, generator=g)
        codes, scales = encode_importance(torch.rand(n, generator=g), torch.uint8)
        anchors = [torch.randn(n, generator=g)]
        peaks[chunk, n] = max(peak_extra_bytes(lambda: penalty_ops.add_penalty_grad_(
                                  params, [codes], anchors, 2.0, importance_scales=[scales])),
                              peak_extra_bytes(lambda: penalty_ops.proximal_step_(
                                  params, [codes], anchors, [1e-3], 2.0,
                                  importance_scales=[scales])))
    assert 0 < peaks[1024, 16 * 1024] == peaks[1024, 64 * 1024] <= 16 * 4 * 1024
    assert peaks[1000, 16 * 1024] == peaks[768, 16 * 1024]


@pytest.mark.skipif(not penalty_ops.CPU_KERNELS, reason="C++ extension not built")
def test_compressed_importances_take_the_cpu_op(monkeypatch):
    """On the CPU a pass goes to the C++ op whatever the importance's format."""
    chunked = []
    real_batches = penalty_ops.batches
    monkeypatch.setattr(penalty_ops, "batches",
                        lambda *args: chunked.append(1) or real_batches(*args))
    g = torch.Generator().manual_seed(5)
    values = torch.rand(4096, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.uint8):
        stored, scales = encode_importance(values, dtype)
        params = [nn.Parameter(torch.randn(4096, generator=g))]
        penalty_ops.add_penalty_grad_(params, [stored], [torch.zeros(4096)], 2.0,
                                      importance_scales=[scales])
        penalty_ops.proximal_step_(params, [stored], [torch.zeros(4096)], [0.1], 2.0,
                                   importance_scales=[scales])
        assert chunked == [], dtype


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("form", ["explicit", "proximal"])
@pytest.mark.parametrize("state_dtype", COMPRESSED)
@pytest.mark.parametrize("classp_state", ["fp32", "8bit"])
def test_an_attached_classp_steps_as_with_the_decoded_state_on_the_reference(
        backend, form, state_dtype, classp_state):
    model, reg = consolidated("ewc-separate", state_dtype)
    copied, twin = twin_of("ewc-separate", model, reg)
    runs = []
    for m, r, name in ((model, reg, backend), (copied, twin, "torch")):
        r.penalty_form = form
        optimizer = CLASSP(m.parameters(), lr=0.05, threshold=1e-4, backend=name,
                           state_dtype=classp_state)
        r.attach(optimizer)
        for step in range(3):
            optimizer.zero_grad()
            m(task_data(6 + step)[0][0]).pow(2).mean().backward()
            optimizer.step()
        runs.append((m, optimizer))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(bits(p), bits(q))
        for key, t in opt_a.state[p].items():
            assert torch.equal(bits(t), bits(opt_b.state[q][key])), key


def test_nonfinite_raise_reads_the_decoded_8bit_importance():
    """Codes read as numbers (at most 255) would give a finite penalized gradient; decoded
    with scales 2**127 it overflows, and nonfinite="raise" refuses the step."""
    model, reg = consolidated("mas-sum", "8bit", tasks=1)
    state = saved_and_loaded(reg.state_dict())  # a copy
    state["importance_scales"]["body.weight"].fill_(2.0 ** 127)
    reg.load_state_dict(state)
    reg.lam = 10.0
    perturb_(model, seed=3, scale=2.0)
    optimizer = CLASSP(model.parameters(), lr=0.05, backend="torch", nonfinite="raise")
    reg.attach(optimizer)
    model(task_data(0)[0][0]).pow(2).mean().backward()
    with pytest.raises(FloatingPointError, match="param group 0, param 0"):
        optimizer.step()


@pytest.mark.parametrize("saved", ["param", *COMPRESSED])
@pytest.mark.parametrize("into", ["param", *COMPRESSED])
def test_states_convert_across_formats_through_weights_only_checkpoints(saved, into):
    model, reg = consolidated("ewc-separate", saved)
    state = saved_and_loaded(reg.state_dict())
    assert ("importance_scales" in state) == (saved == "8bit")
    loaded = EWC(model, lam=2.0, state_dtype=into)
    loaded.load_state_dict(state)
    values = decoded(reg)
    for name, stored in loaded._importance.items():
        dtype = importance_dtype(dict(model.named_parameters())[name], into)
        assert stored.dtype == dtype
        if dtype == torch.uint8 and saved == "8bit":  # as it was, bit for bit
            assert torch.equal(stored, reg._importance[name])
            assert torch.equal(loaded._importance_scales[name], reg._importance_scales[name])
        elif dtype == torch.uint8:
            codes, scales = encode_importance(values[name], dtype)
            assert torch.equal(stored, codes)
            assert torch.equal(loaded._importance_scales[name], scales)
        else:
            assert torch.equal(stored, values[name].to(dtype))
        assert torch.equal(loaded.anchor[name], reg.anchor[name])
        assert torch.equal(loaded._residual[name], reg._residual[name])
        assert stored.data_ptr() != state["importance"][name].data_ptr()
    assert loaded.tasks_seen == reg.tasks_seen


@pytest.mark.parametrize("state_dtype", ["param", *COMPRESSED])
def test_the_empty_state_dict_is_shaped_like_the_state_dict(state_dtype):
    _, reg = consolidated("ewc-separate", state_dtype, tasks=1)
    state, empty = reg.state_dict(), reg.empty_state_dict()
    assert state.keys() == empty.keys()
    for key in ("importance", "anchor", "residual", *(["importance_scales"]
                                                       if state_dtype == "8bit" else [])):
        assert state[key].keys() == empty[key].keys()
        for name, t in state[key].items():
            assert (t.dtype, t.shape, t.is_contiguous()) == (
                empty[key][name].dtype, empty[key][name].shape, empty[key][name].is_contiguous())
    reg.load_state_dict(empty)
    assert all(not t.any() for t in reg.importance.values())


def bad_loads():
    """(edit of an 8-bit EWC state, error, message) per refusal."""
    scales = "importance_scales"

    def scale_set(value, index=0):
        def edit(s):
            t = s[scales]["body.weight"].clone()
            t[index] = value
            return edited(s, scales, "body.weight", t)
        return edit

    def exponents_of(s, value=None, dtype=torch.int8, keep_scales=False):
        """``s`` with the per-element exponents of body.weight's block scales (a sharded
        state gathered into one process), ``value`` at element 9."""
        exponents = element_exponents(s[scales]["body.weight"], 61 * 70)
        if value is not None:
            exponents[9] = value
        s = edited(s, "importance_exponents", None,
                   {"body.weight": exponents.view(61, 70).to(dtype)})
        return s if keep_scales else edited(s, scales, None, {})

    return {
        "scale 3": (scale_set(3.0), ValueError,
                    r"state importance_scales 'body.weight' must hold 0 or powers of two in "
                    r"\[2\*\*-115, 2\*\*127\], got 1 other element"),
        "scale -2": (scale_set(-2.0, 16), ValueError, "must hold 0 or powers of two"),
        "scale -0": (scale_set(-0.0), ValueError, "must hold 0 or powers of two"),
        "scale nan": (scale_set(math.nan), ValueError, "must hold 0 or powers of two"),
        "scale inf": (scale_set(math.inf), ValueError, "must hold 0 or powers of two"),
        "scale 2**-116": (scale_set(2.0 ** -116), ValueError, "must hold 0 or powers of two"),
        "float64 scales": (lambda s: edited(s, scales, "body.weight",
                                            s[scales]["body.weight"].double()), TypeError,
                           r"state importance_scales 'body.weight' must be a float32 tensor of "
                           r"shape \(17,\)"),
        "short scales": (lambda s: edited(s, scales, "body.weight",
                                          s[scales]["body.weight"][:-1]), TypeError,
                         r"shape \(17,\) \(one scale per 256 elements\), got a torch.float32 "
                         r"tensor of shape \(16,\)"),
        "no scales": (lambda s: {k: v for k, v in s.items() if k != scales}, ValueError,
                      r"state importance 'body.weight' holds uint8 8-bit codes, but "
                      r"importance_scales has no entry for it"),
        "scales of a float": (lambda s: edited(s, scales, "head.weight", torch.ones(2)),
                              ValueError, r"state importance_scales 'head.weight' belongs to "
                                          r"no uint8 importance entry"),
        "scales not a dict": (lambda s: edited(s, scales, None, [1.0]), TypeError,
                              r"state importance_scales must be a dict"),
        "codes of a wrong shape": (lambda s: edited(s, "importance", "body.weight",
                                                    s["importance"]["body.weight"].t()),
                                   ValueError, r"state importance 'body.weight' has shape "
                                               r"\(70, 61\), its parameter \(61, 70\)"),
        "int8 codes": (lambda s: edited(s, "importance", "body.weight",
                                        s["importance"]["body.weight"].to(torch.int8)),
                       TypeError, r"must be a floating-point tensor \(or uint8 8-bit codes\)"),
        "nan values": (lambda s: edited(s, "importance", "body.weight", torch.full(
                           (61, 70), math.nan)) | {scales: {}},
                       ValueError, r"state importance 'body.weight' must be finite and >= 0, "
                                   r"got 4270 NaN"),
        "negative value": (lambda s: edited(s, "importance", "body.weight", -torch.ones(
                               61, 70)) | {scales: {}},
                           ValueError, r"importance 'body.weight' must be finite and >= 0, "
                                       r"got 4270 negative"),
        "bad anchor after good codes": (lambda s: edited(s, "anchor", "head.bias", torch.full(
                                            (5,), math.inf)),
                                        ValueError, r"state anchor 'head.bias' must be finite"),
        "exponent -116": (lambda s: exponents_of(s, -116), ValueError,
                          r"state importance_exponents 'body.weight' has 1 of its 4270 "
                          r"elements outside \[-115, 127\] and not -128"),
        "int16 exponents": (lambda s: exponents_of(s, dtype=torch.int16), TypeError,
                            r"state importance_exponents 'body.weight' must be a dense int8 "
                            r"tensor of the codes' shape \(61, 70\)"),
        "exponents and scales": (lambda s: exponents_of(s, keep_scales=True), ValueError,
                                 r"state importance 'body.weight' has an entry in "
                                 r"importance_scales and in importance_exponents"),
        "exponents of a float": (lambda s: edited(s, "importance_exponents", None, {
                                     "head.weight": torch.zeros(5, 61, dtype=torch.int8)}),
                                 ValueError, r"state importance_exponents 'head.weight' belongs "
                                             r"to no uint8 importance entry"),
    }


BAD_LOADS = bad_loads()


@pytest.mark.parametrize("case", BAD_LOADS)
def test_a_bad_8bit_state_is_refused_naming_the_entry_and_changes_nothing(case):
    edit, error, match = BAD_LOADS[case]
    _, reg = consolidated("ewc-separate", "8bit", tasks=1)
    _, other = consolidated("ewc-separate", "8bit", tasks=2)
    state = edit(saved_and_loaded(other.state_dict()))
    refused(reg, error, match, lambda: reg.load_state_dict(state))


@pytest.mark.parametrize("into", ["8bit", "param"])
def test_per_element_exponents_load_as_the_block_scales_do(into):
    """The form a sharded 8-bit importance takes in a state dict, gathered into one process,
    loads as the block scales it came from do: bit for bit into 8 bits, decoded into another
    format."""
    _, reg = consolidated("ewc-separate", "8bit")
    state = reg.state_dict()
    gathered = edited(state, "importance_exponents", None, {
        "body.weight": element_exponents(state["importance_scales"]["body.weight"],
                                         61 * 70).view(61, 70)})
    gathered["importance_scales"] = {}
    runs = [consolidated("ewc-separate", into, tasks=1)[1] for _ in range(2)]
    runs[0].load_state_dict(state)
    runs[1].load_state_dict(gathered)
    for kind in ("_importance", "_importance_scales"):
        mine, theirs = getattr(runs[1], kind), getattr(runs[0], kind)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[name], theirs[name]) for name in mine)


def test_a_scale_at_either_end_of_the_range_loads():
    _, reg = consolidated("mas-sum", "8bit", tasks=1)
    state = saved_and_loaded(reg.state_dict())  # a copy
    state["importance_scales"]["body.weight"][:2] = torch.tensor([2.0 ** -115, 2.0 ** 127])
    reg.load_state_dict(state)
    assert torch.equal(reg._importance_scales["body.weight"],
                       state["importance_scales"]["body.weight"])


def test_a_boundary_that_overflows_is_refused_and_changes_nothing():
    """An 8-bit state whose merge overflows float32 is refused before it is encoded (the
    encoding would cap it)."""
    model, reg = consolidated("mas-sum", "8bit", tasks=1)
    state = saved_and_loaded(reg.state_dict())  # a copy
    state["importance_scales"]["body.weight"].fill_(2.0 ** 127)
    state["importance"]["body.weight"].fill_(255)  # 15/16 * 2**127
    reg.load_state_dict(state)
    new = {name: torch.full(p.shape, 1.5 * 2.0 ** 127) for name, p in model.named_parameters()}
    anchors = {name: p.detach().clone() for name, p in model.named_parameters()}
    refused(reg, ValueError, r"consolidate: importance of 'body.weight' after this task must "
                             r"be finite and >= 0, got 4270 inf",
            lambda: reg._enter_task(new, anchors))


def test_state_bytes_count_codes_and_scales():
    """bf16 params (every tensor >= 4096 elements): 8-bit CLASSP and 8-bit MAS keep at most 4.1
    bytes per param together; float32 params with bf16 MAS 6 (2 + a 4-byte anchor)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Tanh(),
                          nn.Linear(64, 96, bias=False)).to(torch.bfloat16)
    x = torch.randn(8, 128).to(torch.bfloat16)
    optimizer = CLASSP(model.parameters(), lr=0.01, backend="torch", state_dtype="8bit")
    mas = MAS(model, state_dtype="8bit")
    mas.consolidate([x])
    mas.attach(optimizer)
    model(x).float().pow(2).mean().backward()
    optimizer.step()
    numel = sum(p.numel() for p in model.parameters())
    blocks = sum(num_blocks(p.numel()) for p in model.parameters())
    assert mas.state_bytes() == numel * (1 + 2) + 4 * blocks
    assert (optimizer.state_bytes() + mas.state_bytes()) / numel <= 4.1
    model.float()
    bf16 = MAS(model, state_dtype="bf16")
    bf16.consolidate([x.float()])
    assert bf16.state_bytes() == 6 * numel


def test_the_harness_passes_importance_dtype_to_the_regularizer():
    for method in ("mas", "ewc", "online-ewc", "classp+mas"):
        hparams = resolve_hparams(method, {"importance_dtype": "8bit"})
        assert build_method(method, Net(), hparams).regularizer.state_dtype == "8bit"
        assert resolve_hparams(method)["importance_dtype"] == "param"
    with pytest.raises(ValueError, match="importance_dtype must be one of param, bf16, 8bit"):
        resolve_hparams("mas", {"importance_dtype": "fp32"})


def sharded_worker(rank, out_dir):
    """bf16 importance on FSDP2 shards: consolidate, penalty gradient and a DCP round trip;
    then 8-bit importance on shards (``sharded_8bit``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = Net(contiguous=True)
    fully_shard(model.body, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reg = MAS(model, lam=2.0, state_dtype="bf16")
    shard = task_data(0)[rank::WORLD_SIZE]
    reg.consolidate(shard)
    stored = reg.state_dict()["importance"]["body.weight"]
    assert isinstance(stored, DTensor) and stored.dtype == torch.bfloat16
    perturb_(model, seed=5)
    model(task_data(2)[0][0]).pow(2).sum().backward()
    reg.add_penalty_grad_()
    dcp.save({"reg": reg.state_dict()}, checkpoint_id=f"{out_dir}/checkpoint")
    restored = MAS(model, lam=2.0, state_dtype="bf16")
    state = {"reg": restored.empty_state_dict()}
    dcp.load(state, checkpoint_id=f"{out_dir}/checkpoint")
    restored.load_state_dict(state["reg"])
    assert torch.equal(restored.importance["body.weight"].full_tensor(),
                       reg.importance["body.weight"].full_tensor())
    results = {"importance": reg.importance["body.weight"].full_tensor(),
               "grad": model.body.weight.grad.full_tensor()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    sharded_8bit(rank, mesh, out_dir)


class Blocks(nn.Module):
    """A 128x64 weight whose 2-rank FSDP2 shards are runs of whole 8-bit blocks (``a``), a
    61x128 one whose second shard starts inside a block (``b``: at element 3968, in the block
    from 3840) and a small head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(64, 128), nn.Linear(128, 61), nn.Linear(61, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def block_data(task):
    gen = torch.Generator().manual_seed(200 + task)
    return [(torch.randn(n, 64, generator=gen), torch.randint(0, 5, (n,), generator=gen))
            for n in (6, 4)]


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_within_a_rounding(values, exact):
    """8-bit importances rounded to nearest from ``exact`` (or from values a float sum apart):
    within half a code step above 2**-31 of the largest."""
    torch.testing.assert_close(values, exact, rtol=2 ** -3, atol=float(exact.max()) * 2 ** -31)


def local_state(reg):
    """Copies of the local tensors of ``reg``'s stored importances, scales and anchors."""
    return {kind: {name: (t.to_local() if hasattr(t, "to_local") else t).clone()
                   for name, t in tensors.items()}
            for kind, tensors in (("importance", reg._importance),
                                  ("scales", reg._importance_scales), ("anchor", reg._anchor))}


def assert_same_local_state(a, b):
    for kind in a:
        assert a[kind].keys() == b[kind].keys()
        assert all(torch.equal(a[kind][name], b[kind][name]) for name in a[kind]), kind


def sharded_8bit(rank, mesh, out_dir):
    """8-bit MAS importance of a model FSDP2 shards after consolidate: the shard's blocks hold
    the whole's codes and scales where they are its blocks, its values within a rounding
    elsewhere; the penalty gradient and an attached CLASSP step equal a plain "param" MAS
    holding the decoded values bit for bit; a consolidate on the shards equals one process
    within a rounding; DCP round trips bit for bit on the same shards and into one process
    within a rounding; bad exponents, on one rank only, are refused by all, changing nothing."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = Blocks()
    reg = MAS(model, lam=2.0, state_dtype="8bit")
    reg.consolidate(block_data(0))  # all ranks' data: the same importance everywhere
    before = copy.deepcopy(reg.state_dict())
    for layer in (model.a, model.b, model):
        fully_shard(layer, mesh=mesh)
    state = reg.state_dict()
    assert sorted(state["importance_exponents"]) == ["a.weight", "b.weight"]
    assert sorted(state["importance_scales"]) == []
    for name in ("a.weight", "b.weight"):
        codes, exponents = state["importance"][name], state["importance_exponents"][name]
        assert isinstance(codes, DTensor) and codes.dtype == torch.uint8
        assert isinstance(exponents, DTensor) and exponents.dtype == torch.int8
        assert exponents.placements == codes.placements == model.get_parameter(name).placements
    local = reg._importance["a.weight"].to_local()
    assert torch.equal(local, before["importance"]["a.weight"][64 * rank:64 * rank + 64])
    assert torch.equal(reg._importance_scales["a.weight"],
                       before["importance_scales"]["a.weight"][16 * rank:16 * rank + 16])
    exact = {name: importance_values(t, before["importance_scales"].get(name), torch.float32)
             for name, t in before["importance"].items()}
    values = {name: whole(t) for name, t in reg.importance.items()}
    assert torch.equal(values["a.weight"], exact["a.weight"])
    assert_within_a_rounding(values["b.weight"], exact["b.weight"])

    # the penalty gradient and an attached CLASSP step, against a plain "param" MAS
    perturb_(model, seed=5)
    twin_model = Blocks()
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin_model.parameters()):
            q.copy_(whole(p))
    twin = MAS(twin_model, lam=2.0)
    twin.load_state_dict({"method": "MAS", "tasks_seen": 1, "importance": values,
                          "anchor": {n: whole(t) for n, t in reg.anchor.items()}})
    for regularizer, net in ((reg, model), (twin, twin_model)):
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        regularizer.add_penalty_grad_()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(whole(p.grad), q.grad)
    for regularizer, net in ((reg, model), (twin, twin_model)):
        optimizer = CLASSP(net.parameters(), lr=0.01, backend="foreach", state_dtype="8bit")
        regularizer.attach(optimizer)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        regularizer.detach()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(whole(p), q.detach())

    # a consolidate on the shards, against one process on the whole data
    reg.consolidate(block_data(1)[rank::WORLD_SIZE])
    twin_8bit = MAS(twin_model, lam=2.0, state_dtype="8bit")
    twin_8bit.load_state_dict({"method": "MAS", "tasks_seen": 1, "importance": values,
                               "anchor": {n: whole(t) for n, t in reg.anchor.items()}})
    twin_8bit.consolidate(block_data(1))
    for name, t in reg.importance.items():
        assert_within_a_rounding(whole(t), twin_8bit.importance[name])

    # DCP: the same shards, then one process
    path = f"{out_dir}/checkpoint-8bit"
    dcp.save({"reg": reg.state_dict()}, checkpoint_id=path)
    restored = MAS(model, lam=2.0, state_dtype="8bit")
    template = {"reg": restored.empty_state_dict()}
    assert sorted(template["reg"]["importance_exponents"]) == ["a.weight", "b.weight"]
    dcp.load(template, checkpoint_id=path)
    restored.load_state_dict(template["reg"])
    assert_same_local_state(local_state(restored), local_state(reg))
    values = {name: whole(t) for name, t in reg.importance.items()}
    dist.barrier()
    if rank == 0:
        dcp_to_torch_save(path, f"{out_dir}/whole-8bit.pt")
        saved = torch.load(f"{out_dir}/whole-8bit.pt", weights_only=False)["reg"]
        plain = MAS(Blocks(), lam=2.0, state_dtype="8bit")
        plain.load_state_dict(saved)
        for name, t in plain.importance.items():
            if name == "b.weight":
                assert_within_a_rounding(t, values[name])
            else:
                assert torch.equal(t, values[name])
        assert plain._importance_scales["a.weight"].shape == (32,)
    dist.barrier()

    # bad exponents are refused by every rank
    kept = local_state(restored)
    state = restored.state_dict()
    exponents = state["importance_exponents"]["a.weight"]
    if rank == 1:
        exponents.to_local()[3, 7] = -120
    with pytest.raises(ValueError, match=r"state importance_exponents 'a.weight' has 1 of its "
                                         r"8192 elements outside \[-115, 127\] and not -128"):
        restored.load_state_dict(state)
    state["importance_exponents"]["a.weight"] = exponents.to(torch.int16)
    with pytest.raises(TypeError, match=r"state importance_exponents 'a.weight' must be a "
                                        r"dense int8 DTensor of the codes' shape \(128, 64\)"):
        restored.load_state_dict(state)
    assert_same_local_state(local_state(restored), kept)


@requires_gloo
def test_compressed_importances_work_on_fsdp2_shards(tmp_path):
    run_ranks(sharded_worker, str(tmp_path), timeout_s=300)
    model = Net(contiguous=True)
    reg = MAS(model, lam=2.0, state_dtype="bf16")
    reg.consolidate(task_data(0))
    perturb_(model, seed=5)
    model(task_data(2)[0][0]).pow(2).sum().backward()
    reg.add_penalty_grad_()
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert results["importance"].dtype == torch.float32
        # the sharded sums add up in another order: within one bfloat16 rounding
        torch.testing.assert_close(results["importance"], reg.importance["body.weight"],
                                   rtol=2 ** -8, atol=0)
        torch.testing.assert_close(results["grad"], model.body.weight.grad, rtol=2 ** -7,
                                   atol=1e-6)
