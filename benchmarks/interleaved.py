"""Interleaved timing for pytest-benchmark: every round times each candidate once, in turn, so
a machine's changing load falls on all of them alike, and ratios are taken per round."""
from __future__ import annotations

import statistics
import time

import torch


def time_interleaved(benchmark, candidates: dict, peer: str, threads: int, rounds: int) -> None:
    """Time every candidate once per round, in turn, ``rounds`` rounds on ``threads`` threads;
    record per candidate its median and min time, the median (min, max) over rounds of its ratio to
    ``peer`` and the ratio of the min times.

    With 2 threads the clock is wall time. With 1 thread it is the calling thread's CPU time,
    which a loaded machine does not inflate by descheduling it (memory stalls still count), so
    its min times make the steadiest ratios on a shared machine."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    times = {candidate: [] for candidate in candidates}

    def one_round():
        for candidate, fn in candidates.items():
            start = clock()
            fn()
            times[candidate].append(clock() - start)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one_round()  # warm-up, not counted
        for samples in times.values():
            samples.clear()
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    finally:
        torch.set_num_threads(saved_threads)
    print(f"\n{benchmark.group}, {'CPU' if threads == 1 else 'wall'} time: median and min time; "
          f"median / min / max over rounds of the ratio to {peer}; ratio of the min times (the "
          f"least disturbed runs)")
    width = max(map(len, times))
    for candidate, samples in times.items():
        ratios = [t / p for t, p in zip(samples, times[peer])]
        median_ratio = statistics.median(ratios)
        min_ratio = min(samples) / min(times[peer])
        benchmark.extra_info[f"{candidate} median ms"] = statistics.median(samples) * 1e3
        benchmark.extra_info[f"{candidate} min ms"] = min(samples) * 1e3
        benchmark.extra_info[f"{candidate} / {peer}"] = median_ratio
        benchmark.extra_info[f"{candidate} / {peer}, min times"] = min_ratio
        print(f"  {candidate:{width}s} {statistics.median(samples) * 1e3:8.2f} ms "
              f"{min(samples) * 1e3:8.2f} ms   {median_ratio:5.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})   {min_ratio:5.2f}x")
