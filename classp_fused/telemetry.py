"""Update-density telemetry of the CLASSP optimizer: what the last step updated and where it ran."""
from __future__ import annotations

import torch
from torch import Tensor


class StepTelemetry:
    """The kernels' per-tensor counts of the last step and the running non-finite total.

    Counts stay on their device until read, so recording a step never synchronizes. Entries live
    in a dict, not in attributes: torch.compile drops attribute stores on optimizers and guards
    on a list's length.
    """

    def __init__(self, device: torch.device) -> None:
        # "last": one (counts, numels, backend) per stepped group of the last step; the total
        # is made on the params' device here, not in a step (which may be captured in a graph)
        self._entries: dict = {"last": [],
                               "nonfinite": torch.zeros((), dtype=torch.int64, device=device)}

    def record(self, steps: list[tuple[Tensor, list[int], str]]) -> None:
        """Keep one step's ``(counts, numels, backend)`` per stepped group; add its skips."""
        self._entries["last"] = steps
        for counts, _, _ in steps:
            skipped = counts[:, 1].sum()
            total = self._entries["nonfinite"]
            if total.device != skipped.device:  # the params moved: follow them
                total = self._entries["nonfinite"] = total.to(skipped.device)
            total.add_(skipped)

    @property
    def update_fraction(self) -> float:
        """Fraction of the stepped elements updated by the last step (syncs)."""
        last = self._entries["last"]
        updated = sum(int(counts[:, 0].sum()) for counts, _, _ in last)
        total = sum(sum(numels) for _, numels, _ in last)
        return updated / total if total else 0.0

    @property
    def group_counts(self) -> list[Tensor]:
        """Per stepped group, the last step's ``(n, 2)`` counts."""
        return [counts for counts, _, _ in self._entries["last"]]

    @property
    def backends(self) -> list[str]:
        """The backends that ran the last step's groups, without repeats, in order."""
        return list(dict.fromkeys(backend for _, _, backend in self._entries["last"]))

    @property
    def nonfinite_skipped(self) -> int:
        """Non-finite gradient elements skipped since creation (syncs)."""
        return int(self._entries["nonfinite"])
