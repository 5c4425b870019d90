"""Continual-learning methods by name: an optimizer, an optional regularizer, task-boundary hooks.

Defaults are hand-set starting points; the digits benchmarks override them with tuned values
(``classp_fused.cl.benchmarks``, ``classp-fused tune``). Methods with a regularizer take
``penalty``: ``"explicit"`` (the papers': the penalty gradient joins the loss gradient) or
``"proximal"`` (the regularizer's proximal step after each optimizer step, stable for every
lambda); the regularizer is attached to the optimizer (``Regularizer.attach``), so every
``optimizer.step()`` applies it, inside the step kernel for CLASSP. Every method accepts
``per_task``: a list of param-group settings applied at the start of task i (the last entry
repeats), as in the published vision run (``apply_scaling`` and ``threshold`` change between
tasks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import warnings

import torch
from torch import nn
from torch.optim import Optimizer

from .. import CLASSP, EWC, MAS
from ..regularizers import StiffnessWarning

SGD_LR = 0.05
CLASSP_DEFAULTS = {"lr": 0.05, "threshold": 1e-4, "eps": 1e-5, "power": 1.0, "apply_scaling": True}
#: Per-sample empirical Fisher (the definition); the batch form underestimates it.
EWC_DEFAULTS = {"lam": 30.0, "fisher": "empirical", "per_sample": True, "penalty": "explicit"}
#: The original code's batch form of the importance, summed over tasks.
MAS_DEFAULTS = {"lam": 0.3, "accumulate": "sum", "per_sample": False, "penalty": "explicit"}
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

    def update_fraction(self) -> Optional[float]:
        """Fraction of parameter elements the last step updated (CLASSP only, else None)."""
        return self.optimizer.last_update_fraction if isinstance(self.optimizer, CLASSP) else None

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
                  power=hp["power"], apply_scaling=hp["apply_scaling"], **mode)


def _sgd(model: nn.Module, hp: dict) -> Optimizer:
    return torch.optim.SGD(model.parameters(), lr=hp["lr"])


def _ewc(model: nn.Module, hp: dict, **mode) -> EWC:
    return EWC(model, lam=hp["lam"], fisher=hp["fisher"], per_sample=hp["per_sample"], **mode)


def _mas(model: nn.Module, hp: dict) -> MAS:
    return MAS(model, lam=hp["lam"], accumulate=hp["accumulate"], per_sample=hp["per_sample"])


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


def resolve_hparams(name: str, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The method's defaults updated with ``overrides``; unknown names raise ValueError."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    spec = METHODS[name]
    hparams = dict(spec.defaults)
    for key, value in (overrides or {}).items():
        if key == "per_task" and not (isinstance(value, (list, tuple))
                                      and all(isinstance(v, Mapping) for v in value)):
            raise ValueError(f"method {name!r}: per_task must be a list of settings objects")
        if key != "per_task" and key not in spec.defaults:
            raise ValueError(f"method {name!r} has no hyperparameter {key!r}"
                             f" (it has {', '.join([*spec.defaults, 'per_task'])})")
        hparams[key] = value
    return hparams


def build_method(name: str, model: nn.Module, hparams: Mapping[str, Any]) -> Method:
    """Build method ``name`` for ``model`` with fully resolved ``hparams`` (see resolve_hparams);
    its regularizer, if any, is attached to its optimizer in the ``penalty`` form."""
    hp = dict(hparams)
    per_task = hp.pop("per_task", ())
    penalty = hp.pop("penalty", "explicit")
    if penalty not in PENALTIES:
        raise ValueError(f"method {name!r}: penalty must be one of {', '.join(PENALTIES)},"
                         f" got {penalty!r}")
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
