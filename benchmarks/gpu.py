"""The GPU step suite: CLASSP's GPU backends against optimizers that exist on CUDA.

``python -m benchmarks --device cuda`` runs it and writes ``benchmarks/gpu_step_cuda.json``.

Cases come in groups of one layout (size, tensor count, dtype). Every implementation of a group
gets parameters of its own with standard-normal gradients, is warmed up (compiled, tuned, its
tables built) and, where it can be, captured into a CUDA graph. Then, in rounds that visit the
group's implementations in turn, so that all see the same drift of the machine, each one is
measured for

- kernel time: the device time of the kernels and copies of one step (``torch.profiler``, CUDA
  activity; one session of five steps after the rounds), what bandwidth is judged by;
- eager time: back-to-back ``step()`` calls between CUDA events, host launch time included;
- graph time: replays of the captured step between CUDA events;
- host time: one ``step()`` call on an idle GPU, without waiting for its kernels.

GB/s is the bytes-per-element model over the kernel time; the copy and in-place (``a += s*b``)
bandwidth are measured at the start of the same run. The peers: ``adam/fused``
(``torch.optim.Adam(fused=True, capturable=True)``), ``adagrad/foreach``, ``adagrad/compiled``
(``torch.compile`` of the foreach Adagrad step, the bandwidth reference: the same 20 bytes per
fp32 element as CLASSP) and ``classp/naive+compile`` (the reference CLASSP update, written in
plain PyTorch, under ``torch.compile``).

On a CPU the same code runs without kernel and graph times (the smoke test uses that).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from classp_fused import CLASSP, MAS, available_backends

from . import bandwidth
from .step_cases import (DTYPES, EPS, LR, MANY, MASKING_THRESHOLD, Case, bytes_per_element,
                         make_params, naive_classp_step)

HERE = Path(__file__).resolve().parent
BASELINE = "adagrad/compiled"  # kernel-time reference: Inductor's Adagrad, 20 B per fp32 element
COMPILED = ("adagrad/compiled", "classp/naive+compile")  # each compiles in the group's set-up
PEERS = ("adam/fused", "adagrad/foreach", "adagrad/compiled")
OPTIONS = ("", "mas-explicit", "mas-proximal", "relative", "state-bf16", "state-8bit")


def classp(impls, size, tensors, dtype="fp32", power=1.0, threshold=0.0,
           option="") -> list[Case]:
    return [Case(impl, size, tensors, dtype, power, threshold, option) for impl in impls]


def peers(impls, size, tensors, dtype="fp32") -> list[Case]:
    return [Case(impl, size, tensors, dtype) for impl in impls]


def group(kind: str, n: int, backends: list[str]) -> list[Case]:
    """The cases of one group: ``kind`` "one" (``n`` elements in one tensor, every peer),
    "many" (``n`` in ``MANY`` tensors, every peer), "largest" (one tensor, the fused kernels,
    fused Adam and the compiled Adagrad), "bf16" (one bf16 tensor), "powers" (one tensor:
    power 2, power 0.5 and the masking threshold, against the compiled Adagrad) or "options"
    (one tensor: the plain step, an attached MAS penalty explicit and proximal, the relative
    threshold, bf16 and 8-bit state, against the compiled Adagrad)."""
    fused = [f"classp/{name}" for name in backends]
    if kind == "one":
        return classp(fused + ["classp/naive+compile"], n, 1) + peers(PEERS, n, 1)
    if kind == "many":
        return classp(fused, n, MANY) + peers(PEERS, n, MANY)
    if kind == "largest":
        return classp(fused, n, 1) + peers(("adam/fused", BASELINE), n, 1)
    if kind == "bf16":
        return classp(fused, n, 1, "bf16") + peers(("adam/fused", BASELINE), n, 1, "bf16")
    if kind == "powers":
        return (classp(fused, n, 1, power=2.0) + classp(fused, n, 1, power=0.5)
                + classp(fused, n, 1, threshold=MASKING_THRESHOLD) + peers((BASELINE,), n, 1))
    if kind == "options":
        return [case for option in OPTIONS for case in classp(fused, n, 1, option=option)] + \
            peers((BASELINE,), n, 1)
    raise ValueError(f"unknown group kind {kind!r}")


def plan(backends: list[str], groups: list[tuple[str, int]]) -> list[list[Case]]:
    """The cases of ``groups`` ((kind, size) pairs, see ``group``) for the CLASSP ``backends``."""
    return [group(kind, n, backends) for kind, n in groups]


# Most important first: groups not started within the suite's time budget are skipped. Sized
# for the H200 (benchmarks/gpu_check.sh): about three minutes, compiles included.
GPU_GROUPS = [("one", 10**8), ("largest", 10**9), ("many", 10**8), ("options", 10**8),
              ("powers", 10**8), ("bf16", 10**8), ("many", 10**7), ("one", 10**6)]


def memory_bytes(case: Case) -> int:
    """Device memory the case holds: params, grads, state and the temporaries of unfused steps."""
    param = DTYPES[case.dtype].itemsize
    penalty = 2 * param if case.option.startswith("mas-") else 0  # importance and anchor
    state = (bytes_per_element(case) - penalty - 3 * param) // 2
    temporaries = {"adagrad/foreach": 2 * param}.get(case.impl, 0)
    return case.size * (2 * param + state + penalty + temporaries)


def make_step(case: Case, params, device: torch.device) -> Callable[[], object]:
    """A zero-argument callable performing one step of the case's implementation."""
    family, variant = case.impl.split("/")
    if case.impl == "classp/naive+compile":
        grads = [p.grad for p in params]
        accs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        compiled = torch.compile(naive_classp_step, dynamic=False)
        return lambda: compiled(params, grads, accs, case.threshold, case.power)
    if family == "classp":
        optimizer = CLASSP(params, lr=LR, threshold=case.threshold, eps=EPS, power=case.power,
                           backend=variant, relative_threshold=0.5 * (case.option == "relative"),
                           state_dtype={"state-bf16": "bf16", "state-8bit": "8bit"}.get(
                               case.option, "fp32"))
        if case.option.startswith("mas-"):
            attach_penalty(optimizer, params, case.option.split("-")[1])
        return optimizer.step
    if case.impl == "adam/fused":
        return torch.optim.Adam(params, lr=LR, fused=True,
                                capturable=device.type == "cuda").step
    optimizer = torch.optim.Adagrad(params, lr=LR, foreach=True)
    if variant == "compiled":
        return torch.compile(optimizer.step)
    return optimizer.step


