"""Continual-learning methods by name: an optimizer, an optional regularizer, task-boundary hooks.

Defaults are hand-set starting points; the digits benchmarks override them with tuned values
(``classp_fused.cl.benchmarks``, ``classp-fused tune``). Methods with a regularizer take
``penalty``: ``"explicit"`` (the papers': the penalty gradient joins the loss gradient) or
``"proximal"`` (the regularizer's proximal step after each optimizer step, stable for every
lambda); the regularizer is attached to the optimizer (``Regularizer.attach``), so every
``optimizer.step()`` applies it, inside the step kernel for CLASSP. Every method accepts
``per_task``: a list of values of its optimizer's hyperparameters applied at the start of task i
(the last entry repeats), as in the published vision run (``apply_scaling`` and ``threshold``
change between tasks). ``resolve_hparams`` checks every value, per_task's included, against
``HPARAM_CHECKS`` before anything is built or run.
"""
from __future__ import annotations

import math
import numbers
import reprlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from .. import CLASSP, EWC, MAS
from ..regularizers import StiffnessWarning

SGD_LR = 0.05
CLASSP_DEFAULTS = {"lr": 0.05, "threshold": 1e-4, "eps": 1e-5, "power": 1.0,
                   "apply_scaling": True, "relative_threshold": 0.0, "state_dtype": "fp32"}
#: Per-sample empirical Fisher (the definition); the batch form underestimates it.
#: ``importance_dtype`` is the regularizer's ``state_dtype`` (how it stores the importance).
EWC_DEFAULTS = {"lam": 30.0, "fisher": "empirical", "per_sample": True, "penalty": "explicit",
                "importance_dtype": "param"}
#: The original code's batch form of the importance, summed over tasks.
MAS_DEFAULTS = {"lam": 0.3, "accumulate": "sum", "per_sample": False, "penalty": "explicit",
                "importance_dtype": "param"}
PENALTIES = ("explicit", "proximal")
#: The published reference code's defaults; its per-tensor gate makes threshold 0.5 a no-op.
CLASSP_PUBLISHED = {"lr": 0.2, "threshold": 0.5, "eps": 1e-5, "power": 1.0, "apply_scaling": True}


@dataclass
class Method:
    """An optimizer plus an optional regularizer attached to it, driven through a task
    sequence."""

    name: str
    optimizer: Optimizer
    regularizer: Optional[EWC | MAS] = None
    per_task: Sequence[Mapping[str, Any]] = ()

    def start_task(self, index: int) -> None:
        """Apply the ``per_task`` param-group settings of task ``index`` (last entry repeats)."""
        if self.per_task:
            settings = self.per_task[min(index, len(self.per_task) - 1)]
            for group in self.optimizer.param_groups:
                group.update(settings)

    def end_task(self, batches) -> bool:
        """Consolidate the regularizer on the finished task's (input, label) batches.

        Returns True when the next explicit penalty step is unstable (step size times
        stiffness at least 2 somewhere: it will oscillate and diverge), else False.
        """
        if self.regularizer is None:
            return False
        explicit = self.regularizer.penalty_form == "explicit"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StiffnessWarning)
            self.regularizer.consolidate(batches, optimizer=self.optimizer if explicit else None)
        return any(issubclass(w.category, StiffnessWarning) for w in caught)

    @property
    def reports_update_density(self) -> bool:
        """Whether ``update_fraction`` reports a value (the optimizer is CLASSP)."""
        return isinstance(self.optimizer, CLASSP)

    def update_fraction(self) -> Optional[float]:
        """Fraction of parameter elements the last step updated (CLASSP only, else None)."""
        return self.optimizer.last_update_fraction if self.reports_update_density else None

    def state_bytes(self) -> int:
        """Bytes of optimizer state plus regularizer state (importances and anchors)."""
        if isinstance(self.optimizer, CLASSP):
            total = self.optimizer.state_bytes()
        else:
            total = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                        for t in state.values() if isinstance(t, torch.Tensor))
        return total + (self.regularizer.state_bytes() if self.regularizer is not None else 0)


