"""Update-density telemetry of the CLASSP optimizer: what the last step updated and where it ran."""
from __future__ import annotations

import torch
from torch import Tensor


# Eager CPU steps whose counts wait to be added to the non-finite total: one sum per this many
# groups' counts instead of a few tensor ops per step (host time).
PENDING_COUNTS = 64


class StepTelemetry:
    """The kernels' per-tensor counts of the last step and the running non-finite total.

    Counts stay on their device until read, so recording a step never synchronizes. The counts
    of eager CPU steps are added to the total in batches (``PENDING_COUNTS``), and before it is
    read; a step on an accelerator (which may be captured in a graph) or being compiled adds its
    own at once. Entries live in a dict, not in attributes: torch.compile drops attribute stores
    on optimizers and guards on a list's length.
    """

    def __init__(self, device: torch.device) -> None:
        # "last": one (counts, numels, backend) per stepped group of the last step; "pending":
        # CPU counts not yet in the total; the total is made on the params' device here, not in
        # a step (which may be captured in a graph)
        self._entries: dict = {"last": [], "pending": [],
                               "nonfinite": torch.zeros((), dtype=torch.int64, device=device)}

    def record(self, steps: list[tuple[Tensor, list[int], str]]) -> None:
        """Keep one step's ``(counts, numels, backend)`` per stepped group; add its skips."""
        self._entries["last"] = steps
        if torch.compiler.is_compiling():
            for counts, _, _ in steps:
                self._add(counts[:, 1].sum())
            return
        pending = self._entries["pending"]
        for counts, _, _ in steps:
            if counts.is_cpu:
                pending.append(counts)
            else:
                self._add(counts[:, 1].sum())
        if len(pending) >= PENDING_COUNTS:
            self._add_pending()

    def _add(self, skipped: Tensor) -> None:
        """Add ``skipped`` (a 0-dim count) to the total, which follows it to its device."""
        total = self._entries["nonfinite"]
        if total.device != skipped.device:  # the params moved: follow them
            total = self._entries["nonfinite"] = total.to(skipped.device)
        total.add_(skipped)

    def _add_pending(self) -> None:
        """Add the pending CPU counts to the total."""
        pending = self._entries["pending"]
        if pending:
            self._add(torch.cat(pending)[:, 1].sum())
            pending.clear()

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
        self._add_pending()
        return int(self._entries["nonfinite"])
