"""A regularizer attached to an optimizer: its penalty applied at every ``optimizer.step()``.

For CLASSP (``mode="paper"``) the penalty goes into the step kernel (one pass; the optimizer
reads ``penalty_form``, ``penalty_scale``, ``penalty_state_token`` and ``penalty_terms``). Any
other ``torch.optim.Optimizer`` gets step hooks calling the manual methods: a pre-hook adds the
explicit penalty's gradient (times the scale the gradients carry when a GradScaler hands an
optimizer that unscales inside its step ``grad_scale``), a post-hook takes the proximal step
(skipped when that GradScaler found an overflow and the step did nothing). Both hooks read
``penalty_form`` at every step.

``Attachment`` is mixed into ``Regularizer``; it uses ``self.model``, ``_scale``,
``_importance``, ``_importance_scales``, ``_anchor``, ``_terms``, ``_laid_out_importance``,
``_regularized_params``, ``add_penalty_grad_`` and ``proximal_step_``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends.step_spec import PENALTY_FORMS
from ..optim import CLASSP
from . import penalty as penalty_ops
from .checks import check_choice
from .shards import local, match_shard


class Attachment:
    """``attach`` / ``detach`` and what an attached CLASSP reads."""

    def _init_attachment(self, penalty: str) -> None:
        self.penalty_form = penalty
        self._attached: Optional[tuple] = None  # (optimizer, hook handles)

    @property
    def penalty_form(self) -> str:
        """How an attached optimizer applies the penalty: ``"explicit"`` (its gradient joins
        the loss gradient) or ``"proximal"`` (a pull toward the anchor after the update)."""
        return self._penalty_form

    @penalty_form.setter
    def penalty_form(self, form: str) -> None:
        check_choice("penalty", form, PENALTY_FORMS)
        self._penalty_form = form

    @property
    def penalty_scale(self) -> float:
        """The factor in front of the penalty's sum (MAS: lam, EWC: lam/2)."""
        return float(self._scale)

    @property
    def penalty_state_token(self) -> object:
        """An object replaced whenever consolidate or load_state_dict replaces the state, so
        that terms read from the state can be kept until it changes."""
        return self._importance

    @property
    def attached_to(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer this regularizer is attached to, or None."""
        return None if self._attached is None else self._attached[0]

    def penalty_terms(self, params: list) -> tuple[list, list, list]:
        """Per param of ``params`` (model parameters), its importance as stored (the param's
        dtype, bfloat16 or uint8 8-bit codes), anchor (local shards under FSDP2) and the
        8-bit importance's block scales (None unless uint8), or None for all three where it
        has no state or no ``requires_grad``: a ``Penalty``'s importances, anchors and
        importance_scales."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        importances, anchors, scales = [], [], []
        for p in params:
            name = names.get(id(p))
            if name is None or name not in self._importance or not p.requires_grad:
                importances.append(None)
                anchors.append(None)
                scales.append(None)
            else:
                importances.append(local(self._laid_out_importance(name, p)))
                anchors.append(local(match_shard(self._anchor, name, p)))
                scales.append(self._importance_scales.get(name))
        return importances, anchors, scales

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the penalty, in the form ``penalty_form`` names, at every ``optimizer.step()``
        from now on, at the importances and anchors current at that step (a later consolidate
        or load_state_dict takes effect at the next step).

        CLASSP (``mode="paper"``) takes the penalty inside its step kernel: explicit, the
        gradient ``2*scale*W*(theta - m)`` joins the unscaled gradient before the threshold;
        proximal, each element the step updated is pulled toward its anchor with CLASSP's own
        step size. Other optimizers get a step pre-hook (explicit: ``add_penalty_grad_``, also
        after a closure's backward) and a post-hook (proximal: ``proximal_step_(optimizer)``).
        Under a GradScaler a step skipped for an overflow gets no penalty either.

        Raises, changing nothing, when this regularizer is attached already, when ``optimizer``
        does not hold every regularized parameter, when its state lies on another device than
        the parameters, or when a CLASSP already takes another regularizer's penalty.
        """
        name = type(self).__name__
        if self._attached is not None:
            raise RuntimeError(f"{name} is attached to an optimizer already; detach() it first")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = self._regularized_params()
        missing = [n for n, p in params.items() if id(p) not in held]
        if missing:
            raise ValueError(f"{type(optimizer).__name__} does not hold the regularized "
                             f"parameter(s) {missing}: attach {name} to the optimizer that "
                             f"steps the model's parameters")
        for n, p in params.items():
            for kind, state in (("importance", self._importance), ("anchor", self._anchor)):
                t = state.get(n)
                if t is not None and local(t).device != local(p).device:
                    raise RuntimeError(f"{name}'s {kind} of {n!r} is on {local(t).device}, the "
                                       f"parameter on {local(p).device}: move the model before "
                                       f"consolidate or load_state_dict")
        if isinstance(optimizer, CLASSP) and optimizer.mode == "paper":
            source = optimizer._penalty_source
            if source is not None:
                raise RuntimeError(f"this CLASSP takes the penalty of another "
                                   f"{type(source).__name__} already; detach that one first")
            optimizer._set_penalty_source(self)
            self._attached = (optimizer, ())
            return
        self._attached = (optimizer, (optimizer.register_step_pre_hook(self._explicit_hook),
                                      optimizer.register_step_post_hook(self._proximal_hook)))

    def detach(self) -> None:
        """Stop applying the penalty at the attached optimizer's steps; the optimizer is then
        as it was before ``attach`` (hooks removed, nothing of this regularizer kept). Does
        nothing when not attached."""
        if self._attached is None:
            return
        optimizer, hooks = self._attached
        if hooks:
            for hook in hooks:
                hook.remove()
        else:
            optimizer._set_penalty_source(None)
        self._attached = None

    def _explicit_hook(self, optimizer, args: tuple, kwargs: dict) -> Optional[tuple]:
        """Add the penalty gradient before the step; with a closure, after each of its calls.
        ``args`` are those of ``step``, the optimizer itself first."""
        if self.penalty_form != "explicit":
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._add_grad(optimizer)
            return None

        def penalized_closure():
            loss = closure()
            self._add_grad(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": penalized_closure}
        return (args[0], penalized_closure, *args[2:]), kwargs

    def _add_grad(self, optimizer) -> None:
        """``add_penalty_grad_`` at the scale a GradScaler left on the gradients of an
        optimizer that unscales inside its step (``optimizer.grad_scale``, None after
        ``unscale_``)."""
        params, importances, scales, anchors, _ = self._terms()
        if params:
            penalty_ops.add_penalty_grad_(params, importances, anchors, 2 * self._scale,
                                          getattr(optimizer, "grad_scale", None),
                                          importance_scales=scales)

    def _proximal_hook(self, optimizer, args: tuple, kwargs: dict) -> None:
        """Take the proximal step after the optimizer's, unless a GradScaler's ``found_inf``
        made that step a no-op."""
        if self.penalty_form != "proximal":
            return
        found_inf: Optional[Tensor] = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        self.proximal_step_(optimizer)