def attach_penalty(optimizer: CLASSP, params, form: str) -> MAS:
    """Attach to ``optimizer`` a MAS penalty in ``form`` over ``params``, with a made state (an
    importance in [0, 1) and an anchor near each param), so that every step takes it."""
    model = torch.nn.ParameterList(params)
    generator = torch.Generator(params[0].device).manual_seed(1)
    named = list(model.named_parameters())
    mas = MAS(model, lam=1.0, penalty=form)
    mas.load_state_dict({
        "method": "MAS", "tasks_seen": 1,
        "importance": {n: torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                       for n, p in named},
        "anchor": {n: p.detach() + 0.01 * torch.randn(p.shape, generator=generator,
                                                      device=p.device, dtype=p.dtype)
                   for n, p in named},
        "residual": {}})
    mas.attach(optimizer)
    return mas


def synchronize(device: torch.device) -> None:
    bandwidth.synchronize(device)


class Clock:
    """Elapsed time of ``repeats`` calls: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def per_call(self, fn, repeats: int) -> float:
        synchronize(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / repeats
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - began) / repeats


def capture(step, device: torch.device) -> Callable[[], None]:
    """``step`` captured into a CUDA graph (after warm-up steps on a side stream): its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def kernel_seconds(step, device: torch.device, repeats: int = 5) -> Optional[float]:
    """Device time of the kernels and copies of one ``step()`` (profiler), or None on a CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        synchronize(device)
    device_events = [e for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in device_events) / 1e6 / repeats


def host_seconds(step, device: torch.device, repeats: int = 10) -> float:
    """Median host time of one ``step()`` call on an idle device (no wait for its kernels)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    synchronize(device)
    return statistics.median(times)


@dataclass
class Contender:
    """A case being measured: its step, its graph replay and the figures of each round."""

    case: Case
    step: Callable
    first_call_s: float
    replay: Optional[Callable] = None
    graph_error: Optional[str] = None
    figures: dict = field(default_factory=lambda: {"kernel_s": [], "eager_s": [],
                                                   "graph_s": [], "host_s": []})


