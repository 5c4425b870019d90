"""The CPU step's cost against its update density, interleaved, for RESULTS.md; optionally beside
a baseline build of the kernel (the extension before a change).

    .venv/bin/python -m benchmarks.density_curve [--baseline OTHER/_C.so] [--rounds 100]

Each build of the extension (this checkout's ``classp_fused/_C*.so``, and the ``--baseline``
library) runs in a worker process of its own, which loads it with ``torch.ops.load_library``,
builds the cases of benchmarks/density_cases.py (the same seeds in every worker: the same
data) and times one call at a time when asked: a step through the op, as the cpp backend calls
it, or the read-only floor. Each round asks every case of every build once, in turn (the builds
alternate which goes first), so a change in the machine's load reaches all of them; the ratios
are taken from the min over rounds (the least disturbed runs) and, per round, against the same
round's dense step. Workers take turns: one runs while the other waits. The curve is taken
twice (``--threads``): with 2 threads in wall time, and with 1 thread in the stepping thread's
CPU time, which other jobs on a shared machine do not inflate by descheduling it.

Saves benchmarks/density_cpu.json (every round's time, the machine's load) and rewrites
benchmarks/RESULTS.md (benchmarks/report.py; the section is benchmarks/density_report.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .density_cases import FLOOR, cases, op_step, read_floor, state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JSON_PATH = HERE / "density_cpu.json"


def worker(library: str) -> None:
    """Serve timings over stdin/stdout: builds the cases, answers ``ready``, then for each line
    ``THREADS NAME`` runs that call once on THREADS threads and answers its time in seconds
    (CPU time of the calling thread with one thread, else wall time)."""
    torch.ops.load_library(library)
    calls = {}
    for seed, case in enumerate(cases()):
        tensors = state(case, seed)
        counts = op_step(*tensors)
        if int(counts[0, 0]) != case.selected:
            raise RuntimeError(f"{library}: {case} updated {int(counts[0, 0])} elements, "
                               f"expected {case.selected}")
        calls[str(case)] = lambda t=tensors: op_step(*t)
        if case.density == 1.0:
            calls[FLOOR] = lambda t=tensors: read_floor(*t)
    print("ready", flush=True)
    for line in sys.stdin:
        threads, name = line.rstrip("\n").split(" ", 1)
        if torch.get_num_threads() != int(threads):
            torch.set_num_threads(int(threads))
        clock = time.thread_time if threads == "1" else time.perf_counter
        call = calls[name]
        start = clock()
        call()
        print(clock() - start, flush=True)


class Worker:
    """A worker process serving one build's timings."""

    def __init__(self, label: str, library: Path):
        self.label, self.library = label, library
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.density_curve", "--worker", str(library)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the worker of {self.label} ({self.library}) failed to start")

    def time(self, threads: int, name: str) -> float:
        self.process.stdin.write(f"{threads} {name}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def uptime() -> str:
    """``uptime``'s line: the time and the 1-, 5- and 15-minute load averages."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def current_library() -> Path:
    """This checkout's build of the extension."""
    found = sorted((ROOT / "classp_fused").glob("_C*.so"))
    if not found:
        raise FileNotFoundError("no classp_fused/_C*.so: build it with "
                                "`python setup.py build_ext --inplace`")
    return found[0]


def git_revision() -> str:
    """HEAD's short hash, marked ``+changes`` when csrc/ differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = git("status", "--porcelain", "--", "csrc").strip()
    return git("rev-parse", "--short", "HEAD").strip() + ("+changes" if dirty else "")


def run(builds: dict, thread_counts: list, rounds: int) -> dict:
    """Time every case of every build (label -> library) ``rounds`` times, interleaved, once
    per thread count."""
    names = [str(case) for case in cases()] + [FLOOR]
    loads = [os.getloadavg()[0]]
    start = {"uptime": uptime(), "time": time.time()}
    workers = [Worker(label, library) for label, library in builds.items()]
    runs = []
    try:
        for w in workers:
            w.wait_ready()
        for threads in thread_counts:
            samples = {w.label: {name: [] for name in names} for w in workers}
            for name in names:  # warm-up, not counted
                for w in workers:
                    w.time(threads, name)
            for r in range(rounds):
                order = workers if r % 2 == 0 else workers[::-1]
                for name in names:
                    for w in order:
                        samples[w.label][name].append(round(w.time(threads, name), 8))
                loads.append(os.getloadavg()[0])
            runs.append({"threads": threads,
                         "clock": "thread CPU time" if threads == 1 else "wall time",
                         "rounds": rounds,
                         "builds": [{"label": w.label, "library": str(w.library),
                                     "samples": samples[w.label]} for w in workers]})
    finally:
        for w in workers:
            w.close()
    return {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
            "wall_s": time.time() - start["time"],
            "load": {"start": start["uptime"], "end": uptime(), "one_minute": loads},
            "cases": [{"name": str(c), "density": c.density, "mask": c.mask,
                       "selected": c.selected} for c in cases()],
            "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.density_curve",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another build of the extension (.so)")
    parser.add_argument("--baseline-label", default=None,
                        help="its name in the table (default: the file's name)")
    parser.add_argument("--rounds", type=int, default=100, help="rounds per thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    builds = {}
    if args.baseline is not None:
        if not args.baseline.is_file():
            parser.error(f"--baseline: no file {args.baseline}")
        builds[f"before ({args.baseline_label or args.baseline.name})"] = args.baseline.resolve()
    builds[f"after ({git_revision()})" if builds else git_revision()] = current_library()
    result = run(builds, args.threads, args.rounds)
    args.json.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    from . import report  # matplotlib, only for the report
    report.write(sorted(HERE.glob("step_*.json")), density_json=args.json)
    print(f"wrote {args.json} and {HERE / 'RESULTS.md'} in {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
