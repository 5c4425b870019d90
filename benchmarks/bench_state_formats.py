"""The CLASSP step with compressed accumulators (pytest-benchmark): float32 state against
bfloat16 and 8-bit state (classp_fused.state_formats).

    pytest benchmarks/bench_state_formats.py --bench-device cpu -q -s \
        --benchmark-columns=min,median,max,rounds

Backend ``cpp`` on the CPU, float32 params, power 1, threshold 0 (every element updates: every
accumulator is rounded back, every 8-bit block encoded again), 1e7 elements in one tensor,
through the op entry point (``classp_fused.backends.classp_step_``). Candidates, by state:

- ``fp32``: 20 B/element (read param, grad, accumulator; write param, accumulator)
- ``bf16``: 16 B/element, plus the random bits of each element
- ``8bit``: 14 B/element and a scale per 256 elements, plus decoding, the block maximum, the
  random bits and encoding

The machine is shared: single timings swing with the load. ``test_interleaved_ratios`` times
every candidate once per round, in turn (with 2 threads in wall time, and with 1 thread in the
stepping thread's CPU time), and records in its ``extra_info`` (and prints, with ``-s``) the
median over rounds of each one's per-round ratio to ``fp32`` and the ratio of the min times
(on a loaded machine, the runs least disturbed): compare those, not timings taken in different
benchmarks.
"""

import pytest
import torch

from classp_fused import state_formats
from classp_fused.backends import classp_step_
from classp_fused.backends.step_spec import CompressedState

from interleaved import time_interleaved

NUMEL = 10 ** 7
CANDIDATES = ("fp32", "bf16", "8bit")
ROUNDS = 40
HYPER = dict(lr=1e-3, threshold=0.0, eps=1e-5, power=1.0, apply_scaling=True, backend="cpp")


def steps(device) -> dict:
    """One callable per candidate, each stepping its own param (the same values) and its own
    accumulator (the same values, rounded into its format) with the same gradient."""
    g = torch.Generator().manual_seed(0)
    param = torch.randn(NUMEL, generator=g)
    grad = 0.1 * torch.randn(NUMEL, generator=g)
    values = torch.rand(NUMEL, generator=g) * 0.01
    random_bits = state_formats.element_bits(torch.tensor(1), torch.arange(NUMEL))
    keys = torch.tensor([7])  # the kernel's cost does not depend on the key
    states = {"fp32": (values, None),
              "bf16": (state_formats.round_bf16(values, random_bits), None),
              "8bit": state_formats.encode_blocks(values, random_bits)}
    candidates = {}
    for name, (acc, scales) in states.items():
        compressed = None if name == "fp32" else CompressedState([scales], keys, [0])
        params, grads, accs = [param.clone().to(device)], [grad.to(device)], [acc.to(device)]
        candidates[name] = (lambda p=params, g=grads, a=accs, c=compressed:
                            classp_step_(p, g, a, compressed=c, **HYPER))
    return candidates


@pytest.fixture(scope="module")
def candidates(device):
    if device.type != "cpu":
        pytest.skip("compressed state is benchmarked on the CPU kernel")
    return steps(device)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_step(benchmark, candidates, candidate):
    benchmark.group = "state-formats-1x1e7"
    benchmark.extra_info.update(state=candidate, numel=NUMEL)
    benchmark(candidates[candidate])


@pytest.mark.parametrize("threads", [2, 1])
def test_interleaved_ratios(benchmark, candidates, threads):
    """Each round times every candidate once, in turn; the ratios to ``fp32`` are per round
    (``time_interleaved``)."""
    benchmark.group = f"state-formats-1x1e7-interleaved-{threads}-threads"
    time_interleaved(benchmark, {c: candidates[c] for c in CANDIDATES}, "fp32", threads, ROUNDS)
