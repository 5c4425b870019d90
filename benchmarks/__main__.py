"""One command for the step benchmarks: ``.venv/bin/python -m benchmarks [--device cpu|cuda]``.

On the CPU (2 threads) it runs benchmarks/bench_step.py under pytest-benchmark and saves
benchmarks/step_cpu.json (statistics, without the per-round timings); other arguments go to
pytest (e.g. ``-k 1e+05`` for a quick partial run). On CUDA (the default where available) it
runs the GPU suite, benchmarks/gpu.py, and saves benchmarks/gpu_step_cuda.json; other
arguments go to that suite (``--budget-s``). Either way it then rewrites benchmarks/RESULTS.md
and the plots from the JSON files present.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from . import gpu, report

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    args, pytest_args = parser.parse_known_args(argv)
    start = time.perf_counter()
    if args.device == "cuda":
        code = gpu.main(pytest_args)
        if code == 0:
            report.write(sorted(HERE.glob("step_*.json")))
        return code
    json_path = HERE / "step_cpu.json"
    code = pytest.main([str(HERE / "bench_step.py"), f"--bench-device={args.device}",
                        f"--benchmark-json={json_path}", "--benchmark-disable-gc",
                        "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name",
                        "-p", "no:cacheprovider", "-q", *pytest_args])
    if code != pytest.ExitCode.OK:
        return int(code)
    data = json.loads(json_path.read_text())
    for bench in data["benchmarks"]:  # keep the statistics, drop the per-round timings
        bench["stats"].pop("data", None)
    json_path.write_text(json.dumps(data, indent=1))
    report.write(sorted(HERE.glob("step_*.json")))
    print(f"wrote {HERE / 'RESULTS.md'} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
