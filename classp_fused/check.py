"""The installation self-check: every backend of a device against a float64 oracle, then its speed.

    classp-fused check [--device cpu|cuda] [--quick]
    python -m classp_fused.check [--device cpu|cuda] [--quick]

Each backend that ``available_backends(device)`` lists steps, through the public op, every
combination of param dtype (float64 where the backend takes it), power (1, 2 and the generic
path's 1.5), threshold (0, and 0.75**2, which masks about half of normal gradients), scaling on
and off, size (0, 1, 3, 1023, 4097; 70001 for the kernels, past their 2^16-element chunks) and
layout (contiguous; a view at offset 1 of a bigger buffer, so misaligned; every other element
of a buffer). One call steps every size and layout of a dtype and setting. Gradients include
exact zeros, values exactly at the threshold (``g*g == threshold``: not updated, the test is
strict) and NaN/Inf (skipped and counted). Buffer elements around the views are NaN and must
be neither read nor written, gradients must stay unchanged, and each backend steps copies of
its own. On the CPU the Triton backend runs only when ``TRITON_INTERPRET=1`` (interpreted:
small sizes, no bandwidth figure).

The oracle runs on the CPU, independent of every backend: the spec's update mask in the
param's compute dtype (as the spec defines it), then ``A + |g|^p`` and ``lr*g/(eps+A)^(1/p)``
in float64 with ``pow`` (no fast paths). Elements outside the mask must keep their bits;
updated elements must lie within ``TOLERANCE_EPS`` epsilons of their stored dtype of the
float64 value, relative to ``|before| + |change|``; the counts must be equal.

Then one bandwidth figure per backend (20 bytes per fp32 element and step, every element
updated) against ``dst.copy_(src)`` (8 bytes per element, read plus written) timed in between.
Exit status: 0 when everything matches, 1 on any mismatch or error, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

import classp_fused
from . import _extension
from .backends import param_dtypes
from .backends import triton as triton_backend
from .reference import compute_dtype

DESCRIPTION = ("Check this installation: step every backend of the device against a float64"
               " oracle over dtypes, powers, thresholds, sizes and layouts, then measure each"
               " backend's bandwidth as a fraction of a copy. Exit 0 when everything matches,"
               " 1 on any mismatch.")
LR, EPS = 0.05, 1e-5
AT_THRESHOLD = 0.75  # exact in every dtype, and so is its square
THRESHOLDS = (0.0, AT_THRESHOLD ** 2)
POWERS = (1.0, 2.0, 1.5)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIZES = (0, 1, 3, 1023, 4097)  # 4097: past a Triton chunk
# Past the 2^16-element chunks the C++ and CUDA kernels split their work into: for the kernels
# only (the torch and foreach backends have no chunks; the Triton interpreter is slow)
KERNEL_SIZES = (70001,)
KERNELS = ("cpp", "cuda", "triton")
LAYOUTS = ("contiguous", "offset", "strided")
FUSED_BACKENDS = {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")}  # named when missing
QUICK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUICK_SIZES = (1, 3, 1023, 4097)
# Allowed error in epsilons of the stored dtype, relative to |before| + |change|: half-precision
# params are rounded once from fp32 (half an epsilon); fp32 and fp64 results may differ from
# the exact value by a few roundings, and the generic power's exp2/log2 (approximate on GPUs)
# by more.
TOLERANCE_EPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 64.0,
                 torch.float64: 64.0}
BYTES_PER_ELEMENT = 20  # read param, grad and accumulator, write param and accumulator
BANDWIDTH_ELEMENTS = {"cpu": 10 ** 7, "cuda": 10 ** 8}
REPEATS = 5  # timed steps per backend, fewer where they take longer than REPEAT_SECONDS
REPEAT_SECONDS = 2.0
MAX_LISTED_FAILURES = 20
NO_ERROR = (0.0, None)  # (error / tolerance, dtype of the tensor where it is largest)
TENSOR_NAMES = ("param", "grad", "accumulator")
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}


@dataclass(frozen=True)
class Call:
    """One call of the op: its param dtype and hyperparameters."""
    dtype: torch.dtype
    power: float
    threshold: float
    apply_scaling: bool


@dataclass(frozen=True)
class Case:
    """One stepped tensor: the call it was stepped in, its size and its layout."""
    call: Call
    size: int
    layout: str

    def __str__(self) -> str:
        call = self.call
        return (f"{str(call.dtype).removeprefix('torch.')} power={call.power:g}"
                f" threshold={call.threshold:g} scaling={'on' if call.apply_scaling else 'off'}"
                f" size={self.size} layout={self.layout}")


@dataclass
class BackendReport:
    """What the check found for one backend."""
    name: str
    passed: int = 0
    total: int = 0
    worst: tuple = (0.0, None)  # (error / tolerance, dtype of that tensor)
    failures: list = field(default_factory=list)  # (Case, reason)
    gbs: Optional[float] = None
    bandwidth_note: str = ""


@dataclass
class CheckReport:
    """The whole check: per-backend reports and the copy bandwidth they are compared with."""
    device: torch.device
    backends: list
    copy_gbs: float

    @property
    def ok(self) -> bool:
        return bool(self.backends) and all(not b.failures for b in self.backends)


def bits(t: Tensor) -> Tensor:
    """The raw bit pattern of ``t`` (compares NaN and -0.0 exactly)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _buffer_length(layout: str, n: int) -> int:
    return {"contiguous": n, "offset": n + 2, "strided": 2 * n}[layout]


