"""Memory-bandwidth probe: STREAM-style kernels on tensors much larger than the caches.

Bytes are counted as read plus written, as STREAM does: copy ``a = b`` 8 per fp32 element,
triad ``a = b + s*c`` 12, and the in-place update ``a += s*b`` 12. Copy and triad also move
write-allocate traffic that this count leaves out, so an in-place kernel (an optimizer step
reads every tensor it writes) can exceed them; the in-place update is the figure an optimizer
step is compared with.
"""
from __future__ import annotations

import statistics
import time

import torch

GIB = 1 << 30


def default_array_bytes(device: torch.device) -> int:
    """Bytes per probe array: 1 GiB on CPU (beyond any L3), up to 2 GiB on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(2 * GIB, free // 5))
    return GIB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """Wall time of one ``fn()`` call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(device: str | torch.device = "cpu", array_bytes: int | None = None,
            repeats: int = 10) -> dict:
    """Copy, triad and in-place update bandwidth in GB/s (1e9 bytes/s): best and median of
    ``repeats``. The kernels alternate so that a drift in the machine's bandwidth shows in all.
    """
    device = torch.device(device)
    array_bytes = array_bytes or default_array_bytes(device)
    n = array_bytes // 4
    a, b, c = (torch.ones(n, device=device) for _ in range(3))
    kernels = {"copy": (lambda: a.copy_(b), 2 * 4 * n),
               "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * 4 * n),
               "update": (lambda: a.add_(b, alpha=1e-9), 3 * 4 * n)}
    rates = {name: [] for name in kernels}
    for fn, _ in kernels.values():
        seconds(fn, device)
    for _ in range(repeats):
        for name, (fn, nbytes) in kernels.items():
            rates[name].append(nbytes / seconds(fn, device) / 1e9)
    del a, b, c
    result = {"device": str(device), "array_mb": 4 * n / 1e6, "repeats": repeats,
              "threads": torch.get_num_threads() if device.type == "cpu" else None}
    for name, values in rates.items():
        result[f"{name}_gbs_best"] = max(values)
        result[f"{name}_gbs_median"] = statistics.median(values)
    return result


if __name__ == "__main__":
    torch.set_num_threads(2)
    for key, value in measure("cuda" if torch.cuda.is_available() else "cpu").items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