def prepare(case: Case, device: torch.device) -> Contender:
    """Parameters, the step (first call timed: compile, tune, tables) and its graph."""
    params = make_params(case, device)
    step = make_step(case, params, device)
    began = time.perf_counter()
    step()
    synchronize(device)
    contender = Contender(case, step, time.perf_counter() - began)
    step()
    if device.type == "cuda":
        try:
            contender.replay = capture(step, device)
            contender.replay()
            synchronize(device)
        except Exception as error:  # noqa: BLE001  (recorded: the report says why)
            contender.graph_error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            torch.cuda.synchronize(device)
    return contender


def measure_group(cases: list[Case], device: torch.device, rounds: int,
                  round_budget_s: float) -> list[dict]:
    """Measure a group's cases in ``rounds`` interleaved rounds, then their kernel time (one
    profiler session each: sessions cost far more than a step); one result per case."""
    torch._dynamo.reset()  # a group's compiles start from a clean cache: no recompile limit hit
    contenders = []
    for case in cases:
        try:
            contenders.append(prepare(case, device))
        except Exception as error:  # noqa: BLE001  (recorded: the report says why)
            contenders.append(Contender(case, None, 0.0,
                                        graph_error=f"{type(error).__name__}: {error}"[:200]))
    clock = Clock(device)
    for _ in range(rounds):
        for c in contenders:
            if c.step is None:
                continue
            estimate = clock.per_call(c.step, 1)
            repeats = max(3, min(50, int(round_budget_s / max(estimate, 1e-6))))
            c.figures["eager_s"].append(clock.per_call(c.step, repeats))
            if c.replay is not None:
                c.figures["graph_s"].append(clock.per_call(c.replay, repeats))
            c.figures["host_s"].append(host_seconds(c.step, device))
    for c in contenders:
        kernel = kernel_seconds(c.step, device) if c.step is not None else None
        if kernel is not None:
            c.figures["kernel_s"].append(kernel)
    results = []
    for c in contenders:
        result = {**asdict(c.case), "bytes_per_element": bytes_per_element(c.case),
                  "first_call_s": c.first_call_s, "graph_error": c.graph_error,
                  "error": None if c.step is not None else c.graph_error}
        for name, values in c.figures.items():
            result[name] = statistics.median(values) if values else None
            result[f"{name}_rounds"] = values
        results.append(result)
    return results


def fits(cases: list[Case], device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(memory_bytes(case) for case in cases) < 0.8 * free


def run(device: str | torch.device = "cuda", groups: Optional[list[list[Case]]] = None,
        rounds: int = 5, round_budget_s: float = 0.02, budget_s: float = 240.0,
        probe_bytes: Optional[int] = None, output: Optional[Path] = None) -> dict:
    """Run the suite; returns the JSON-ready results (machine, bandwidth, one row per case),
    also written to ``output`` after every group (a run cut short keeps what it measured)."""
    device = torch.device(device)
    started = time.perf_counter()
    if groups is None:
        backends = [name for name in ("cuda", "triton") if name in available_backends(device)]
        groups = plan(backends, GPU_GROUPS)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else "CPU (suite smoke run)")
    results = {"device": {"type": device.type, "name": name, "torch": torch.__version__,
                          "cuda": torch.version.cuda},
               "datetime": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "bandwidth": bandwidth.measure(device, probe_bytes), "rows": [], "skipped": [],
               "wall_s": 0.0}
    for index, cases in enumerate(groups):
        if time.perf_counter() - started > budget_s:
            results["skipped"] += [str(case) for group in groups[index:] for case in group]
            break
        if fits(cases, device):
            results["rows"] += measure_group(cases, device, rounds, round_budget_s)
        else:
            results["skipped"] += [f"{case} (memory)" for case in cases]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["wall_s"] = time.perf_counter() - started
        if output is not None:
            output.write_text(json.dumps(results, indent=1))
    if output is not None:
        output.write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --device cuda",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="groups not started by then are skipped (and listed)")
    parser.add_argument("--output", type=Path, default=HERE / "gpu_step_cuda.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the GPU suite needs a CUDA device; this torch sees none", file=sys.stderr)
        return 2
    results = run("cuda", budget_s=args.budget_s, output=args.output)
    print(f"wrote {args.output} ({len(results['rows'])} cases, "
          f"{results['wall_s'] / 60:.1f} min)")
    return 0
