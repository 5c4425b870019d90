"""CLASSP as a ``torch.optim.Optimizer``: param groups, state (fp32 or compressed), AMP scaling,
the step."""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import compressed_state, sharded_codes
from .compressed_state import COMPRESSED_ACC_DTYPES
from .backends import (BACKENDS, param_dtypes, resolve_backend, run_backend,
                       steps_compressed_state)
from .backends.step_spec import CompressedState, Penalty, StepSpec, step_spec
from .caller_warnings import warn_at_caller
from .group_plan import GroupPlan
from .loaded_state import grad_sq_mean, loaded_entry, step_counter
from .reference import classp_legacy_step_, compute_dtype, penalized_grad
from .state_formats import STATE_DTYPES, importance_values, tensor_key
from .telemetry import StepTelemetry
from .validation import (ADDED_HYPERPARAMETERS, EXPONENTS_KEY, FOREIGN_KEYS, HYPERPARAMETERS,
                         PARAM_DTYPES, check_amp_scalars, check_foreign_options, check_group,
                         check_group_keys, check_hyperparameters, check_penalty,
                         check_penalty_scale, check_state_dict, check_state_values,
                         check_stepped_group, foreign_keys, group_tensors, is_settled,
                         local_part)

MODES = ("paper", "legacy")
NONFINITE_POLICIES = ("skip", "raise")


