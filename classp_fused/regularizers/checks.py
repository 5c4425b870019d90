"""Checks shared by the regularizers: constructor arguments and the values of state."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_choice(name: str, value, choices: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """Return ``value`` as a float; raise naming ``name`` unless it is finite and in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != math.inf else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def bad_values(t: Tensor, nonnegative: bool) -> str | None:
    """None when the local tensor ``t`` is finite (and >= 0 when ``nonnegative``), else how
    many elements are NaN, infinite or negative."""
    finite = torch.isfinite(t)
    ok = finite & (t >= 0) if nonnegative else finite
    if bool(ok.all()):
        return None
    counts = [(int(torch.isnan(t).sum()), "NaN"), (int((~finite & ~torch.isnan(t)).sum()), "inf")]
    if nonnegative:
        counts.append((int((t < 0).sum()), "negative"))
    return ", ".join(f"{n} {kind}" for n, kind in counts if n) + " element(s)"