Builder = Callable[[nn.Module, dict], tuple[Optimizer, Optional[EWC | MAS]]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what it is, its default hyperparameters, how to build it."""

    name: str
    summary: str
    defaults: Mapping[str, Any]
    build: Builder


def _classp(model: nn.Module, hp: dict, **mode) -> CLASSP:
    return CLASSP(model.parameters(), lr=hp["lr"], threshold=hp["threshold"], eps=hp["eps"],
                  power=hp["power"], apply_scaling=hp["apply_scaling"],
                  relative_threshold=hp.get("relative_threshold", 0.0),
                  state_dtype=hp.get("state_dtype", "fp32"), **mode)


def _sgd(model: nn.Module, hp: dict) -> Optimizer:
    return torch.optim.SGD(model.parameters(), lr=hp["lr"])


def _ewc(model: nn.Module, hp: dict, **mode) -> EWC:
    return EWC(model, lam=hp["lam"], fisher=hp["fisher"], per_sample=hp["per_sample"],
               state_dtype=hp.get("importance_dtype", "param"), **mode)


def _mas(model: nn.Module, hp: dict) -> MAS:
    return MAS(model, lam=hp["lam"], accumulate=hp["accumulate"], per_sample=hp["per_sample"],
               state_dtype=hp.get("importance_dtype", "param"))


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("sgd", "plain SGD (lower bound)", {"lr": SGD_LR},
               lambda m, hp: (_sgd(m, hp), None)),
    MethodSpec("adam", "Adam", {"lr": 1e-3},
               lambda m, hp: (torch.optim.Adam(m.parameters(), lr=hp["lr"]), None)),
    MethodSpec("adagrad", "AdaGrad (CLASSP with p=2 and no threshold)", {"lr": 0.03},
               lambda m, hp: (torch.optim.Adagrad(m.parameters(), lr=hp["lr"]), None)),
    MethodSpec("classp", "CLASSP, per-element threshold (the paper's equation)",
               CLASSP_DEFAULTS, lambda m, hp: (_classp(m, hp), None)),
    MethodSpec("classp-legacy", "CLASSP as the published code runs it (per-tensor gate)",
               CLASSP_PUBLISHED,
               lambda m, hp: (_classp(m, hp, mode="legacy", backend="torch"), None)),
    MethodSpec("ewc", "SGD + EWC, a penalty per task (kept in constant memory)",
               {"lr": SGD_LR, **EWC_DEFAULTS},
               lambda m, hp: (_sgd(m, hp), _ewc(m, hp, mode="separate"))),
    MethodSpec("online-ewc", "SGD + online EWC, one decayed Fisher and anchor",
               {"lr": SGD_LR, **EWC_DEFAULTS, "gamma": 1.0},
               lambda m, hp: (_sgd(m, hp), _ewc(m, hp, mode="online", gamma=hp["gamma"]))),
    MethodSpec("mas", "SGD + MAS, importance summed over tasks",
               {"lr": SGD_LR, **MAS_DEFAULTS}, lambda m, hp: (_sgd(m, hp), _mas(m, hp))),
    MethodSpec("classp+mas", "CLASSP optimizer plus the MAS penalty",
               {**CLASSP_DEFAULTS, **MAS_DEFAULTS}, lambda m, hp: (_classp(m, hp), _mas(m, hp))),
)}


#: A check returns what a hyperparameter's value must be, or None when the value is fine.
Check = Callable[[Any], Optional[str]]


def _number(low: float, *, above: bool = False, high: float = math.inf) -> Check:
    expected = (f"a finite number {'>' if above else '>='} {low:g}"
                + (f" and <= {high:g}" if high < math.inf else ""))

    def check(value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return expected
        try:
            x = float(value)
        except OverflowError:  # an int beyond float range
            return expected
        fine = math.isfinite(x) and (x > low if above else x >= low) and x <= high
        return None if fine else expected
    return check


def _one_of(*choices: Any) -> Check:
    expected = f"one of {', '.join(map(str, choices))}"

    def check(value: Any) -> Optional[str]:
        fine = any(type(value) is type(choice) and value == choice for choice in choices)
        return None if fine else expected
    return check


#: The check of every hyperparameter any method has.
HPARAM_CHECKS: dict[str, Check] = {
    "lr": _number(0.0), "threshold": _number(0.0), "eps": _number(0.0),
    "relative_threshold": _number(0.0), "state_dtype": _one_of("fp32", "bf16", "8bit"),
    "power": _number(0.0, above=True), "apply_scaling": _one_of(True, False),
    "lam": _number(0.0), "gamma": _number(0.0, above=True, high=1.0),
    "fisher": _one_of("empirical", "exact"), "per_sample": _one_of(True, False),
    "accumulate": _one_of("sum", "ema"), "penalty": _one_of(*PENALTIES),
    "importance_dtype": _one_of("param", "bf16", "8bit")}


def _check_value(key: str, value: Any, where: str = "") -> None:
    expected = HPARAM_CHECKS[key](value)
    if expected is not None:
        raise ValueError(f"{where}{key} must be {expected}, got {reprlib.repr(value)}")


def _check_per_task(spec: MethodSpec, per_task: Any) -> None:
    if not (isinstance(per_task, (list, tuple))
            and all(isinstance(v, Mapping) for v in per_task)):
        raise ValueError(f"method {spec.name!r}: per_task must be a list of settings objects,"
                         f" got {reprlib.repr(per_task)}")
    for index, settings in enumerate(per_task):
        for key, value in settings.items():
            if key not in spec.defaults:
                raise ValueError(f"method {spec.name!r}: per_task[{index}] sets {key!r}, which"
                                 f" is not one of its hyperparameters"
                                 f" ({', '.join(spec.defaults)})")
            _check_value(key, value, f"per_task[{index}].")


def resolve_hparams(name: str, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The method's defaults updated with ``overrides``, every value checked.

    Raises ValueError naming the method, hyperparameter or per_task entry that is unknown or
    out of range (a number that is not finite counts as out of range).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    spec = METHODS[name]
    hparams = dict(spec.defaults)
    for key, value in (overrides or {}).items():
        if key != "per_task" and key not in spec.defaults:
            raise ValueError(f"method {name!r} has no hyperparameter {key!r}"
                             f" (it has {', '.join([*spec.defaults, 'per_task'])})")
        hparams[key] = value
    for key, value in hparams.items():
        if key == "per_task":
            _check_per_task(spec, value)
        else:
            _check_value(key, value)
    return hparams


def build_method(name: str, model: nn.Module, hparams: Mapping[str, Any]) -> Method:
    """Build method ``name`` for ``model`` with fully resolved ``hparams`` (see resolve_hparams);
    its regularizer, if any, is attached to its optimizer in the ``penalty`` form."""
    hp = dict(hparams)
    per_task = hp.pop("per_task", ())
    penalty = hp.pop("penalty", "explicit")
    optimizer, regularizer = METHODS[name].build(model, hp)
    for settings in per_task:
        unknown = set(settings) - set(optimizer.defaults)
        if unknown:
            raise ValueError(f"method {name!r}: per_task settings {sorted(unknown)} are not"
                             f" param-group settings of {type(optimizer).__name__}")
    if regularizer is not None:
        regularizer.penalty_form = penalty
        regularizer.attach(optimizer)
    return Method(name, optimizer, regularizer, per_task)
