"""Input validation for the CLASSP step and optimizer: every check raises before anything changes.

Hyperparameters, params and one step's tensor lists (the op contract), the param groups and
stepped tensors of an optimizer step, and optimizer state where it enters (a state dict before
it is loaded, an unpickled optimizer). Errors are ``TypeError`` (wrong kind of object),
``ValueError`` (bad value or shape) or ``RuntimeError`` (wrong device) and name the offending
argument or entry. Checks that read tensor values (a reduction) run only where state enters,
never at every step.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import state_formats
from .backends.step_spec import PENALTY_FORMS, CompressedState, Penalty, StepSpec
from .compressed_state import COMPRESSED_ACC_DTYPES, accumulator_dtype, index_offset
from .sharded_codes import check_exponents
from .reference import compute_dtype

PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HYPERPARAMETERS = ("lr", "threshold", "eps", "power", "apply_scaling", "relative_threshold")
#: Hyperparameters a state dict saved before they existed lacks, with the value it then had.
ADDED_HYPERPARAMETERS = {"relative_threshold": 0.0}
STATE_KEYS = ("step", "accumulator")
_STATE_KEY_SET = frozenset(STATE_KEYS)
#: State a param has only while a feature uses it (the relative threshold's gradient mean, the
#: block scales of 8-bit accumulator codes).
OPTIONAL_STATE_KEYS = ("grad_sq_mean", "accumulator_scales")
_STATE_KEY_SETS = tuple(_STATE_KEY_SET | frozenset(extra) for extra in
                        ((), ("grad_sq_mean",), ("accumulator_scales",), OPTIONAL_STATE_KEYS))
#: What a state dict holds in place of ``"accumulator_scales"`` for a DTensor param's 8-bit
#: codes: their per-element block exponents (``classp_fused.sharded_codes``).
EXPONENTS_KEY = "accumulator_exponents"
_SAVED_KEY_SETS = _STATE_KEY_SETS + tuple(_STATE_KEY_SET | frozenset(extra) for extra in
                                          ((EXPONENTS_KEY,), ("grad_sq_mean", EXPONENTS_KEY)))
_NO_STATE: dict = {}  # what a param that was never stepped has (read only)
# Keys other torch optimizers put in param groups (and take as constructor arguments) for
# features CLASSP does not have. Set to an "off" value (0, False, None) they are ignored with a
# warning; any other value is refused.
FOREIGN_KEYS = {
    "weight_decay": "CLASSP has no weight decay: decay would move every weight at every step, "
                    "against the sparse updates CLASSP promotes (protect old tasks with MAS/EWC)",
    "momentum": "CLASSP has no momentum: a momentum buffer would keep moving weights whose "
                "gradient fell under the threshold",
    "dampening": "CLASSP has no momentum",
    "nesterov": "CLASSP has no momentum",
    "betas": "CLASSP has no moment estimates (it is AdaGrad-like, not Adam-like)",
    "amsgrad": "CLASSP has no moment estimates",
    "lr_decay": "CLASSP's step size decays through its accumulator; use an lr scheduler",
    "initial_accumulator_value": "CLASSP's accumulators start at zero; eps plays that role",
    "maximize": "CLASSP minimizes; negate the loss to maximize",
    "decoupled_weight_decay": "CLASSP has no weight decay",
    "foreach": "CLASSP picks its kernel with backend= (backend='foreach' runs torch's "
               "multi-tensor ops)",
    "fused": "CLASSP's kernels are fused already: backend='auto' runs the fastest one for the "
             "params' device",
    "capturable": "CLASSP's step can be captured in a CUDA graph as it is (give lr as a tensor "
                  "on the device to change it between replays)",
    "differentiable": "CLASSP's step updates the params in place under no_grad; it cannot be "
                      "differentiated through",
}


def _is_real(x) -> bool:
    """A real Python or numpy number (not a bool, not a string, not a tensor)."""
    kind = type(x)
    if kind is float or kind is int:  # the common case, without the ABC check (host time)
        return True
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def local_part(t):
    """The part of tensor ``t`` this rank holds: a DTensor's local shard, anything else itself."""
    if type(t) in (Tensor, torch.nn.Parameter):  # the common case, without importing DTensor
        return t
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return t
    return t.to_local() if isinstance(t, DTensor) else t


def check_scalar_device(t, device: torch.device, name: str, where: str = "") -> None:
    """Raise unless ``t``, if a tensor (``lr``, ``grad_scale``, ``found_inf``), is on the CPU or
    on ``device``, the params'. On another device (the meta device, say) the op would dispatch
    to that device's kernel, which steps nothing."""
    if isinstance(t, Tensor) and t.device.type != "cpu" and t.device != device:
        raise RuntimeError(f"{where}{name} is a tensor on {t.device}; it must be on the CPU or "
                           f"on the params' device {device}")