def _view(layout: str, buffer: Tensor) -> Tensor:
    """The tensor the step gets: the buffer, a view at offset 1 (misaligned), or every other
    element (non-contiguous)."""
    if layout == "contiguous":
        return buffer
    if layout == "offset":
        return buffer[1:-1]
    return buffer[::2]


def _gradient(n: int, dtype: torch.dtype, threshold: float, gen: torch.Generator) -> Tensor:
    """Normal gradients; of every 8 elements one is +-0, one +-sqrt(threshold) (exactly at the
    threshold: -0.0 when it is 0), one NaN, +Inf or -Inf."""
    g = torch.randn(n, dtype=torch.float64, generator=gen)
    i = torch.arange(n)
    sign = torch.where(i % 16 < 8, 1.0, -1.0).double()
    nonfinite = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    g = torch.where(i % 8 == 1, 0.0 * sign, g)
    g = torch.where(i % 8 == 3, math.sqrt(threshold) * (sign if threshold else -1.0), g)
    g = torch.where(i % 8 == 5, nonfinite[(i // 8) % 3], g)
    return g.to(dtype)


def oracle(param: Tensor, grad: Tensor, acc: Tensor, call: Call) -> tuple:
    """The spec's step in float64: ``(param, acc, mask, counts)``, counts as ``[updated,
    non-finite]``. The mask is computed in the param's compute dtype, as the spec defines it."""
    g = grad.to(compute_dtype(param))
    finite = torch.isfinite(g)
    mask = finite & (g * g > call.threshold)
    g = torch.where(mask, grad.double(), 0.0)
    new_acc = acc.double() + g.abs().pow(call.power)
    if call.apply_scaling:
        step = LR * g / (EPS + new_acc).pow(1.0 / call.power)
    else:
        step = LR * g
    new_param = param.double() - step
    counts = [int(mask.sum()), int((~finite).sum())]
    return (torch.where(mask, new_param, param.double()), torch.where(mask, new_acc, acc.double()),
            mask, counts)


@dataclass
class Member:
    """One tensor of a call: its inputs as every backend gets them (CPU buffers, never stepped)
    and what the oracle expects of them."""
    case: Case
    buffers: tuple  # param, grad and accumulator buffers; NaN outside the view
    positions: Tensor  # the buffer index of each view element
    grad: Tensor  # the view's gradient, for the messages
    counts: list  # [updated, non-finite]
    updated: Tensor  # the buffer index of each element the step updates
    want: tuple  # float64 param and accumulator there
    tolerance: tuple  # the absolute error allowed there, for each


def _tolerance(want: Tensor, before: Tensor) -> Tensor:
    """``TOLERANCE_EPS`` epsilons of ``before``'s dtype, relative to |before| + |change|."""
    info, tolerance = torch.finfo(before.dtype), TOLERANCE_EPS[before.dtype]
    before = before.double()
    return tolerance * info.eps * (before.abs() + (want - before).abs() + info.tiny)


def call_members(call: Call, sizes: Sequence[int], seed: int) -> list[Member]:
    """The members of one call: each size in each layout, the same values in every layout."""
    gen = torch.Generator().manual_seed(seed)
    acc_dtype = compute_dtype(torch.empty(0, dtype=call.dtype))
    result = []
    for n in sizes:
        values = (torch.randn(n, dtype=torch.float64, generator=gen).to(call.dtype),
                  _gradient(n, call.dtype, call.threshold, gen),
                  (torch.rand(n, dtype=torch.float64, generator=gen) + 0.1).to(acc_dtype))
        new_param, new_acc, mask, counts = oracle(*values, call)
        want = (new_param[mask], new_acc[mask])
        tolerance = tuple(_tolerance(w, v[mask]) for w, v in ((want[0], values[0]),
                                                                (want[1], values[2])))
        for layout in LAYOUTS:
            positions = _view(layout, torch.arange(_buffer_length(layout, n)))
            buffers = tuple(torch.full((_buffer_length(layout, n),), math.nan, dtype=v.dtype)
                            .index_copy_(0, positions, v) for v in values)
            result.append(Member(Case(call, n, layout), buffers, positions, values[1], counts,
                                 positions[mask], want, tolerance))
    return result


def _explain_change(member: Member, k: int, buffer: Tensor, index: int) -> str:
    """Why buffer ``k`` (param, grad, accumulator) must not have changed at ``index``."""
    name = TENSOR_NAMES[k]
    where = (member.positions == index).nonzero()
    if not len(where):
        return f"{name} buffer element {index}, outside the view, changed"
    i = int(where[0])
    if k == 1:
        return f"grad element {i} changed: the step must only read the gradient"
    return (f"{name} element {i} (grad {_number(member.grad[i])}) changed from"
            f" {_number(member.buffers[k][index])} to {_number(buffer[index])}; it must not be"
            f" updated")


def _number(x: Tensor) -> str:
    return f"{x.item():.9g}"


def compare(member: Member, stepped: Sequence[Tensor],
            counts: Sequence[int]) -> tuple[Optional[str], tuple]:
    """Check the buffers one backend ``stepped`` and its ``counts`` against ``member``'s
    expectations; returns ``(reason or None, (worst error / tolerance, that tensor's dtype))``.
    The first wrong element is named before wrong counts."""
    worst = NO_ERROR
    for k, (buffer, before) in enumerate(zip(stepped, member.buffers)):
        buffer = buffer.cpu()
        changed = bits(buffer) != bits(before)
        if k != 1:
            changed[member.updated] = False
        if changed.any():
            return _explain_change(member, k, buffer, int(changed.nonzero()[0])), NO_ERROR
        if k == 1:
            continue
        want, tolerance = member.want[k // 2], member.tolerance[k // 2]
        ratio = (buffer[member.updated].double() - want).abs() / tolerance
        bad = ~(ratio <= 1)  # NaN is bad too
        if bad.any():
            j = int(bad.nonzero()[0])
            i = int((member.positions == member.updated[j]).nonzero()[0])
            return (f"{TENSOR_NAMES[k]} element {i} (grad {_number(member.grad[i])}) is"
                    f" {_number(buffer[member.updated[j]])}, expected {_number(want[j])}"
                    f" (error {float(ratio[j]) * TOLERANCE_EPS[buffer.dtype]:.3g} eps,"
                    f" tolerance {TOLERANCE_EPS[buffer.dtype]:g})", NO_ERROR)
        if ratio.numel():
            worst = max(worst, (float(ratio.max()), buffer.dtype), key=lambda w: w[0])
    if list(counts) != member.counts:
        return (f"counts (updated, non-finite) are {list(counts)}, expected {member.counts}",
                NO_ERROR)
    return None, worst


def calls(quick: bool) -> list[Call]:
    """The op calls of the check; each steps every size in every layout."""
    dtypes = QUICK_DTYPES if quick else DTYPES
    scalings = (True,) if quick else (True, False)
    return [Call(*c) for c in itertools.product(dtypes, POWERS, THRESHOLDS, scalings)]


def sizes_for(backend: str, device: torch.device, quick: bool) -> tuple:
    """The tensor sizes a call of ``backend`` steps."""
    if quick:
        return QUICK_SIZES
    interpreted = backend == "triton" and device.type == "cpu"
    return SIZES + (KERNEL_SIZES if backend in KERNELS and not interpreted else ())


def step_members(report: BackendReport, members: Sequence[Member], device: torch.device) -> None:
    """Step copies of ``members`` (one call) with backend ``report.name``; record the results."""
    call = members[0].case.call
    report.total += len(members)
    stepped = [tuple(b.to(device, copy=True) for b in m.buffers) for m in members]
    views = [[_view(m.case.layout, buffers[k]) for m, buffers in zip(members, stepped)]
             for k in range(3)]
    try:
        counts = classp_fused.classp_step_(
            *views, lr=LR, threshold=call.threshold, eps=EPS, power=call.power,
            apply_scaling=call.apply_scaling, backend=report.name)
    except Exception as error:  # a backend that fails is reported like one that is wrong
        reason = f"raised {type(error).__name__}: {str(error).splitlines()[0]}"
        report.failures.extend((m.case, reason) for m in members)
        return
    if counts.shape != (len(members), 2):
        reason = f"returned counts of shape {tuple(counts.shape)}, expected ({len(members)}, 2)"
        report.failures.extend((m.case, reason) for m in members)
        return
    with _threads(1):  # small tensors: faster on one thread, above all on a busy machine
        for member, buffers, row in zip(members, stepped, counts.tolist()):
            reason, worst = compare(member, buffers, row)
            if reason is None:
                report.passed += 1
                report.worst = max(report.worst, worst, key=lambda w: w[0])
            else:
                report.failures.append((member.case, reason))


@contextlib.contextmanager
def _threads(n: int):
    """Run the block with ``n`` torch CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_backends(names: Sequence[str], device: torch.device,
                   quick: bool) -> list[BackendReport]:
    """Step every case with each backend of ``names`` and compare it with the oracle, which
    runs once per call; each backend steps copies of its own."""
    reports = [BackendReport(name) for name in names]
    for seed, call in enumerate(calls(quick)):
        with _threads(1):
            members = call_members(call, sorted({n for report in reports for n in sizes_for(
                report.name, device, quick)}), seed)
        for report in reports:
            if call.dtype in param_dtypes(report.name):
                sizes = sizes_for(report.name, device, quick)
                step_members(report, [m for m in members if m.case.size in sizes], device)
    return reports


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def bandwidth_elements(device: torch.device, quick: bool) -> int:
    """fp32 elements per tensor of the bandwidth runs: 1e7 on CPU, 1e8 on a GPU (a tenth with
    ``quick``), fewer where the GPU's free memory is short."""
    n = BANDWIDTH_ELEMENTS[device.type] // (10 if quick else 1)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(n, free // 100)  # the tensors, the copy's and the reference's temporaries
    return n


def _best_step_seconds(name: str, device: torch.device, n: int, copy, copies: list,
                       repeats: int) -> float:
    """Best of ``repeats`` steps of backend ``name`` on ``n`` fp32 elements, every one updated
    (after one warm-up step), or of those made in ``REPEAT_SECONDS`` (at least two); a ``copy``
    is timed before each, into ``copies``."""
    params, grads, accs = ([torch.randn(n, device=device)], [torch.randn(n, device=device)],
                           [torch.zeros(n, device=device)])

    def step():
        classp_fused.classp_step_(params, grads, accs, lr=LR, threshold=0.0, eps=EPS,
                                  power=1.0, backend=name)
    step()
    times = []
    began = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or
                                    time.perf_counter() - began < REPEAT_SECONDS):
        copies.append(_seconds(copy, device))
        times.append(_seconds(step, device))
    return min(times)


def measure_bandwidth(reports: list[BackendReport], device: torch.device, n: int,
                      repeats: int) -> float:
    """Fill each report's GB/s; return the copy's, the best of the copies timed between the
    steps. A backend that raises here gets a failure."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
    copies = [_seconds(copy, device)]
    for report in reports:
        if report.name == "triton" and device.type == "cpu":
            report.bandwidth_note = "interpreted"
            continue
        try:
            best = _best_step_seconds(report.name, device, n, copy, copies, repeats)
        except Exception as error:  # reported like a mismatch
            report.bandwidth_note = "raised"
            report.failures.append((f"bandwidth run on {n} fp32 elements",
                                    f"raised {type(error).__name__}: {error}"))
            continue
        report.gbs = BYTES_PER_ELEMENT * n / best / 1e9
    return 8 * n / min(copies) / 1e9


def run_check(device: torch.device, quick: bool = False,
              bandwidth_n: Optional[int] = None) -> CheckReport:
    """Check every backend available on ``device``, then measure their bandwidth on
    ``bandwidth_n`` elements (default ``bandwidth_elements(device, quick)``)."""
    n = bandwidth_n or bandwidth_elements(device, quick)
    with warnings.catch_warnings():  # the Triton interpreter computes masked-out lanes too
        warnings.filterwarnings("ignore", ".*encountered in", RuntimeWarning)
        reports = check_backends(classp_fused.available_backends(device), device, quick)
        copy_gbs = measure_bandwidth(reports, device, n, REPEATS // 2 + 1 if quick else REPEATS)
    return CheckReport(device, reports, copy_gbs)


def _worst(report: BackendReport) -> str:
    ratio, dtype = report.worst
    return f"{ratio * TOLERANCE_EPS[dtype]:.2f} eps {SHORT[dtype]}" if dtype is not None else "-"


def format_report(report: CheckReport) -> str:
    """The table (backend, cases, worst error, GB/s, fraction of copy), the failures and the
    verdict, one line, last."""
    lines = [f"{'backend':8} {'cases':>11}  {'worst error':14} {'GB/s':>8}  {'of copy':>11}"]
    for b in report.backends:
        speed = (f"{b.gbs:8.2f}  {b.gbs / report.copy_gbs:11.2f}" if b.gbs is not None
                 else f"{'-':>8}  {b.bandwidth_note or '-':>11}")
        lines.append(f"{b.name:8} {f'{b.passed}/{b.total}':>11}  {_worst(b):14} {speed}")
    lines.append(f"{'copy':8} {'':>11}  {'':14} {report.copy_gbs:8.2f}  {1.0:11.2f}")
    failed = [b for b in report.backends if b.failures]
    for b in failed:
        lines.append("")
        for case, reason in b.failures[:MAX_LISTED_FAILURES]:
            lines.append(f"MISMATCH {b.name}: {case}: {reason}")
        if len(b.failures) > MAX_LISTED_FAILURES:
            lines.append(f"... and {len(b.failures) - MAX_LISTED_FAILURES} more for {b.name}")
    names = ", ".join(b.name for b in report.backends)
    lines.append("")
    if not report.backends:
        lines.append(f"verdict: FAIL: no backend is available on {report.device}")
    elif not failed:
        total = sum(b.total for b in report.backends)
        lines.append(f"verdict: OK: {names} on {report.device} match the float64 oracle in all"
                     f" {total} cases")
    else:
        lines.append("verdict: FAIL: " + "; ".join(
            f"{b.name} mismatches in {len(b.failures)} of {b.total} cases, first: "
            f"{b.failures[0][0]}" for b in failed))
    return "\n".join(lines)


def header(device: torch.device, quick: bool, n: int) -> str:
    """What runs where: versions, threads or GPU, unavailable backends, the check's settings."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"{torch.get_num_threads()} threads"
    lines = [f"classp_fused {classp_fused.__version__} self-check on {device}"
             f" (torch {torch.__version__}, {where}){', quick' if quick else ''}"]
    missing = [name for name in FUSED_BACKENDS[device.type]
               if name not in classp_fused.available_backends(device)]
    if missing:
        lines.append(f"not available on {device.type}: {', '.join(missing)}")
    if _extension.LOAD_ERROR is not None:
        lines.append(f"C++ extension not loaded: {_extension.LOAD_ERROR}")
    if device.type == "cpu" and triton_backend.triton is not None and \
            not triton_backend.INTERPRET:
        lines.append("triton on cpu: set TRITON_INTERPRET=1 to check it through its interpreter")
    tolerances = ", ".join(f"{SHORT[d]} {t:g}" for d, t in TOLERANCE_EPS.items())
    lines.append(f"oracle: float64; tolerance in eps of the stored dtype, relative to |before|"
                 f" + |change|: {tolerances}")
    lines.append(f"bandwidth: {n:.0e} fp32 elements, {BYTES_PER_ELEMENT} bytes each per step;"
                 f" copy counts read + write (8 bytes)")
    return "\n".join(lines)


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: no CUDA device is available to this torch"
                                         f" ({torch.__version__})")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()}"
                                         " CUDA devices")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The check's options, for ``python -m classp_fused.check`` and ``classp-fused check``."""
    parser.add_argument("--device", type=_device, metavar="cpu|cuda",
                        help="the device to check (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (no float64, no 'scaling off', no empty or 70001"
                        " element tensors) and a bandwidth run a tenth the size")


def run(args: argparse.Namespace) -> int:
    """Run the check the parsed ``args`` describe, print it; return the exit status."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        n = bandwidth_elements(device, args.quick)
        print(header(device, args.quick, n), flush=True)
        report = run_check(device, args.quick, n)
    print(format_report(report))
    return 0 if report.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m classp_fused.check``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m classp_fused.check",
                                     description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
