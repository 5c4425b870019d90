"""What one CLASSP step over a list of tensors does, as data: every backend receives it whole.

A ``StepSpec`` holds a param group's hyperparameters, the AMP scalars and the options the step
grows (SPEC section 4a); the tensor lists it carries (a ``Penalty``'s importances and anchors,
the per-tensor gradient means of the relative threshold) are aligned with the stepped params.
Backends read what they support from it, so an option is added here and in each backend's
kernel, not to every backend's argument list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import Tensor

PENALTY_FORMS = ("explicit", "proximal")


@dataclass(frozen=True, slots=True)
class Penalty:
    """The quadratic penalty ``scale * sum W * (theta - m)^2`` taken inside the step.

    ``form``: ``"explicit"`` adds its gradient ``2*scale*W*(theta - m)`` to the unscaled
    gradient before the threshold test and the update; ``"proximal"`` moves each element the
    update changed to ``theta + w*(m - theta)``, ``w = c/(1 + c)``, ``c = 2*scale*eta*W`` (``c``
    capped to half the largest fp32 value, so ``w`` stays in [0, 1]), eta the element's step
    size ``lr/(eps + A)^(1/p)`` with the updated A (``lr`` without scaling). ``importances`` W and
    ``anchors`` m hold per stepped tensor one tensor of its shape and device, or None (that
    tensor steps without the penalty). An anchor has the param's dtype; an importance is stored
    in an importance format (``state_formats.importance_dtype``): the param's dtype, bfloat16
    (float32 and float16 params), or uint8 codes of the 8-bit format (contiguous), whose
    float32 block scales ``importance_scales`` holds at the same position (None elsewhere; the
    whole list may be None when no importance is uint8). Every backend reads W as its value in
    float32 (float64 for float64 params), decoded per element.
    """

    form: str
    scale: float
    importances: Sequence[Optional[Tensor]]
    anchors: Sequence[Optional[Tensor]]
    importance_scales: Optional[Sequence[Optional[Tensor]]] = None


@dataclass(frozen=True, slots=True)
class CompressedState:
    """What a step needs to update compressed accumulators (``classp_fused.state_formats``).

    A tensor's accumulator format is its dtype: float32 (float64) exact, bfloat16, or uint8
    codes of the 8-bit format, whose per-block float32 scales ``scales`` holds (None for the
    other tensors). ``keys`` is an int64 tensor of one rounding key per tensor
    (``state_formats.tensor_key``: seed and step), on the params' device so that no step reads
    it on the host; ``offsets`` gives per tensor the index within its whole parameter of its
    first element (0 but for local shards), from which the random bits are drawn.
    """

    scales: Sequence[Optional[Tensor]]
    keys: Tensor
    offsets: Sequence[int]


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One param group's step: hyperparameters (SPEC section 1), AMP scalars, options.

    ``lr`` is a Python float or a 0-dim floating tensor; ``grad_scale`` and ``found_inf`` are
    one-element tensors or None; ``penalty`` a ``Penalty`` or None.

    Relative threshold (unitless sparsity): ``grad_sq_means`` holds per stepped tensor a 0-dim
    tensor S of its compute dtype (float32, float64 for float64 params), or is None. With
    ``relative_threshold`` tau > 0 an element is updated only where also ``g*g > tau * S``
    (``g`` the gradient the threshold tests); every step that is not skipped by ``found_inf``
    then replaces each non-empty tensor's S with ``sum(g*g over its finite elements) / numel``,
    read by the next step. ``grad_sq_means`` is required when tau > 0 and updated whenever
    given.

    ``compressed`` is required when an accumulator is bfloat16 or uint8 (8-bit codes): an
    updated element's new A (in float32, from the decoded old one) steps the param, then is
    rounded stochastically into the format; an 8-bit block with an updated element is encoded
    again as a whole (a block whose scale changes may move an unchanged element's code, never
    its value unless it falls below 2**-31 of the block scale).
    """

    lr: Union[float, Tensor]
    threshold: float
    eps: float
    power: float
    apply_scaling: bool
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None
    penalty: Optional[Penalty] = None
    relative_threshold: float = 0.0
    grad_sq_means: Optional[Sequence[Tensor]] = None
    compressed: Optional[CompressedState] = None

    def op_arguments(self, lr: Tensor) -> tuple:
        """The arguments of the kernels' op after ``(params, grads, accs)``, ``lr`` given as a
        0-dim tensor: no penalty as empty lists and the form ``"none"``; of the penalty's
        ``importance_scales``, those of the uint8 importances only (in order); no gradient means
        as an empty list; of ``compressed``, the scales of the 8-bit accumulators only (in order),
        the keys (None without) and the offsets (empty without)."""
        penalty, compressed = self.penalty, self.compressed
        if penalty is None:
            importances, anchors, form, scale = [], [], "none", 0.0
            importance_scales = []
        else:
            importances, anchors = list(penalty.importances), list(penalty.anchors)
            form, scale = penalty.form, penalty.scale
            importance_scales = [t for t in penalty.importance_scales or () if t is not None]
        means = [] if self.grad_sq_means is None else list(self.grad_sq_means)
        if compressed is None:
            scales, keys, offsets = [], None, []
        else:
            scales = [t for t in compressed.scales if t is not None]
            keys, offsets = compressed.keys, list(compressed.offsets)
        return (lr, self.threshold, self.eps, self.power, self.apply_scaling, self.grad_scale,
                self.found_inf, importances, anchors, form, scale, importance_scales,
                self.relative_threshold,
                means, scales, keys, offsets)


def as_scalar_lr(lr):
    """``lr`` in the form every backend takes: a one-element tensor as 0-dim (a view), any other
    lr (a numpy scalar, say) as a Python float."""
    return lr.reshape(()) if isinstance(lr, Tensor) else float(lr)


def step_spec(lr, threshold, eps, power, apply_scaling, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, penalty: Optional[Penalty] = None,
              relative_threshold=0.0, grad_sq_means: Optional[Sequence[Tensor]] = None,
              compressed: Optional[CompressedState] = None) -> StepSpec:
    """A ``StepSpec`` with its values in the forms backends take: ``lr`` by ``as_scalar_lr``,
    the other hyperparameters as Python floats and a bool."""
    return StepSpec(as_scalar_lr(lr), float(threshold), float(eps), float(power),
                    bool(apply_scaling), grad_scale, found_inf, penalty,
                    float(relative_threshold), grad_sq_means, compressed)