def check_amp_scalars(grad_scale, found_inf, device: torch.device, where: str = "") -> None:
    """Raise unless the ``grad_scale`` and ``found_inf`` that ``torch.amp.GradScaler`` sets on
    an optimizer for its step are each None or a floating-point tensor of shape ``()`` (as
    GradScaler's) or ``(1,)``, on the CPU or on ``device``, the stepped params'."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{where}optimizer.{name} (set by torch.amp.GradScaler) must be "
                            f"None or a floating-point tensor, got {_describe(t)}")
        if t.shape not in ((), (1,)):
            raise ValueError(f"{where}optimizer.{name} (set by torch.amp.GradScaler) must be "
                             f"of shape () or (1,), got shape {tuple(t.shape)}")
        check_scalar_device(t, device, f"optimizer.{name}", where)


def check_lr(lr, where: str = "", device: torch.device | None = None) -> None:
    """Raise unless ``lr`` is a finite non-negative number or a one-element floating tensor, on
    the CPU or on ``device`` (the params', where known).

    The value of a tensor ``lr`` is checked only when it holds data on the CPU (reading it from
    an accelerator would synchronize every step; a FakeTensor has no value).
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}lr as a tensor must hold one element, got shape "
                             f"{tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"{where}lr as a tensor must be floating point, got {lr.dtype}")
        if device is not None:
            check_scalar_device(lr, device, "lr", where)
        if lr.device.type != "cpu" or is_fake(lr):
            return
        value = float(lr)
    elif _is_real(lr):
        value = float(lr)
    else:
        raise ValueError(f"{where}lr must be a finite non-negative number, got {lr!r}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{where}lr must be a finite non-negative number, got {value}")


def check_lr_value(lr, where: str = "") -> None:
    """Raise unless a tensor ``lr`` on an accelerator holds a finite number >= 0. Reading it
    synchronizes, so this runs where a group enters (construction, ``add_param_group``,
    ``load_state_dict``); ``check_lr`` reads a CPU ``lr`` at every step."""
    if isinstance(lr, Tensor) and lr.device.type not in ("cpu", "meta") and not is_fake(lr):
        check_lr(local_part(lr).cpu(), where)


def check_hyperparameters(lr, threshold, eps, power, apply_scaling=True, relative_threshold=0.0,
                          where: str = "", device: torch.device | None = None) -> None:
    """Raise ValueError naming the first out-of-range hyperparameter (``where`` prefixes it);
    a tensor ``lr`` must be on the CPU or on ``device``, the params', where given."""
    check_lr(lr, where, device)
    for name, value in (("threshold", threshold), ("eps", eps),
                        ("relative_threshold", relative_threshold)):
        if not (_is_real(value) and math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{where}{name} must be a finite non-negative number, got {value!r}")
    if not (_is_real(power) and math.isfinite(power) and power > 0.0):
        raise ValueError(f"{where}power must be a finite number > 0, got {power!r}")
    if isinstance(apply_scaling, Tensor) or apply_scaling not in (True, False):
        raise ValueError(f"{where}apply_scaling must be a bool, got {apply_scaling!r}")


def check_param(param: Tensor, where: str = "params") -> None:
    """Raise if ``param`` cannot be updated by CLASSP."""
    if not isinstance(param, Tensor):
        raise TypeError(f"{where} must hold tensors, got {type(param).__name__}")
    if param.is_sparse or param.layout != torch.strided:
        raise TypeError(f"{where}: sparse or non-strided parameters are not supported")
    if param.is_complex():
        raise TypeError(f"{where}: complex parameters are not supported "
                        f"(optimize torch.view_as_real(param) instead)")
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"{where} must be float16, bfloat16, float32 or float64, got {param.dtype}")
    if param.numel() > 1 and torch._debug_has_internal_overlap(param) == 1:
        raise ValueError(f"{where}: a parameter with internal overlap (e.g. from expand()) "
                         f"cannot be updated in place")


def check_grad(param: Tensor, grad, where: str) -> None:
    """Raise unless ``grad`` is a dense real tensor of the param's dtype, shape and device."""
    if not isinstance(grad, Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(grad).__name__}")
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(f"{where} is sparse; CLASSP needs dense gradients")
    if grad.is_complex():
        raise TypeError(f"{where} is complex; CLASSP needs real gradients")
    if grad.dtype != param.dtype:
        raise TypeError(f"{where} has dtype {grad.dtype}, expected the param's {param.dtype}")
    _check_like_param(param, grad, where)


def check_accumulator(param: Tensor, acc, where: str, same_device: bool = True,
                      compressed: bool = False) -> None:
    """Raise unless ``acc`` is the param's accumulator: dense, param-shaped, fp32 (fp64 for
    fp64), no internal overlap; with ``compressed`` also a contiguous bfloat16 or uint8 one
    (``classp_fused.state_formats``) of a param that is not float64."""
    if (compressed and isinstance(acc, Tensor) and acc.dtype in COMPRESSED_ACC_DTYPES
            and param.dtype != torch.float64):
        if acc.layout != torch.strided or not acc.is_contiguous():
            raise ValueError(f"{where}: a compressed ({acc.dtype}) accumulator must be a "
                             f"contiguous dense tensor")
        _check_like_param(param, acc, where, same_device)
        return
    if not isinstance(acc, Tensor) or acc.dtype != compute_dtype(param):
        raise TypeError(f"{where} must be a {compute_dtype(param)} tensor "
                        f"(accumulators stay fp32 for fp16/bf16/fp32 params"
                        f"{', or are bfloat16/uint8 with compressed state' if compressed else ''}"
                        f")")
    if acc.layout != torch.strided:
        raise TypeError(f"{where} must be a dense tensor, got layout {acc.layout}")
    _check_like_param(param, acc, where, same_device)
    if not acc.is_contiguous() and torch._debug_has_internal_overlap(acc) == 1:
        raise ValueError(f"{where}: an accumulator with internal overlap (e.g. from expand()) "
                         f"cannot be updated in place")


def _check_like_param(param: Tensor, t: Tensor, where: str, same_device: bool = True) -> None:
    if t.shape != param.shape:
        raise ValueError(f"{where} has shape {tuple(t.shape)}, expected the param's "
                         f"{tuple(param.shape)}")
    if same_device and t.device != param.device:
        raise RuntimeError(f"{where} is on {t.device}, expected the param's device {param.device}")


def check_step_inputs(params: Sequence[Tensor], grads: Sequence[Tensor], accs: Sequence[Tensor],
                      spec: StepSpec) -> None:
    """Validate one op call's inputs; raise TypeError/ValueError/RuntimeError naming the input."""
    if not (len(params) == len(grads) == len(accs)):
        raise ValueError(f"params, grads and accs must have the same length, got "
                         f"{len(params)}, {len(grads)}, {len(accs)}")
    device = params[0].device if params and isinstance(params[0], Tensor) else None
    check_hyperparameters(spec.lr, spec.threshold, spec.eps, spec.power, spec.apply_scaling,
                          spec.relative_threshold, device=device)
    for name, t in (("grad_scale", spec.grad_scale), ("found_inf", spec.found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1):
            raise ValueError(f"{name} must be a one-element tensor or None")
        if device is not None:
            check_scalar_device(t, device, name)
    for i, (p, g, a) in enumerate(zip(params, grads, accs)):
        check_param(p, f"params[{i}]")
        if p.device != params[0].device:
            raise RuntimeError(f"params[{i}] is on {p.device}, expected params[0]'s device "
                               f"{params[0].device} (one step runs on one device)")
        check_grad(p, g, f"grads[{i}]")
        check_accumulator(p, a, f"accs[{i}]", compressed=spec.compressed is not None)
    if spec.compressed is not None:
        check_compressed(params, accs, spec.compressed)
    if spec.penalty is not None:
        check_penalty(params, spec.penalty)
    if spec.grad_sq_means is not None or spec.relative_threshold > 0:
        check_grad_sq_means(params, spec.grad_sq_means)


def check_compressed(params: Sequence[Tensor], accs: Sequence[Tensor], compressed,
                     where: str = "compressed") -> None:
    """Raise unless ``compressed`` (a ``CompressedState``) fits ``params`` and their accumulators
    (checked): per param a float32 scales tensor of ``state_formats.num_blocks(numel)``
    elements on its device where the accumulator is uint8 (else None), an int64 ``keys`` tensor
    of one key per param on their device, and an integer offset >= 0 per param."""
    if not isinstance(compressed, CompressedState):
        raise TypeError(f"{where} must be a CompressedState or None, got "
                        f"{type(compressed).__name__}")
    n = len(params)
    scales, keys, offsets = compressed.scales, compressed.keys, compressed.offsets
    for name, seq in (("scales", scales), ("offsets", offsets)):
        if not isinstance(seq, Sequence) or len(seq) != n:
            length = len(seq) if isinstance(seq, Sequence) else type(seq).__name__
            raise ValueError(f"{where}.{name} must be a list with one entry per param ({n}), "
                             f"got {length}")
    if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or keys.shape != (n,):
        raise TypeError(f"{where}.keys must be an int64 tensor of shape ({n},), got "
                        f"{_describe(keys)}")
    if n and keys.device != params[0].device:
        raise RuntimeError(f"{where}.keys is on {keys.device}, expected the params' device "
                           f"{params[0].device}")
    for i, (p, a, scale, offset) in enumerate(zip(params, accs, scales, offsets)):
        if not (isinstance(offset, int) and offset >= 0):
            raise ValueError(f"{where}.offsets[{i}] must be an int >= 0, got {offset!r}")
        if a.dtype != torch.uint8:
            if scale is not None:
                raise ValueError(f"{where}.scales[{i}] must be None: accs[{i}] is not 8-bit")
            continue
        _check_block_scales(scale, p, f"{where}.scales[{i}]")


def _check_block_scales(scale, p: Tensor, entry: str) -> None:
    """Raise unless ``scale`` is the contiguous float32 tensor of one scale per 8-bit block of
    ``p``'s elements, on ``p``'s device."""
    blocks = state_formats.num_blocks(p.numel())
    if (not isinstance(scale, Tensor) or scale.dtype != torch.float32
            or scale.shape != (blocks,) or not scale.is_contiguous()):
        raise TypeError(f"{entry} must be a contiguous float32 tensor of shape ({blocks},) "
                        f"(one scale per block of {state_formats.BLOCK}), got "
                        f"{_describe(scale)}")
    if scale.device != p.device:
        raise RuntimeError(f"{entry} is on {scale.device}, expected the param's device "
                           f"{p.device}")


def check_grad_sq_means(params: Sequence[Tensor], means, where: str = "grad_sq_means") -> None:
    """Raise unless ``means`` holds per param a 0-dim tensor of its compute dtype and device
    (the relative threshold's gradient means; required when relative_threshold > 0)."""
    if not isinstance(means, Sequence) or len(means) != len(params):
        length = len(means) if isinstance(means, Sequence) else type(means).__name__
        raise ValueError(f"{where} must be a list with one tensor per param ({len(params)}) "
                         f"when relative_threshold > 0, got {length}")
    for i, (p, s) in enumerate(zip(params, means)):
        if not isinstance(s, Tensor) or s.dim() != 0 or s.dtype != compute_dtype(p):
            raise TypeError(f"{where}[{i}] must be a 0-dim {compute_dtype(p)} tensor, got "
                            f"{_describe(s)}")
        if s.device != p.device:
            raise RuntimeError(f"{where}[{i}] is on {s.device}, expected the param's device "
                               f"{p.device}")


def check_penalty(params: Sequence[Tensor], penalty, where: str = "penalty") -> None:
    """Raise unless ``penalty`` is a :class:`Penalty` that fits ``params``: a known form, a
    finite scale >= 0, and per param either no importance and anchor or both, dense tensors of
    the param's shape, dtype and device."""
    if not isinstance(penalty, Penalty):
        raise TypeError(f"{where} must be a Penalty or None, got {type(penalty).__name__}")
    if penalty.form not in PENALTY_FORMS:
        raise ValueError(f"{where}.form must be one of {PENALTY_FORMS}, got {penalty.form!r}")
    check_penalty_scale(penalty.scale, f"{where}.")
    for name in ("importances", "anchors"):
        tensors = getattr(penalty, name)
        if not isinstance(tensors, Sequence) or len(tensors) != len(params):
            length = len(tensors) if isinstance(tensors, Sequence) else type(tensors).__name__
            raise ValueError(f"{where}.{name} must be a list with one entry per param "
                             f"({len(params)}), got {length}")
    for i, (p, imp, anchor) in enumerate(zip(params, penalty.importances, penalty.anchors)):
        if (imp is None) != (anchor is None):
            raise ValueError(f"{where}: params[{i}] has an importance but no anchor or an "
                             f"anchor but no importance; give both or neither")
        for name, t in (("importances", imp), ("anchors", anchor)):
            if t is None:
                continue
            entry = f"{where}.{name}[{i}]"
            if not isinstance(t, Tensor):
                raise TypeError(f"{entry} must be a tensor or None, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise TypeError(f"{entry} must be a dense (strided) tensor")
            _check_like_param(p, t, entry)
    _check_importance_formats(params, penalty, where)


def _check_importance_formats(params: Sequence[Tensor], penalty, where: str) -> None:
    """Raise unless each importance is in an importance format of its param (its dtype;
    bfloat16 for float32 and float16 params; contiguous uint8 codes with their block scales in
    ``penalty.importance_scales``), each anchor in the param's dtype, and scales only where an
    importance is uint8."""
    scales = penalty.importance_scales
    if scales is not None and (not isinstance(scales, Sequence) or len(scales) != len(params)):
        length = len(scales) if isinstance(scales, Sequence) else type(scales).__name__
        raise ValueError(f"{where}.importance_scales must be None or a list with one entry per "
                         f"param ({len(params)}), got {length}")
    for i, (p, imp, anchor) in enumerate(zip(params, penalty.importances, penalty.anchors)):
        scale = None if scales is None else scales[i]
        if anchor is not None and anchor.dtype != p.dtype:
            raise TypeError(f"{where}.anchors[{i}] has dtype {anchor.dtype}, expected the "
                            f"param's {p.dtype}")
        allowed = [p.dtype] + ([torch.bfloat16] if p.dtype in (torch.float32, torch.float16)
                               else []) + ([torch.uint8] if p.dtype != torch.float64 else [])
        if imp is not None and imp.dtype not in allowed:
            raise TypeError(f"{where}.importances[{i}] has dtype {imp.dtype}, expected one of "
                            f"{allowed} (an importance format of the param's {p.dtype})")
        if imp is not None and imp.dtype == torch.uint8:
            if not imp.is_contiguous():
                raise ValueError(f"{where}.importances[{i}] (uint8 codes) must be contiguous")
            _check_block_scales(scale, p, f"{where}.importance_scales[{i}]")
        elif scale is not None:
            raise ValueError(f"{where}.importance_scales[{i}] must be None: importances[{i}] "
                             f"is not uint8")


def check_penalty_scale(scale, where: str = "") -> None:
    """Raise unless the penalty's ``scale`` is a finite number >= 0 (``where`` prefixes
    "scale")."""
    if not (_is_real(scale) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{where}scale must be a finite number >= 0, got {scale!r}")


def check_group(group: Mapping, index: int) -> None:
    """Raise if param group ``index`` (defaults filled in) cannot be stepped by CLASSP."""
    where = f"param group {index}: "
    check_hyperparameters(*(group[key] for key in HYPERPARAMETERS), where=where)
    check_foreign_keys(group, index)
    first = {}
    for i, p in enumerate(group["params"]):
        check_param(p, f"params[{i}] of param group {index}")
        j = first.setdefault(id(p), i)
        if j != i:
            raise ValueError(f"params[{i}] of param group {index} repeats params[{j}]; "
                             f"list each param once")
    check_lr_placement(group["lr"], group["params"], where)
    check_lr_value(group["lr"], where)


def check_lr_placement(lr, params: Sequence[Tensor], where: str) -> None:
    """Raise unless a tensor ``lr`` is on the CPU or on the device of every param that is not
    on the meta device (those are placed later; the step checks ``lr`` against where they
    went)."""
    for device in {p.device for p in params if p.device.type != "meta"}:
        check_scalar_device(lr, device, "lr", where)


def group_tensors(params) -> list:
    """The tensors of a group's ``params`` entry: a tensor, tensors or (name, tensor) pairs."""
    if isinstance(params, Tensor):
        return [params]
    return [p[1] if isinstance(p, tuple) else p for p in params]


def foreign_keys(group: Mapping) -> list[str]:
    """The keys of ``group`` that name features of other optimizers CLASSP does not have."""
    return [key for key in FOREIGN_KEYS if key in group]


def check_foreign_keys(group: Mapping, index: int) -> None:
    """Raise for a foreign key (see ``FOREIGN_KEYS``) whose value turns its feature on."""
    for key in foreign_keys(group):
        _check_off(key, group[key], f"param group {index}: ")


def check_foreign_options(options: Mapping) -> None:
    """Raise for a keyword argument of CLASSP's constructor beyond its own: TypeError for a
    name that is not in ``FOREIGN_KEYS`` (as for any unknown argument), ValueError for one whose
    value turns its feature on."""
    for key, value in options.items():
        if key not in FOREIGN_KEYS:
            raise TypeError(f"CLASSP() got an unexpected keyword argument {key!r}")
        _check_off(key, value, "")


def _check_off(key: str, value, where: str) -> None:
    if not _is_off(value):
        raise ValueError(f"{where}{key}={value!r} is not supported; {FOREIGN_KEYS[key]}. Leave "
                         f"it out or set it to 0, False or None")


def _is_off(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_off(v) for v in value)
    return value is None or (not isinstance(value, (str, Tensor)) and value == 0)


def check_group_keys(group: Mapping, index: int) -> None:
    """Raise unless param group ``index`` has ``"params"`` (a list of tensors, not one tensor)
    and every hyperparameter: ``add_param_group`` fills them in from the defaults, a group
    appended to ``param_groups`` directly has only what it was given (as in torch)."""
    missing = [key for key in ("params",) + HYPERPARAMETERS if key not in group]
    if missing:
        raise ValueError(f"param group {index} lacks {missing}: a group appended to "
                         f"param_groups directly gets no defaults; add it with "
                         f"optimizer.add_param_group(group), which fills them in")
    if isinstance(group["params"], Tensor):
        raise TypeError(f"param group {index}: params is a tensor, not a list of tensors; add "
                        f"the group with optimizer.add_param_group(group), which wraps it")


def check_stepped_group(index: int, group: Mapping, state: Mapping,
                        dtypes: Sequence[torch.dtype] = PARAM_DTYPES,
                        state_dtype: str = "fp32") -> bool:
    """Raise if the params of a group that have a grad cannot be stepped together.

    Checks the group's hyperparameters and keys of other optimizers (they may have been edited
    since it was added; a tensor ``lr`` must be on the CPU or on the params' device), that its
    stepped params share one device and have a dtype its backend steps (``dtypes``), that grads
    are dense, and each existing state entry against its param: exactly ``"step"`` and
    ``"accumulator"`` (and optionally ``"grad_sq_mean"``, and ``"accumulator_scales"`` with
    8-bit codes), the accumulator's metadata (its dtype the format of ``state_dtype``,
    ``compressed_state.accumulator_dtype``; not its values: reading them is a reduction, done
    where state enters, ``check_state_entry``) and the step counter; and that a DTensor param
    whose state is compressed can be (``check_compressible``). Returns whether the state must
    be settled before the step (``is_settled``): an accumulator on another device than its param
    (the param moved; the step moves its state along), or a step counter or gradient mean set
    to a number or to a tensor of another form (the step converts it). Grads are compared with
    their param too: torch checks them when a grad is assigned, but a later ``p.data = other``
    swap changes the param alone. (The optimizer runs these checks when a group changed since
    its last step, see ``group_plan.GroupPlan``.)
    """
    where = f"param group {index}: "
    check_hyperparameters(*(group[key] for key in HYPERPARAMETERS), where=where)
    check_foreign_keys(group, index)
    device, unsettled, strided = None, False, torch.strided
    exact = state_dtype == "fp32"
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        if device is None:
            device = p.device
        entry = state.get(p, _NO_STATE)
        has_state = bool(entry) or not isinstance(entry, dict)
        step = acc = mean = scales = None
        if has_state:
            step, acc, mean, scales = _state_entry(entry,
                                                   f"the state of param group {index}, param {i}")
        if (g.layout is not strided or p.dtype not in dtypes or p.device != device
                or g.dtype is not p.dtype or g.shape != p.shape
                or not p.is_contiguous() and torch._debug_has_internal_overlap(p) == 1
                or has_state and (getattr(acc, "dtype", None) is not (
                    _ACC_DTYPES[p.dtype] if exact else accumulator_dtype(p, state_dtype))
                                  or acc.shape != p.shape or acc.layout is not strided
                                  or not acc.is_contiguous()
                                  and (acc.dtype in COMPRESSED_ACC_DTYPES
                                       or torch._debug_has_internal_overlap(acc) == 1)
                                  or (scales is None) != (acc.dtype is not torch.uint8)
                                  or scales is not None and not _scales_fit(scales, acc))):
            _explain_stepped(f"param group {index}, param {i}", p, has_state, acc, scales,
                             device, dtypes, state_dtype)
        if not exact and type(p) is not torch.nn.Parameter and type(p) is not Tensor:
            check_compressible(p, state_dtype, f"param group {index}, param {i}")
        if has_state and not is_settled(step, acc, device, mean):
            check_step_count(step, f"the step of param group {index}, param {i}")
            for name, t in (("accumulator", acc), ("step", step), ("accumulator_scales", scales)):
                check_has_values(t, device, f"the {name} of param group {index}, param {i}")
            if mean is not None:
                check_grad_sq_mean(mean, device, f"the grad_sq_mean of param group {index}, "
                                                 f"param {i}")
            unsettled = True
    if device is not None:
        check_scalar_device(group["lr"], device, "lr", where)
    return unsettled


def check_compressible(param: Tensor, state_dtype: str, where: str) -> None:
    """Raise unless ``param``'s accumulator can be compressed as ``state_dtype`` says: a DTensor
    param's local shard must be a run of consecutive elements of the whole
    (``compressed_state.index_offset``), whose elements draw the whole param's random bits."""
    dtype = state_formats.compressed_dtype(param, state_dtype)
    if dtype is None or type(param) in (Tensor, torch.nn.Parameter):
        return
    try:
        index_offset(param)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _scales_fit(scales, acc: Tensor) -> bool:
    """Whether ``scales`` are the block scales of 8-bit codes ``acc``: a contiguous float32
    tensor of one element per block, on the codes' device."""
    return (type(scales) is Tensor and scales.dtype is torch.float32 and scales.dim() == 1
            and scales.shape[0] == state_formats.num_blocks(local_part(acc).numel())
            and scales.is_contiguous() and scales.device == local_part(acc).device)


def is_settled(step, acc: Tensor, device: torch.device, mean=None) -> bool:
    """Whether a param's state is in the form a step on ``device`` advances as it is: the
    accumulator on ``device``, ``step`` a 0-dim fp32 tensor there and the gradient mean
    ``mean``, if any, a 0-dim tensor of the accumulator's compute dtype there."""
    return (acc.device == device and type(step) is Tensor and step.dtype is torch.float32
            and step.dim() == 0 and step.device == device
            and (mean is None or type(mean) is Tensor and mean.dtype is _MEAN_DTYPES[acc.dtype]
                 and mean.dim() == 0 and mean.device == device))


def check_has_values(t, device: torch.device, where: str) -> None:
    """Raise if state tensor ``t`` is on the meta device, where it holds no values, for a param
    on ``device``, another device (its values cannot be moved there)."""
    if isinstance(t, Tensor) and t.device.type == "meta" and device.type != "meta":
        raise RuntimeError(f"{where} is on the meta device and holds no values, but its param "
                           f"is on {device}: there are no values to move there (drop the "
                           f"param's state to start it afresh)")


def _state_entry(entry, where: str) -> tuple:
    """``(step, accumulator, grad_sq_mean or None, accumulator_scales or None)`` of a non-empty
    state entry; raise unless it holds exactly ``STATE_KEYS`` and optionally
    ``OPTIONAL_STATE_KEYS``."""
    if not isinstance(entry, dict) or entry.keys() not in _STATE_KEY_SETS:
        keys = sorted(entry) if isinstance(entry, Mapping) else _describe(entry)
        raise ValueError(f"{where} must be a dict of exactly {list(STATE_KEYS)}, got {keys} "
                         f"(optional: {list(OPTIONAL_STATE_KEYS)})")
    return (entry["step"], entry["accumulator"], entry.get("grad_sq_mean"),
            entry.get("accumulator_scales"))


_ACC_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
               torch.float32: torch.float32, torch.float64: torch.float64}
# The dtype of the gradient mean S beside an accumulator of each dtype: its compute dtype.
_MEAN_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                torch.bfloat16: torch.float32, torch.uint8: torch.float32}


def _explain_stepped(where: str, p: Tensor, has_state: bool, acc, scales,
                     device: torch.device, dtypes: Sequence[torch.dtype],
                     state_dtype: str) -> None:
    """Raise the error that names what ``check_stepped_group`` found wrong with ``p``."""
    if p.grad.is_sparse:
        raise TypeError(f"CLASSP does not support sparse gradients ({where})")
    if p.device != device:
        raise RuntimeError(f"{where} is on {p.device} but the group's first stepped param "
                           f"is on {device}: one group steps on one device")
    check_param(p, where)
    if p.dtype not in dtypes:
        raise TypeError(f"{where} is {p.dtype}; this group's backend steps "
                        f"{', '.join(str(d) for d in dtypes)}")
    check_grad(p, p.grad, f"the grad of {where}")
    if not has_state:
        return
    expected = accumulator_dtype(p, state_dtype)
    if expected not in COMPRESSED_ACC_DTYPES:
        check_accumulator(p, acc, f"the accumulator of {where}", same_device=False)
    elif not isinstance(acc, Tensor) or acc.dtype != expected:
        raise TypeError(f"the accumulator of {where} must be a {expected} tensor under "
                        f"state_dtype={state_dtype!r}, got {_describe(acc)}")
    else:
        check_accumulator(p, acc, f"the accumulator of {where}", same_device=False,
                          compressed=True)
    if acc.dtype == torch.uint8:
        check_scales(scales, acc, f"the accumulator_scales of {where}")
    elif scales is not None:
        raise ValueError(f"the state of {where} holds 'accumulator_scales', which only 8-bit "
                         f"(uint8) accumulator codes have; its accumulator is {acc.dtype}")


def check_scales(scales, acc: Tensor, where: str) -> None:
    """Raise unless ``scales`` are the block scales of the 8-bit codes ``acc`` (``_scales_fit``;
    their values are checked where state enters, ``check_state_entry``)."""
    if scales is None:
        raise ValueError(f"{where} are missing: 8-bit (uint8) accumulator codes need one float32 "
                         f"scale per block of {state_formats.BLOCK} elements")
    blocks = state_formats.num_blocks(local_part(acc).numel())
    if (not isinstance(scales, Tensor) or scales.dtype != torch.float32
            or scales.shape != (blocks,) or scales.layout != torch.strided):
        raise TypeError(f"{where} must be a float32 tensor of shape ({blocks},) (one scale per "
                        f"block of {state_formats.BLOCK} accumulator elements), got "
                        f"{_describe(scales)}")
    if not scales.is_contiguous():
        raise ValueError(f"{where} must be a contiguous tensor")
    if scales.device != local_part(acc).device:
        raise RuntimeError(f"{where} is on {scales.device}, expected the accumulator's device "
                           f"{local_part(acc).device}")


def check_state_dict(state_dict, groups: Sequence[Mapping], state_dtype: str = "fp32") -> None:
    """Raise if ``state_dict`` cannot be loaded into an optimizer with param groups ``groups``
    and accumulators in the format of ``state_dtype``.

    Checks the layout (``"state"`` and ``"param_groups"``), the number of groups and of params
    per group, each group's hyperparameters (those of ``ADDED_HYPERPARAMETERS`` may be
    missing; a tensor ``lr`` on the CPU or on the group's params' device) and foreign keys, and
    each param's state (``check_state_entry``, values included; a DTensor param's state in the
    format, ``check_compressible``).
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups', got "
                         f"{_describe(state_dict)}")
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, Sequence) or not isinstance(state, Mapping):
        raise ValueError("state_dict['param_groups'] must be a list and state_dict['state'] a dict")
    if len(saved_groups) != len(groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                         f"{len(groups)}")
    params_of = {}
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        missing = [key for key in ("params",) + HYPERPARAMETERS
                   if key not in saved and key not in ADDED_HYPERPARAMETERS]
        if missing:
            raise ValueError(f"state_dict['param_groups'][{index}] lacks {missing}: not a CLASSP "
                             f"state dict (keys: {sorted(saved)})")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"state_dict['param_groups'][{index}] has {len(saved['params'])} "
                             f"params, this optimizer's group {index} has {len(group['params'])}")
        where = f"state_dict['param_groups'][{index}]: "
        check_hyperparameters(*(saved.get(key, ADDED_HYPERPARAMETERS.get(key))
                                for key in HYPERPARAMETERS), where=where)
        check_lr_placement(saved["lr"], group["params"], where)
        check_lr_value(saved["lr"], where)
        check_foreign_keys(saved, index)
        params_of.update((key, (p, f"param group {index}, param {i}: "))
                         for i, (key, p) in enumerate(zip(saved["params"], group["params"])))
    for key, entry in state.items():
        where = f"state_dict['state'][{key!r}]"
        if key not in params_of:
            raise ValueError(f"{where} belongs to no param of state_dict['param_groups']")
        param, location = params_of[key]
        check_state_entry(entry, param, location + where)
        if state_dtype != "fp32" and type(param) not in (Tensor, torch.nn.Parameter):
            check_compressible(param, state_dtype, location + where)


def check_state_values(state: Mapping, groups: Sequence[Mapping]) -> None:
    """Raise unless the state of every param of ``groups`` (in ``state``, keyed by param) is
    a CLASSP state entry for it (``check_state_entry``): state that enters other than through
    ``load_state_dict`` (an unpickled or copied optimizer)."""
    for index, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            entry = state.get(p, _NO_STATE)
            if entry or not isinstance(entry, dict):
                check_state_entry(entry, p, f"param group {index}, param {i}: state")


def check_state_entry(entry, param: Tensor, where: str) -> None:
    """Raise unless ``entry`` is a CLASSP state entry for ``param``: exactly ``"step"`` (a count,
    ``check_step_count``) and ``"accumulator"`` (a dense tensor of the param's shape: a real
    floating one, bfloat16 included, with no negative or NaN element, +inf kept as
    ``|g|**power`` may overflow; or uint8 8-bit codes, any values), and optionally
    ``"grad_sq_mean"`` (a one-element floating tensor, finite and >= 0) and, exactly with uint8
    codes, either ``"accumulator_scales"`` (``check_scales``, each 0 or a power of two ``2**E``,
    -115 <= E <= 127; ``classp_fused.state_formats``; of the local blocks for DTensor codes) or,
    as ``state_dict()`` gives for a DTensor param, ``"accumulator_exponents"`` (int8, per
    element, laid out like the codes: ``sharded_codes.check_exponents``).

    The values of tensors that hold data are read (a reduction per accumulator), so this runs
    where state enters, never at a step.
    """
    if not isinstance(entry, Mapping) or frozenset(entry) not in _SAVED_KEY_SETS:
        keys = sorted(entry) if isinstance(entry, Mapping) else _describe(entry)
        raise ValueError(f"{where} must hold exactly {list(STATE_KEYS)}, got {keys}: "
                         f"not a CLASSP state dict (optional: {list(OPTIONAL_STATE_KEYS)}, or "
                         f"{EXPONENTS_KEY!r} in place of 'accumulator_scales')")
    check_step_count(entry["step"], f"{where}['step']")
    check_has_values(entry["step"], param.device, f"{where}['step']")
    if "grad_sq_mean" in entry:
        check_grad_sq_mean(entry["grad_sq_mean"], param.device, f"{where}['grad_sq_mean']")
    acc, scales = entry["accumulator"], entry.get("accumulator_scales")
    exponents = entry.get(EXPONENTS_KEY)
    where_exponents = f"{where}[{EXPONENTS_KEY!r}]"
    where, where_scales = f"{where}['accumulator']", f"{where}['accumulator_scales']"
    if not isinstance(acc, Tensor) or not (acc.is_floating_point() or acc.dtype == torch.uint8):
        raise TypeError(f"{where} must be a floating-point tensor (or uint8 8-bit codes), got "
                        f"{_describe(acc)}")
    if acc.layout != torch.strided:
        raise TypeError(f"{where} must be a dense tensor, got layout {acc.layout}")
    if acc.shape != param.shape:
        raise ValueError(f"{where} has shape {tuple(acc.shape)}, expected the param's "
                         f"{tuple(param.shape)}")
    check_has_values(acc, param.device, where)
    codes = acc.dtype == torch.uint8
    if codes and exponents is not None:
        check_has_values(exponents, param.device, where_exponents)
        check_exponents(exponents, acc, where_exponents)
        return
    if codes:
        check_scales(scales, acc, where_scales)
        check_has_values(scales, param.device, where_scales)
    elif scales is not None or exponents is not None:
        where_extra = where_scales if scales is not None else where_exponents
        raise ValueError(f"{where_extra}: only 8-bit (uint8) accumulator codes have block "
                         f"scales; the accumulator is {acc.dtype}")
    values = local_part(acc)
    if values.device.type == "meta" or is_fake(values):
        return
    if codes:  # every code is a value; a scale is +0 or 2**E, -115 <= E <= 127
        scale_bits = scales.view(torch.int32)
        exponent = scale_bits >> 23
        bad = (scale_bits != 0) & (((scale_bits & 0x7FFFFF) != 0) | (exponent < 12)
                                   | (exponent > 254))
        if bool(bad.any()):
            raise ValueError(f"{where_scales} has {int(bad.sum())} of its {scales.numel()} "
                             f"scales neither 0 nor a power of two 2**E with -115 <= E <= 127 "
                             f"(the 8-bit format's block scales)")
        return
    bad = ~(values >= 0)  # NaN compares False
    if bool(bad.any()):
        raise ValueError(f"{where} has {int(bad.sum())} of its {values.numel()} elements "
                         f"negative or NaN; an accumulator sums |g|**power, so it is >= 0 "
                         f"everywhere (a step on it would move params by NaN or uphill)")


def check_step_count(step, where: str) -> None:
    """Raise unless ``step`` is a count: a finite number >= 0 (not a bool), or a one-element
    real (floating or integer) tensor holding one. A tensor's value is read where it has one
    (not on the meta device, not a FakeTensor)."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"{where} must be a one-element real tensor or a number, got "
                             f"{_describe(step)}")
        step = local_part(step)
        if step.device.type == "meta" or is_fake(step):
            return
        step = step.item()
    if not (_is_real(step) and math.isfinite(step) and step >= 0):
        raise ValueError(f"{where} must be a finite non-negative count, got {step!r}")


def check_grad_sq_mean(mean, device: torch.device, where: str) -> None:
    """Raise unless ``mean`` (a param's relative-threshold gradient mean S, for a param on
    ``device``) is a one-element floating tensor holding a finite number >= 0. Its value is read
    where it has one (not on the meta device, not a FakeTensor)."""
    if not isinstance(mean, Tensor) or mean.numel() != 1 or not mean.is_floating_point():
        raise TypeError(f"{where} must be a one-element floating-point tensor, got "
                        f"{_describe(mean)}")
    check_has_values(mean, device, where)
    mean = local_part(mean)
    if mean.device.type == "meta" or is_fake(mean):
        return
    value = float(mean)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} must be a finite mean >= 0, got {value}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
