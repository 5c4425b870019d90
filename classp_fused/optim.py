"""CLASSP as a ``torch.optim.Optimizer``: param groups, fp32 state, AMP scaling, telemetry."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backends import check_hyperparameters, check_param, resolve_backend, run_backend
from .reference import classp_legacy_step_, compute_dtype

MODES = ("paper", "legacy")
NONFINITE_POLICIES = ("skip", "raise")


class CLASSP(Optimizer):
    r"""CLASSP (Ludwig 2024): AdaGrad-like decay plus a per-element gradient threshold.

    Per element, an update happens only where the gradient is finite and ``g*g > threshold``;
    there ``A += |g|**power`` and ``param -= lr * g / (eps + A)**(1/power)`` (or ``lr * g``
    when ``apply_scaling`` is False). Elsewhere the parameter and ``A`` stay bit-identical.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate, a float or a 0-dim tensor (schedulers work with both).
        threshold: squared-gradient threshold. Default 0.0: every finite non-zero gradient
            element updates. The published default 0.5 was meant for a per-tensor gate; under
            the per-element rule it blocks nearly every element of a typical network (|g| > 0.71),
            so the sparsity level is a choice to make per model (e.g. 1e-6 to 1e-3).
        eps: added to the accumulator inside the root (published default 1e-5).
        power: ``p > 0`` of the accumulated ``|g|**p`` and of the root; 1 (published default)
            and 2 (AdaGrad) have exact fast paths.
        apply_scaling: divide by the accumulated root (True, published default) or take plain
            thresholded SGD steps while still accumulating.
        mode: ``"paper"`` (the equation, per element) or ``"legacy"`` (the published code's
            per-tensor gate and L1 accumulator; ``backend="torch"`` only).
        backend: ``"auto"`` (the fastest kernel for the params' device; see
            :func:`classp_fused.available_backends`), ``"torch"``, ``"foreach"``, ``"cpp"``,
            ``"cuda"`` or ``"triton"``. The choice is in ``optimizer.backend``.
        nonfinite: ``"skip"`` never applies NaN/Inf gradient elements and counts them
            (``nonfinite_skipped``); ``"raise"`` raises before changing anything.

    State per parameter: ``"accumulator"`` (fp32, fp64 for fp64 params, param-shaped) and
    ``"step"`` (0-dim fp32). Accumulators stay fp32 for fp16/bf16 params, also after
    ``load_state_dict``. With ``torch.amp.GradScaler`` gradients are unscaled inside the
    kernel and a step with ``found_inf`` is a no-op.

    Under FSDP2 (``fully_shard``) parameters, gradients and accumulators are DTensors; the
    step runs on their local shards, and the counts (``last_update_fraction``,
    ``nonfinite_skipped``) are this rank's. Under ``torch.compile`` the per-step input
    validation is skipped; give ``lr`` as a tensor so that a scheduler changing it causes no
    recompilation.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr, threshold: float = 0.0, eps: float = 1e-5, power: float = 1.0,
                 apply_scaling: bool = True, mode: str = "paper", backend: str = "auto",
                 nonfinite: str = "skip"):
        check_hyperparameters(lr, threshold, eps, power)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        defaults = dict(lr=lr, threshold=threshold, eps=eps, power=power,
                        apply_scaling=apply_scaling)
        super().__init__(params, defaults)
        self.mode = mode
        self.nonfinite = nonfinite
        self.backend = resolve_backend(backend, self._device())
        if mode == "legacy" and self.backend != "torch":
            raise ValueError(f"mode='legacy' runs on backend='torch' only, got backend={backend!r}")
        # (counts, numels) per stepped group of the last step. A dict entry, not an attribute:
        # torch.compile drops attribute stores on optimizers and guards on a list's length.
        self._telemetry: dict[str, list[tuple[Tensor, list[int]]]] = {"last_counts": []}
        self._nonfinite_total = self._zero_count()

    def _device(self) -> torch.device:
        """The device of the first parameter (ZeroRedundancyOptimizer may leave a rank none)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return params[0].device if params else torch.device("cpu")

    def _zero_count(self) -> Tensor:
        return torch.zeros((), dtype=torch.int64, device=self._device())

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "mode": self.mode, "nonfinite": self.nonfinite,
                "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._telemetry = {"last_counts": []}
        self._nonfinite_total = self._zero_count()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group["lr"], group["threshold"], group["eps"], group["power"])
        for i, p in enumerate(group["params"]):
            check_param(_local(p), f"params[{i}] of param group {len(self.param_groups) - 1}")

    def _init_group(self, group: dict, params: list, grads: list, accs: list,
                    steps: list) -> None:
        """Append the group's stepped tensors (local shards of DTensors) to the lists.

        State is created here on first use; the lists are filled in place, the form
        torch.compile traces without running the state initialization in the graph. Params
        were validated when their group was added, and torch checks a grad's dtype, shape and
        device on assignment, so only the layout is left to check per step.
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("CLASSP does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["accumulator"] = torch.zeros_like(
                    p, dtype=compute_dtype(p), memory_format=torch.contiguous_format)
            params.append(_local(p))
            grads.append(_local(p.grad))
            accs.append(_local(state["accumulator"]))
            steps.append(state["step"])

    def _advance_steps(self, group: dict, steps: list, increment) -> None:
        """Add ``increment`` to the step counters of the group's stepped params.

        A per-tensor add costs over 1 us on the CPU, more than the kernel for small tensors,
        so a group's counters are kept as views of one buffer and advanced by a single add;
        the buffer is rebuilt when the set of stepped params changes.
        """
        if torch.compiler.is_compiling() or any(t.device != steps[0].device for t in steps):
            torch._foreach_add_(steps, increment)
            return
        base = steps[0]._base
        if base is None or base.numel() != len(steps) or any(t._base is not base for t in steps):
            base = torch.stack(steps)
            stepped = [p for p in group["params"] if p.grad is not None]
            for p, view in zip(stepped, base.unbind()):
                self.state[p]["step"] = view
        base.add_(increment)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        groups = []
        for group in self.param_groups:
            params, grads, accs, steps = [], [], [], []
            self._init_group(group, params, grads, accs, steps)
            groups.append((group, params, grads, accs, steps))
        if self.nonfinite == "raise":
            self._raise_on_nonfinite(groups, grad_scale)

        last_counts = []
        for group, params, grads, accs, steps in groups:
            if not params:
                continue
            hyper = dict(lr=group["lr"], threshold=group["threshold"], eps=group["eps"],
                         power=group["power"], apply_scaling=group["apply_scaling"],
                         grad_scale=grad_scale, found_inf=found_inf)
            if self.mode == "legacy":
                counts = classp_legacy_step_(params, grads, accs, **hyper)
            else:
                if not torch.compiler.is_compiling():
                    check_hyperparameters(hyper["lr"], hyper["threshold"], hyper["eps"],
                                          hyper["power"])
                counts = run_backend(self.backend, params, grads, accs, **hyper)
            self._advance_steps(group, steps, 1.0 if found_inf is None else
                                1.0 - found_inf.to(params[0].device, torch.float32))
            last_counts.append((counts, [p.numel() for p in params]))
            self._nonfinite_total.add_(counts[:, 1].sum().to(self._nonfinite_total.device))
        self._telemetry["last_counts"] = last_counts
        return loss

    @staticmethod
    def _raise_on_nonfinite(groups, grad_scale) -> None:
        for index, (_, _, grads, _, _) in enumerate(groups):
            for i, g in enumerate(grads):
                scaled = g if grad_scale is None else g.float() / grad_scale.to(g.device)
                if not bool(torch.isfinite(scaled).all()):
                    raise FloatingPointError(
                        f"non-finite gradient in param group {index}, param {i} "
                        f"(shape {tuple(g.shape)}); nothing was updated (nonfinite='raise')")

    @property
    def last_update_fraction(self) -> float:
        """Fraction of the stepped parameters' elements updated by the last step (syncs)."""
        last_counts = self._telemetry["last_counts"]
        updated = sum(int(counts[:, 0].sum()) for counts, _ in last_counts)
        total = sum(sum(numels) for _, numels in last_counts)
        return updated / total if total else 0.0

    @property
    def last_step_counts(self) -> list[Tensor]:
        """Per param group, the last step's ``(n, 2)`` counts: elements updated, non-finite skipped."""
        return [counts for counts, _ in self._telemetry["last_counts"]]

    @property
    def nonfinite_skipped(self) -> int:
        """Non-finite gradient elements skipped since construction (syncs)."""
        return int(self._nonfinite_total)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (accumulators and step counters)."""
        return sum(t.numel() * t.element_size() for state in self.state.values()
                   for t in state.values() if isinstance(t, Tensor))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state; accumulators keep their fp32 (fp64) dtype instead of the param's."""
        saved = {key: dict(value) for key, value in state_dict["state"].items()}
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            state = self.state[p]
            # copies: the loaded state never aliases the tensors of the state_dict it came from
            state["accumulator"] = saved[pid]["accumulator"].to(
                device=p.device, dtype=compute_dtype(p), memory_format=torch.contiguous_format,
                copy=True)
            state["step"] = saved[pid]["step"].to(device=p.device, dtype=torch.float32, copy=True)


def _local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard, any other tensor itself."""
    if type(t) in (Tensor, nn.Parameter):  # the common case, without importing DTensor
        return t
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return t
    return t.to_local() if isinstance(t, DTensor) else t
