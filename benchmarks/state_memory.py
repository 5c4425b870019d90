"""Peak memory of one CLASSP training step on a large model, by accumulator format.

One ``nn.Linear(in, out, bias=False)`` of ``--params`` fp32 parameters (a square-ish weight)
takes a forward and backward pass on a batch of one and a CLASSP step (cpp backend, every
element updated, so every accumulator element is written) with ``--state-dtype``; the
process's peak resident memory (``ru_maxrss``) and the optimizer's ``state_bytes()`` are
printed as one JSON line. Run each format in its own process:

    python -m benchmarks.state_memory --params 1.5e9 --state-dtype fp32
    python -m benchmarks.state_memory --params 1.5e9 --state-dtype 8bit
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch
from torch import nn

from classp_fused import CLASSP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, required=True)
    parser.add_argument("--state-dtype", choices=("fp32", "bf16", "8bit"), required=True)
    args = parser.parse_args()
    rows = int(math.isqrt(int(args.params)))
    cols = int(args.params) // rows
    model = nn.Linear(cols, rows, bias=False)
    opt = CLASSP(model.parameters(), lr=1e-3, backend="cpp", state_dtype=args.state_dtype)
    x = torch.randn(1, cols)
    start = time.perf_counter()
    model(x).square().sum().backward()
    opt.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    numel = rows * cols
    print(json.dumps({"params": numel, "state_dtype": args.state_dtype,
                      "state_bytes": opt.state_bytes(), "peak_rss_bytes": peak,
                      "peak_gib": round(peak / 2 ** 30, 2),
                      "bytes_per_param": round(peak / numel, 2),
                      "step_seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
