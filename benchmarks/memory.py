"""Peak extra memory of one call on the CPU, from torch.profiler's allocation events."""
from __future__ import annotations

import torch
from torch._C._profiler import _EventType


def peak_extra_bytes(fn) -> int:
    """The most CPU memory allocated at any time during ``fn()`` above what was allocated before
    it, from torch.profiler's allocation and free events (bytes, not time: deterministic)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((node.start_time_ns, node.extra_fields.alloc_size)
                    for node in walk(prof.profiler.kineto_results.experimental_event_tree())
                    if node.tag == _EventType.Allocation)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak
