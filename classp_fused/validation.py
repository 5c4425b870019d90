"""Input validation for the CLASSP step and optimizer: every check raises before anything changes.

Hyperparameters, params and one step's tensor lists (the op contract), the param groups and
stepped tensors of an optimizer step, and a state dict before it is loaded. Errors are
``TypeError`` (wrong kind of object), ``ValueError`` (bad value or shape) or ``RuntimeError``
(wrong device) and name the offending argument or entry.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .backends.step_spec import PENALTY_FORMS, Penalty, StepSpec
from .reference import compute_dtype

PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HYPERPARAMETERS = ("lr", "threshold", "eps", "power", "apply_scaling", "relative_threshold")
#: Hyperparameters a state dict saved before they existed lacks, with the value it then had.
ADDED_HYPERPARAMETERS = {"relative_threshold": 0.0}
STATE_KEYS = ("step", "accumulator")
#: State a param has only while a feature uses it (the relative threshold's gradient mean).
OPTIONAL_STATE_KEYS = ("grad_sq_mean",)
# Keys other torch optimizers put in param groups for features CLASSP does not have. Set to an
# "off" value (0, False, None) they are ignored with a warning; any other value is refused.
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
}


def _is_real(x) -> bool:
    """A real Python or numpy number (not a bool, not a string, not a tensor)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_lr(lr, where: str = "") -> None:
    """Raise unless ``lr`` is a finite non-negative number or a one-element floating tensor.

    The value of a tensor ``lr`` is checked only when it holds data on the CPU (reading it from
    an accelerator would synchronize every step; a FakeTensor has no value).
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}lr as a tensor must hold one element, got shape "
                             f"{tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"{where}lr as a tensor must be floating point, got {lr.dtype}")
        if lr.device.type != "cpu" or is_fake(lr):
            return
        value = float(lr)
    elif _is_real(lr):
        value = float(lr)
    else:
        raise ValueError(f"{where}lr must be a finite non-negative number, got {lr!r}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{where}lr must be a finite non-negative number, got {value}")


def check_hyperparameters(lr, threshold, eps, power, apply_scaling=True, relative_threshold=0.0,
                          where: str = "") -> None:
    """Raise ValueError naming the first out-of-range hyperparameter (``where`` prefixes it)."""
    check_lr(lr, where)
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


def check_accumulator(param: Tensor, acc, where: str, same_device: bool = True) -> None:
    """Raise unless ``acc`` is the param's accumulator: param-shaped, fp32 (fp64 for fp64)."""
    if not isinstance(acc, Tensor) or acc.dtype != compute_dtype(param):
        raise TypeError(f"{where} must be a {compute_dtype(param)} tensor "
                        f"(accumulators stay fp32 for fp16/bf16/fp32 params)")
    _check_like_param(param, acc, where, same_device)


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
    check_hyperparameters(spec.lr, spec.threshold, spec.eps, spec.power, spec.apply_scaling,
                          spec.relative_threshold)
    for name, t in (("grad_scale", spec.grad_scale), ("found_inf", spec.found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1):
            raise ValueError(f"{name} must be a one-element tensor or None")
    for i, (p, g, a) in enumerate(zip(params, grads, accs)):
        check_param(p, f"params[{i}]")
        if p.device != params[0].device:
            raise RuntimeError(f"params[{i}] is on {p.device}, expected params[0]'s device "
                               f"{params[0].device} (one step runs on one device)")
        check_grad(p, g, f"grads[{i}]")
        check_accumulator(p, a, f"accs[{i}]")
    if spec.penalty is not None:
        check_penalty(params, spec.penalty)
    if spec.grad_sq_means is not None or spec.relative_threshold > 0:
        check_grad_sq_means(params, spec.grad_sq_means)


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
            if t.dtype != p.dtype:
                raise TypeError(f"{entry} has dtype {t.dtype}, expected the param's {p.dtype}")
            _check_like_param(p, t, entry)


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
        if not _is_off(group[key]):
            raise ValueError(f"param group {index}: {key}={group[key]!r} is not supported; "
                             f"{FOREIGN_KEYS[key]}. Set it to 0 or leave it out")


def _is_off(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_off(v) for v in value)
    return value is None or (not isinstance(value, (str, Tensor)) and value == 0)


def check_stepped_group(index: int, group: Mapping, state: Mapping,
                        dtypes: Sequence[torch.dtype] = PARAM_DTYPES) -> bool:
    """Raise if the params of a group that have a grad cannot be stepped together.

    Checks the group's hyperparameters (they may have been edited since it was added), that
    its stepped params share one device and have a dtype its backend steps (``dtypes``), that
    grads are dense, and each existing accumulator against its param. Returns whether an
    accumulator sits on another device than its param (the param moved; the step moves its
    state along). Grads are compared with their param too: torch checks them when a grad is
    assigned, but a later ``p.data = other`` swap changes the param alone. (The optimizer runs
    these checks when a group changed since its last step, see ``group_plan.GroupPlan``.)
    """
    check_hyperparameters(*(group[key] for key in HYPERPARAMETERS),
                          where=f"param group {index}: ")
    device, moved, strided = None, False, torch.strided
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        if device is None:
            device = p.device
        entry = state.get(p)
        acc = entry["accumulator"] if entry else None
        if (g.layout is not strided or p.dtype not in dtypes or p.device != device
                or g.dtype is not p.dtype or g.shape != p.shape
                or acc is not None and (acc.dtype is not _ACC_DTYPES[p.dtype]
                                        or acc.shape != p.shape)):
            _explain_stepped(f"param group {index}, param {i}", p, acc, device, dtypes)
        moved = moved or acc is not None and acc.device != device
    return moved


_ACC_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
               torch.float32: torch.float32, torch.float64: torch.float64}


def _explain_stepped(where: str, p: Tensor, acc, device: torch.device,
                     dtypes: Sequence[torch.dtype]) -> None:
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
    if acc is not None:
        check_accumulator(p, acc, f"the accumulator of {where}", same_device=False)


def check_state_dict(state_dict, groups: Sequence[Mapping]) -> None:
    """Raise if ``state_dict`` cannot be loaded into an optimizer with param groups ``groups``.

    Checks the layout (``"state"`` and ``"param_groups"``), the number of groups and of params
    per group, each group's hyperparameters (those of ``ADDED_HYPERPARAMETERS`` may be
    missing) and foreign keys, and each param's state: ``"step"`` (a tensor of one element or a
    Python number), ``"accumulator"`` (a real floating tensor of the param's shape) and
    optionally ``"grad_sq_mean"`` (a one-element floating tensor, finite and >= 0).
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
        check_hyperparameters(*(saved.get(key, ADDED_HYPERPARAMETERS.get(key))
                                for key in HYPERPARAMETERS),
                              where=f"state_dict['param_groups'][{index}]: ")
        check_foreign_keys(saved, index)
        params_of.update(zip(saved["params"], group["params"]))
    for key, entry in state.items():
        where = f"state_dict['state'][{key!r}]"
        if key not in params_of:
            raise ValueError(f"{where} belongs to no param of state_dict['param_groups']")
        if not isinstance(entry, Mapping) or not (
                set(STATE_KEYS) <= set(entry) <= set(STATE_KEYS + OPTIONAL_STATE_KEYS)):
            keys = sorted(entry) if isinstance(entry, Mapping) else _describe(entry)
            raise ValueError(f"{where} must hold exactly {list(STATE_KEYS)}, got {keys}: "
                             f"not a CLASSP state dict (optional: {list(OPTIONAL_STATE_KEYS)})")
        _check_saved_step(entry["step"], f"{where}['step']")
        acc, param = entry["accumulator"], params_of[key]
        if not isinstance(acc, Tensor) or not acc.is_floating_point():
            raise TypeError(f"{where}['accumulator'] must be a floating-point tensor, got "
                            f"{_describe(acc)}")
        if acc.shape != param.shape:
            raise ValueError(f"{where}['accumulator'] has shape {tuple(acc.shape)}, expected the "
                             f"param's {tuple(param.shape)}")
        if "grad_sq_mean" in entry:
            _check_saved_grad_sq_mean(entry["grad_sq_mean"], f"{where}['grad_sq_mean']")


def _check_saved_step(step, where: str) -> None:
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"{where} must be a one-element real tensor or a number, got "
                             f"{_describe(step)}")
        if step.device.type != "cpu" or is_fake(step):
            return
        step = step.item()
    if not (_is_real(step) and math.isfinite(step) and step >= 0):
        raise ValueError(f"{where} must be a finite non-negative count, got {step!r}")


def _check_saved_grad_sq_mean(mean, where: str) -> None:
    if not isinstance(mean, Tensor) or mean.numel() != 1 or not mean.is_floating_point():
        raise TypeError(f"{where} must be a one-element floating-point tensor, got "
                        f"{_describe(mean)}")
    if is_fake(mean):
        return
    value = float(mean)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} must be a finite mean >= 0, got {value}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