class CLASSP(Optimizer):
    r"""CLASSP (Ludwig 2024): AdaGrad-like decay plus a per-element gradient threshold.

    Per element, an update happens only where the gradient is finite and ``g*g > threshold``;
    there ``A += |g|**power`` and ``param -= lr * g / (eps + A)**(1/power)`` (or ``lr * g``
    when ``apply_scaling`` is False). Elsewhere the parameter and ``A`` stay bit-identical.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate: a finite number >= 0 (numpy scalars too) or a one-element floating
            tensor of shape ``()``, ``(1,)`` or ``(1, 1)`` (schedulers work with all).
        threshold: squared-gradient threshold. Default 0.0: every finite gradient element
            whose square is non-zero in fp32 (|g| > 2**-75) updates. The published default 0.5
            was meant for a per-tensor gate; under the per-element rule it blocks nearly every
            element of a typical network (|g| > 0.71). An absolute threshold does not transfer
            between models; ``relative_threshold`` (0.5 measured best) asks for sparsity in a
            unitless way.
        relative_threshold: unitless sparsity, tau >= 0 (default 0: off). An element is also
            updated only where ``g*g > tau * S``, S the mean of ``g*g`` over the tensor's
            elements at its previous step (non-finite ones counted as 0): tau = 1 updates the
            elements whose squared gradient is above the tensor's recent average, whatever the
            gradients' scale. g is the gradient the threshold tests (unscaled, with an attached
            explicit penalty's gradient), so a GradScaler changes nothing. S starts at 0: the
            first step is gated by ``threshold`` alone. ``mode="paper"`` only.
        eps: added to the accumulator inside the root (published default 1e-5).
        power: ``p > 0`` of the accumulated ``|g|**p`` and of the root; 1 (published default)
            and 2 (AdaGrad) have exact fast paths.
        apply_scaling: divide by the accumulated root (True, published default) or take plain
            thresholded SGD steps while still accumulating.
        mode: ``"paper"`` (the equation, per element) or ``"legacy"`` (the published code's
            per-tensor gate and L1 accumulator; ``backend="torch"`` only).
        backend: ``"auto"`` (the fastest kernel for the params' device; see
            :func:`classp_fused.available_backends`), ``"torch"``, ``"foreach"``, ``"cpp"``,
            ``"cuda"`` or ``"triton"``. It is resolved per device at each step, so a model built
            on the meta device and materialized later (``to_empty``), or moved, gets the kernel
            of the device it is on; ``optimizer.backend`` says what ran.
        nonfinite: ``"skip"`` never applies NaN/Inf gradient elements and counts them
            (``nonfinite_skipped``); ``"raise"`` raises before changing anything.
        state_dtype: how accumulators are stored (``classp_fused.state_formats``): ``"fp32"``
            (default: exact, 4 bytes per element), ``"bf16"`` (2 bytes) or ``"8bit"`` (one
            uint8 code per element and one fp32 scale per block of 256 elements, about 1.02
            bytes). Float64 params and tensors of fewer than 4096 elements keep exact
            accumulators. A step decodes A, updates it and steps the param with the exact new
            value, then rounds the updated elements back stochastically (unbiased: rounds up
            with probability equal to the dropped fraction, so small increments are not lost on
            average; an 8-bit block with an updated element is encoded again whole, with a scale
            from its largest value). Every backend that steps compressed state gives the same
            bits, and the random bits are drawn per element from ``(state_seed, step, index)``,
            so a run resumed from ``state_dict`` continues bit for bit. ``mode="paper"`` only;
            ``auto`` picks a backend that steps compressed state.
        state_seed: an int in [0, 2**32) keying the stochastic rounding (default 0).
        **foreign_options: options of other torch optimizers that CLASSP does not have
            (``foreach``, ``fused``, ``capturable``, ``differentiable``, ``maximize``,
            ``weight_decay``, ...: the keys of ``classp_fused.validation.FOREIGN_KEYS``), as
            for param-group keys below: ignored with a warning when 0/False/None, ValueError
            naming the argument otherwise. Any other name raises TypeError.

    Param groups are checked when added and before every step (a group whose keys, params,
    state entries and accumulators are the objects its last step saw, by one C++ pass over
    their metadata); ``step``, ``add_param_group`` and ``load_state_dict`` check everything
    before changing anything, so an error leaves the optimizer as it was. Keys of other
    optimizers' groups that CLASSP has no use for (``weight_decay``, ``momentum``, ``betas``,
    ...; ``classp_fused.validation.FOREIGN_KEYS``) are ignored with a warning when set to
    0/False/None, as Hugging Face's Trainer writes ``weight_decay=0.0``; any other value raises,
    at construction, ``add_param_group``, ``load_state_dict`` or the next step when set later,
    since CLASSP would not do what it asks (weight decay, for one, would move every weight at
    every step, against sparse updates). A tensor ``lr`` must be on the CPU or on its group's
    params' device.

    State per parameter: ``"accumulator"`` (param-shaped, contiguous: fp32, fp64 for fp64
    params; with compressed ``state_dtype`` bf16 or uint8 codes, see above) with, for 8-bit
    codes, ``"accumulator_scales"`` (fp32, one per block of 256 elements of the local tensor),
    and ``"step"`` (0-dim fp32); with ``relative_threshold > 0`` also ``"grad_sq_mean"`` (S,
    0-dim, fp32, fp64 for fp64 params), created at the param's first such step and refreshed by
    every step its group takes with ``relative_threshold > 0`` (one with found_inf excepted).
    Accumulators stay fp32 for fp16/bf16 params, also after ``load_state_dict``, which converts
    loaded state to ``state_dtype``. Values are checked where state enters (``load_state_dict``,
    unpickling): an accumulator with a negative or NaN element, 8-bit scales that are not 0 or
    powers of two, a step that is not a finite count >= 0, or a gradient mean that is not a
    finite number >= 0, raises. A step counter replaced by a number or by a tensor of another
    dtype, shape or device (``state[p]["step"] = 0``) is converted to a 0-dim fp32 tensor before
    the next step (a gradient mean likewise, to its fp32 or fp64 dtype); an accumulator replaced
    by one of the wrong dtype, shape or device raises there (its values are not read at a step).
    With ``torch.amp.GradScaler`` gradients are unscaled inside the kernel and a step with
    ``found_inf`` is a no-op; the ``grad_scale`` and ``found_inf`` it sets must be
    floating-point tensors of shape ``()`` or ``(1,)`` on the CPU or on the params' device
    (checked at every step).

    Under FSDP2 (``fully_shard``) parameters, gradients and accumulators are DTensors; the
    step runs on their local shards, and the counts (``last_update_fraction``,
    ``nonfinite_skipped``) are this rank's, as is S (the mean over the local shard).
    Compressed state works there for local shards of consecutive elements (FSDP2's
    ``Shard(0)``): they draw the random bits of the whole param, and 8-bit codes (a DTensor
    like the param) have plain scales per block of the local shard. ``state_dict()`` gives
    those codes per-element exponents in place of their scales, a DTensor that
    torch.distributed.checkpoint saves and reshards (``classp_fused.sharded_codes``), and
    ``load_state_dict`` rebuilds the local blocks: bit for bit on the layout saved from, so a
    resumed run continues bit for bit; on another layout (other shards, or the whole param in
    one process) a block mixing scales is encoded again from its exact values, rounded to
    nearest.
    Under ``torch.compile`` the per-step input validation is skipped; give ``lr`` as a tensor
    so that a scheduler changing it causes no recompilation.

    A regularizer attached with ``MAS.attach(optimizer)`` / ``EWC.attach(optimizer)`` has its
    penalty taken inside the step kernel (explicit or proximal form, SPEC section 4a), read
    from its current state at every step; params without a ``.grad`` are not stepped and so
    get no penalty either.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr, threshold: float = 0.0, eps: float = 1e-5, power: float = 1.0,
                 apply_scaling: bool = True, mode: str = "paper", backend: str = "auto",
                 nonfinite: str = "skip", relative_threshold: float = 0.0,
                 state_dtype: str = "fp32", state_seed: int = 0, **foreign_options):
        check_foreign_options(foreign_options)
        check_hyperparameters(lr, threshold, eps, power, apply_scaling, relative_threshold)
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
        if (isinstance(state_seed, bool) or not isinstance(state_seed, numbers.Integral)
                or not 0 <= state_seed < 2 ** 32):
            raise ValueError(f"state_seed must be an int in [0, 2**32), got {state_seed!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        if mode == "legacy" and backend != "torch":
            raise ValueError(f"mode='legacy' runs on backend='torch' only, got backend={backend!r}")
        if mode == "legacy" and relative_threshold > 0:
            raise ValueError(f"relative_threshold needs mode='paper' (the legacy gate is per "
                             f"tensor), got relative_threshold={relative_threshold!r}")
        if state_dtype != "fp32":
            if mode == "legacy":
                raise ValueError(f"state_dtype={state_dtype!r} needs mode='paper' (the legacy "
                                 f"rule keeps fp32 accumulators)")
            if backend != "auto" and not steps_compressed_state(backend):
                able = [name for name in BACKENDS if steps_compressed_state(name)]
                raise ValueError(f"state_dtype={state_dtype!r} needs a backend that steps "
                                 f"compressed accumulators ({', '.join(able)} or 'auto'), got "
                                 f"backend={backend!r}")
        self.mode = mode
        self.state_dtype = state_dtype
        self.state_seed = int(state_seed)
        self.nonfinite = nonfinite
        self._requested_backend = backend
        self._warned_keys: set[str] = set()
        self._plans: dict[int, GroupPlan] = {}
        self._penalty_source = None  # the attached regularizer, see _set_penalty_source
        defaults = dict(lr=lr, threshold=threshold, eps=eps, power=power,
                        apply_scaling=apply_scaling, relative_threshold=relative_threshold)
        super().__init__(params, defaults)
        self._telemetry = StepTelemetry(self._placed_device())
        for device in {p.device for group in self.param_groups for p in group["params"]}:
            if device.type != "meta":  # meta params are placed later; resolved at the step
                resolve_backend(backend, device)
        for key, value in foreign_options.items():  # all set off: check_foreign_options
            warn_at_caller(f"CLASSP ignores {key}={value!r}: {FOREIGN_KEYS[key]}")

    @property
    def backend(self) -> str:
        """The backend that ran the last step ("+"-joined when groups on several devices ran
        different ones). Before the first step: the one the params' device would run, or
        ``"auto"`` while they are on the meta device."""
        ran = self._telemetry.backends
        if ran:
            return "+".join(ran)
        device = self._device()
        if device.type == "meta" and self._requested_backend == "auto":
            return "auto"
        return self._backend_for(device)

    def _backend_for(self, device: torch.device) -> str:
        """The concrete backend for a group on ``device`` (a named one is taken as given while
        compiling, as the op does; with compressed state ``auto`` takes ``foreach`` where the
        device's fastest kernel steps no compressed accumulators)."""
        if torch.compiler.is_compiling() and self._requested_backend != "auto":
            return self._requested_backend
        backend = resolve_backend(self._requested_backend, device)
        if self.state_dtype != "fp32" and not steps_compressed_state(backend):
            return "foreach"  # only reached with "auto": a named one was checked at __init__
        return backend

    def _device(self) -> torch.device:
        """The device of the first parameter (ZeroRedundancyOptimizer may leave a rank none)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return params[0].device if params else torch.device("cpu")

    def _placed_device(self) -> torch.device:
        """The first parameter's device, the CPU while params are on the meta device."""
        device = self._device()
        return torch.device("cpu") if device.type == "meta" else device

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "mode": self.mode, "nonfinite": self.nonfinite,
                "backend": self._requested_backend, "state_dtype": self.state_dtype,
                "state_seed": self.state_seed}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        backend = state.pop("backend", None)
        # compressed state's options (pickled before they existed: fp32)
        state_dtype, state_seed = state.pop("state_dtype", "fp32"), state.pop("state_seed", 0)
        super().__setstate__(state)
        for group in self.param_groups:  # saved before these hyperparameters existed
            for key, value in ADDED_HYPERPARAMETERS.items():
                group.setdefault(key, value)
        if backend is not None:  # unpickling; load_state_dict passes state and groups only
            check_state_values(self.state, self.param_groups)
            self._requested_backend = backend
            self.state_dtype, self.state_seed = state_dtype, state_seed
            self._warned_keys = set()
            self._telemetry = StepTelemetry(self._placed_device())
            self._penalty_source = None  # an attachment is not pickled
        self._plans = {}  # load_state_dict replaced the state the plans were built on

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; a group that CLASSP cannot step raises and is not added."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"param_group must be a dict with a 'params' entry, got "
                            f"{type(param_group).__name__}")
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):
            param_group["params"] = params = list(params)  # an iterator is read once
        index = len(self.param_groups)
        check_group({**self.defaults, **param_group, "params": group_tensors(params)}, index)
        super().add_param_group(param_group)
        self._warn_foreign_keys(param_group, index)

    def _warn_foreign_keys(self, group: dict, index: int) -> None:
        """Warn, once per key, that a foreign key set to an "off" value is ignored, at the line
        that built the optimizer, added the group, loaded the state dict or stepped
        (``warn_at_caller``)."""
        for key in foreign_keys(group):
            if key not in self._warned_keys:
                self._warned_keys.add(key)
                warn_at_caller(f"CLASSP ignores the param group key {key}={group[key]!r} "
                                f"(param group {index}): {FOREIGN_KEYS[key]}")

    def _set_penalty_source(self, source) -> None:
        """Take the penalty of ``source`` (an attached regularizer, or None for none) inside
        every following step. ``source`` provides ``penalty_form``, ``penalty_scale``,
        ``penalty_state_token`` and ``penalty_terms(params)`` (see
        :meth:`classp_fused.regularizers.Regularizer.attach`). The plans keep no terms of a
        source that is gone."""
        self._penalty_source = source
        for plan in self._plans.values():
            plan.keep_penalty_terms(None, None)

    def _check_step(self, grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> tuple[list, list[dict]]:
        """Raise if any group cannot be stepped, before any state or param changes.

        Returns, per group, ``(plan, grads, terms)``: the plan where it still holds (the
        group's tensors are those it was validated with, see :class:`GroupPlan`; ``grads`` its
        current ones) or None for both, and the attached penalty's ``(importances, anchors,
        importance_scales)`` for the group's stepped params (None: no penalty); and the groups
        whose state must be settled first (``_settle_state``).
        """
        plans, unsettled, checked = [], [], []
        source = self._penalty_source
        if source is not None:
            check_penalty_scale(source.penalty_scale, where=f"{type(source).__name__}: penalty ")
        if len(self._plans) > len(self.param_groups):  # groups were removed: drop their plans
            ids = {id(group) for group in self.param_groups}
            self._plans = {key: plan for key, plan in self._plans.items() if key in ids}
        for index, group in enumerate(self.param_groups):
            plan = self._plans.get(id(group))
            grads = None if plan is None else plan.current_grads(group, self.state)
            if grads is not None:
                check_hyperparameters(*(group[key] for key in HYPERPARAMETERS),
                                      where=f"param group {index}: ", device=plan.device)
                if grad_scale is not None or found_inf is not None:
                    check_amp_scalars(grad_scale, found_inf, plan.device,
                                      f"param group {index}: ")
                self._check_mode(group, index)
                if (plan.grad_sq_means is None) == (group["relative_threshold"] > 0):
                    grads = None  # the relative threshold was switched: the step gathers S
            if grads is not None:
                terms = None if source is None else plan.penalty_terms(
                    source, lambda params: self._penalty_terms(source, params, params, index))
                plans.append((plan, grads, terms))
                continue
            self._plans.pop(id(group), None)  # the step rebuilds it from what it holds now
            check_group_keys(group, index)  # a group appended to param_groups directly
            first = next((p for p in group["params"] if p.grad is not None), None)
            dtypes = PARAM_DTYPES
            if first is not None and self.mode == "paper":
                dtypes = param_dtypes(self._backend_for(local_part(first).device))
            if check_stepped_group(index, group, self.state, dtypes, self.state_dtype):
                unsettled.append(group)
            if first is not None:
                check_amp_scalars(grad_scale, found_inf, local_part(first).device,
                                  f"param group {index}: ")
            self._check_mode(group, index)
            checked.append((group, index))
            terms = None
            if source is not None:
                stepped = [p for p in group["params"] if p.grad is not None]
                terms = self._penalty_terms(source, stepped, [local_part(p) for p in stepped],
                                            index)
            plans.append((None, None, terms))
        if self.nonfinite == "raise":
            self._raise_on_nonfinite(grad_scale, [terms for _, _, terms in plans])
        for group, index in checked:  # keys of other optimizers set to "off" after construction
            self._warn_foreign_keys(group, index)
        return plans, unsettled

    def _check_mode(self, group: dict, index: int) -> None:
        """Raise if group ``index`` (hyperparameters checked) asks what ``mode`` cannot do."""
        if self.mode == "legacy" and group["relative_threshold"] > 0:
            raise ValueError(f"param group {index}: relative_threshold needs mode='paper' (the "
                             f"legacy gate is per tensor), got {group['relative_threshold']!r}")

    @staticmethod
    def _penalty_terms(source, params: list, local_params: list, index: int) -> Optional[tuple]:
        """``source``'s checked ``(importances, anchors, importance_scales)`` for a group's
        stepped ``params`` (``local_params`` their local shards), or None when it holds state
        for none of them."""
        importances, anchors, scales = source.penalty_terms(params)
        if all(w is None for w in importances):
            return None
        check_penalty(local_params, Penalty(source.penalty_form, source.penalty_scale,
                                            importances, anchors, scales),
                      where=f"the penalty of {type(source).__name__} on param group {index}")
        return importances, anchors, scales

    def _settle_state(self, group: dict) -> None:
        """Bring the state of the group's stepped params to the form the step advances
        (``validation.is_settled``): the accumulator, step counter and gradient mean of a param
        that moved follow it, a step counter set to a number or to a tensor of another form
        becomes a 0-dim fp32 tensor on the param's device, and a gradient mean of another form a
        0-dim tensor of the accumulator's dtype there."""
        for p in group["params"]:
            state = self.state.get(p)
            if p.grad is None or not state:
                continue
            if state["accumulator"].device != p.device:
                state["accumulator"] = state["accumulator"].to(p.device)
                if "accumulator_scales" in state:
                    state["accumulator_scales"] = state["accumulator_scales"].to(p.device)
            if not is_settled(state["step"], state["accumulator"], p.device):
                state["step"] = step_counter(state["step"], p.device)
            mean = state.get("grad_sq_mean")
            if mean is not None and not is_settled(state["step"], state["accumulator"],
                                                   p.device, mean):
                state["grad_sq_mean"] = grad_sq_mean(mean, p)

    def _raise_on_nonfinite(self, grad_scale: Optional[Tensor], terms: list) -> None:
        """Raise FloatingPointError for a non-finite element of a gradient the update would see
        (unscaled; with an explicit penalty, penalized); ``terms`` per group as ``_check_step``
        returns them."""
        source = self._penalty_source
        explicit = source is not None and source.penalty_form == "explicit"
        for index, (group, group_terms) in enumerate(zip(self.param_groups, terms)):
            stepped = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            entries = (zip(*group_terms) if explicit and group_terms
                       else [(None, None, None)] * len(stepped))
            for (i, p), (importance, anchor, scales) in zip(stepped, entries):
                if importance is not None and importance.dtype == torch.uint8:
                    importance = importance_values(importance, scales, torch.float32)
                g = penalized_grad(local_part(p), local_part(p.grad), grad_scale=grad_scale,
                                   importance=importance, anchor=anchor,
                                   scale=source.penalty_scale if explicit else 0.0)
                if not bool(torch.isfinite(g).all()):
                    raise FloatingPointError(
                        f"non-finite gradient in param group {index}, param {i} "
                        f"(shape {tuple(g.shape)}); nothing was updated (nonfinite='raise')")

    def _init_group(self, group: dict, params: list, grads: list, accs: list, steps: list,
                    means: Optional[list], scales: Optional[list] = None,
                    offsets: Optional[list] = None) -> None:
        """Append the group's stepped tensors (local shards of DTensors) to the lists, their
        ``"grad_sq_mean"`` to ``means`` unless it is None (the group's relative_threshold is 0),
        and with compressed state (``scales`` and ``offsets`` given) their 8-bit block scales
        (None for other formats) and their local tensors' index offsets.

        State is created here on first use; the lists are filled in place, the form
        torch.compile traces without running the state initialization in the graph. The inputs
        were checked by ``_check_step``.
        """
        all_state = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = all_state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state.update(compressed_state.new_state(p, self.state_dtype))
            acc = state["accumulator"]
            if scales is not None:
                scales.append(state.get("accumulator_scales"))
                offsets.append(compressed_state.index_offset(p)
                               if acc.dtype in COMPRESSED_ACC_DTYPES else 0)
            if type(p) is not nn.Parameter or type(grad) is not Tensor:  # maybe DTensors
                p, grad, acc = local_part(p), local_part(grad), local_part(acc)
            params.append(p)
            grads.append(grad)
            accs.append(acc)
            steps.append(state["step"])
            if means is not None:
                if "grad_sq_mean" not in state:  # S of the local shard: a plain tensor
                    state["grad_sq_mean"] = torch.zeros((), dtype=compute_dtype(p),
                                                        device=p.device)
                means.append(state["grad_sq_mean"])

    def _step_buffer(self, group: dict, steps: list) -> Optional[Tensor]:
        """The buffer the step counters ``steps`` of the group's stepped params view, made
        when they view none or another; None while compiling.

        A per-tensor add costs over 1 us on the CPU, more than the kernel for small tensors,
        so a group's counters are kept as views of one buffer, advanced by a single add after
        the step (and read by one op for the rounding keys before it); the buffer is rebuilt
        when the set of stepped params changes. (A group's stepped params, and so their
        counters, share one device: ``_check_step`` saw to it.)
        """
        if torch.compiler.is_compiling():
            return None
        base = steps[0]._base
        if base is None or base.numel() != len(steps) or any(t._base is not base for t in steps):
            base = torch.stack(steps)
            stepped = [p for p in group["params"] if p.grad is not None]
            for p, view in zip(stepped, base.unbind()):
                self.state[p]["step"] = view
        return base

    @staticmethod
    def profile_hook_step(func):
        """``Optimizer``'s wrapper of ``step`` (the step hooks, a profiler record of the step)
        where it has work: while a profiler runs, a step hook is registered (on this optimizer
        or globally) or torch.compile traces the step. Otherwise ``step`` runs as it is:
        entering the record costs about 40 us of host time per step with no profiler running,
        more than the checks of a planned param group."""
        hooked = Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def wrapper(self, *args, **kwargs):
            if (torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled()
                    or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _global_optimizer_pre_hooks or _global_optimizer_post_hooks):
                return hooked(self, *args, **kwargs)
            return func(self, *args, **kwargs)
        return wrapper

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one step. ``closure`` re-evaluates the model and returns the loss.

        Every group is checked before any state or param changes: an error leaves all of
        them as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        compiling = torch.compiler.is_compiling()
        source = self._penalty_source
        if compiling:  # no checks, no plans
            plans = [(None, None, None if source is None else source.penalty_terms(
                [p for p in group["params"] if p.grad is not None]))
                for group in self.param_groups]
        else:
            plans, unsettled = self._check_step(grad_scale, found_inf)
            for group in unsettled:
                self._settle_state(group)

        steps = []
        seed = self.state_seed
        for group, (plan, grads, terms) in zip(self.param_groups, plans):
            compressed = None  # the rounding keys are those of the steps before this one
            if plan is None:
                params, grads, accs, counters = [], [], [], []
                means = [] if group["relative_threshold"] > 0 else None
                scales, offsets = (None, None) if self.state_dtype == "fp32" else ([], [])
                self._init_group(group, params, grads, accs, counters, means, scales, offsets)
                if not params:
                    continue
                base = self._step_buffer(group, counters)
                if scales is not None and any(a.dtype in COMPRESSED_ACC_DTYPES for a in accs):
                    compressed = CompressedState(scales, tensor_key(
                        seed, torch.stack(counters) if base is None else base), offsets)
                device = params[0].device
                backend = self._backend_for(device)
            else:  # the plan's device is its params' (checked), its backend the one for it
                params, accs, means = plan.params, plan.accs, plan.grad_sq_means
                device, backend = plan.device, plan.backend
                if plan.scales is not None:
                    compressed = CompressedState(plan.scales, tensor_key(seed, plan.steps),
                                                 plan.offsets)
            penalty = None if terms is None else Penalty(source.penalty_form,
                                                         source.penalty_scale, *terms)
            counts = self._run(group, backend, params, grads, accs,
                               step_spec(group["lr"], group["threshold"], group["eps"],
                                         group["power"], group["apply_scaling"], grad_scale,
                                         found_inf, penalty, group["relative_threshold"],
                                         means, compressed))
            increment = 1.0 if found_inf is None else 1.0 - found_inf.to(device, torch.float32)
            if plan is not None:
                plan.steps.add_(increment)
                steps.append((counts, plan.numels, backend))
                continue
            if base is None:
                torch._foreach_add_(counters, increment)
            else:
                base.add_(increment)
            plan = None if compiling else GroupPlan.build(group, self.state, params, base,
                                                          means, backend, compressed)
            if plan is not None:
                if source is not None:
                    plan.keep_penalty_terms(source, terms)
                self._plans[id(group)] = plan
            steps.append((counts, [p.numel() for p in params] if plan is None else plan.numels,
                          backend))
        self._telemetry.record(steps)
        return loss

    def _run(self, group: dict, backend: str, params: list, grads: list, accs: list,
             spec: StepSpec) -> Tensor:
        """Step one group's tensors as ``spec`` says; returns the kernel's counts."""
        if self.mode == "legacy":  # never with a penalty: an attached one runs as step hooks
            return classp_legacy_step_(params, grads, accs, lr=spec.lr, threshold=spec.threshold,
                                       eps=spec.eps, power=spec.power,
                                       apply_scaling=spec.apply_scaling,
                                       grad_scale=spec.grad_scale, found_inf=spec.found_inf)
        return run_backend(backend, params, grads, accs, spec)

    @property
    def last_update_fraction(self) -> float:
        """Fraction of the stepped parameters' elements updated by the last step (syncs)."""
        return self._telemetry.update_fraction

    @property
    def last_step_counts(self) -> list[Tensor]:
        """Per param group, the last step's ``(n, 2)`` counts: elements updated, non-finite
        skipped."""
        return self._telemetry.group_counts

    @property
    def nonfinite_skipped(self) -> int:
        """Non-finite gradient elements skipped since construction (syncs)."""
        return self._telemetry.nonfinite_skipped

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (accumulators, 8-bit block scales, step
        counters, gradient means)."""
        return sum(t.numel() * t.element_size() for state in self.state.values()
                   for t in state.values() if isinstance(t, Tensor))

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()``: the state tensors themselves (DTensors for
        DTensor params, as torch.distributed.checkpoint needs), but for the 8-bit codes of a
        DTensor param: their block scales belong to its local shard, so the entry holds
        ``"accumulator_exponents"`` in place of ``"accumulator_scales"``, a new int8 DTensor
        laid out like the codes with the exponent of each element's block scale
        (``classp_fused.sharded_codes``; one more byte per element while the dict exists)."""
        state_dict = super().state_dict()
        state = state_dict["state"]
        for key, entry in state.items():
            acc = entry.get("accumulator")
            if getattr(acc, "dtype", None) == torch.uint8 and local_part(acc) is not acc:
                saved = {name: t for name, t in entry.items() if name != "accumulator_scales"}
                saved[EXPONENTS_KEY] = sharded_codes.exponents_of(acc,
                                                                  entry["accumulator_scales"])
                state[key] = saved
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state after checking all of it (:func:`classp_fused.validation.check_state_dict`).

        Accumulators take this optimizer's format (``state_dtype``), whatever the param's dtype
        and the format they were saved in: exact ones become fp32 (fp64 for fp64 params),
        compressed ones are loaded as they are into the same format, decoded into an exact
        one, and exact values are rounded into a compressed one with the param's rounding key
        at its saved step (deterministic; bf16 <-> 8-bit goes through fp32). 8-bit codes with
        per-element exponents (``state_dict()`` of a DTensor param) are laid out like the
        param, their local blocks rebuilt (``classp_fused.sharded_codes``). Gradient means
        take the accumulator's compute dtype; a ``step`` saved as a Python number or an integer
        tensor becomes a 0-dim fp32 tensor. A dict saved before ``relative_threshold`` existed
        loads with it 0. A bad dict (an accumulator with a negative or NaN element, 8-bit codes
        without their block scales or with a scale that is neither 0 nor a power of two, a
        step that is not a finite count >= 0, a gradient mean that is not a finite number >= 0,
        8-bit exponents outside [-115, 127] but for -128 (a zero block), a tensor ``lr`` on
        another device than the CPU and the group's params, ...) raises and changes nothing.
        Keys of other optimizers set to "off" in the loaded groups are ignored with a warning,
        as at construction.
        """
        check_state_dict(state_dict, self.param_groups, self.state_dtype)
        saved = {key: dict(value) for key, value in state_dict["state"].items()}
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        # copies, made before anything changes: the loaded state never aliases the tensors of
        # the state_dict it came from
        loaded = {pid: loaded_entry(saved[pid], p, self.state_dtype, self.state_seed)
                  for pid, p in zip(ids, params) if pid in saved}
        super().load_state_dict(state_dict)
        for pid, p in zip(ids, params):
            if pid in loaded:
                state = self.state[p]
                state.pop("accumulator_scales", None)
                state.pop(EXPONENTS_KEY, None)
                state.update(loaded[pid])
        for index, group in enumerate(self.param_groups):  # loaded keys of other optimizers
            self._warn_foreign_keys(group, index)
