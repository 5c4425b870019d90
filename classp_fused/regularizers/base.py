"""Shared machinery of the importance-weighted quadratic regularizers (MAS, EWC).

A regularizer keeps a list of tasks, each a pair of dicts keyed by parameter name:
importance Omega and anchor theta*. Its penalty is ``scale * sum_tasks sum Omega * (theta -
theta*)^2``. Only parameters with ``requires_grad=True`` are regularized.

Under FSDP2 the parameters are DTensors: ``add_penalty_grad_`` and ``penalty`` work on each
rank's local shard (``penalty`` is then this rank's share). Importance is computed by
``consolidate`` on the unsharded model (one copy per rank, each rank on its part of the
data); after ``fully_shard`` the state tensors become DTensors laid out like their parameters
(same mesh and placements) the first time they are used or ``state_dict`` is called, so the
state can be saved and loaded with torch.distributed.checkpoint.
"""
from __future__ import annotations

import abc
import contextlib
import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor, distribute_tensor = (), None

# Bound on the per-sample gradient elements held at once (512 MiB in float32); larger vmap
# chunks run markedly faster per sample on CPU than small ones.
PER_SAMPLE_ELEMENTS = 2**27

# One remembered task: (importance, anchor), each a dict parameter name -> tensor.
Task = tuple


def _local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (full-shaped, plain or DTensor) laid out like ``p``: on p's mesh and placements
    when ``p`` is a DTensor, else a plain tensor on p's device."""
    if isinstance(p, DTensor):
        if isinstance(t, DTensor):
            return t.redistribute(p.device_mesh, p.placements)
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return (t.full_tensor() if isinstance(t, DTensor) else t).to(p.device)


def check_choice(name: str, value, choices: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """Return ``value`` as a float; raise naming ``name`` unless it is finite and in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != math.inf else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


class Regularizer(abc.ABC):
    """Base class: anchors, importance-pass context, penalty and its gradient, state.

    Subclasses implement ``_importance_sums(batches, params)`` (per-parameter sums over
    samples and the sample count) and ``_combine(new, anchor)`` (how a new task's importance
    enters ``self.tasks``), and set ``_scale`` (the penalty's factor in front of the sum).
    Those using ``_add_per_sample`` also define ``_sample_losses``, ``_sample_weights`` and
    ``_statistic``.
    """

    _scale: float
    # Elementwise statistic of a per-sample gradient (torch.abs, torch.square); takes ``out=``.
    _statistic = None

    def __init__(self, model: nn.Module, lam: float, per_sample: bool, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.lam = check_number("lam", lam, 0.0, math.inf)
        self.per_sample = bool(per_sample)
        self.process_group = process_group
        self.tasks: list[Task] = []

    # ----------------------------------------------------------------- importance pass
    def consolidate(self, data: Iterable) -> None:
        """Compute the importance on ``data`` at a task boundary and anchor the current params.

        ``data`` is an iterable of batches (a DataLoader, a list); a batch is an input tensor
        or an (input, label, ...) sequence; a single tensor counts as one batch. The pass runs
        in eval() mode with the model's training flags, requires_grad flags, buffers and
        existing .grad left exactly as found. When torch.distributed is initialized (or a
        process group was given) the sums and sample counts are all-reduced, so every rank
        ends with the importance of all ranks' data; every rank must call it. Give the
        regularizer the plain module (``ddp.module``), not a DistributedDataParallel wrapper.
        """
        params = self._regularized_params()
        if any(isinstance(p, DTensor) for p in params.values()):
            raise TypeError("consolidate needs the unsharded model: run it before fully_shard")
        with self._importance_pass():
            sums, count = self._importance_sums(self._batches(data), params)
        count = self._all_reduce_(list(sums.values()), count)
        new = {name: (s / count).to(params[name].dtype) for name, s in sums.items()}
        anchor = {name: p.detach().clone() for name, p in params.items()}
        self._combine(new, anchor)

    def _regularized_params(self) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model has no parameters with requires_grad=True to regularize")
        return params

    @contextlib.contextmanager
    def _importance_pass(self) -> Iterator[None]:
        """eval() mode and grad enabled; training flags, requires_grad and buffers restored."""
        training = [(m, m.training) for m in self.model.modules()]
        requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        buffers = [(m, n, b, b.clone()) for m in self.model.modules()
                   for n, b in m.named_buffers(recurse=False)]
        self.model.eval()
        try:
            with torch.enable_grad():
                yield
        finally:
            for module, flag in training:
                module.training = flag
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            with torch.no_grad():
                for module, name, buffer, saved in buffers:
                    buffer.copy_(saved)
                    setattr(module, name, buffer)

    def _batches(self, data) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Yield (input, label or None) with tensors on the model's device; raise if empty."""
        device = next(self.model.parameters()).device
        empty = True
        for batch in [data] if isinstance(data, Tensor) else data:
            if isinstance(batch, Tensor):
                x, y = batch, None
            elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
                x, y = batch[0], batch[1] if len(batch) > 1 else None
            else:
                raise TypeError("data must yield input tensors or (input, label) sequences, "
                                f"got a batch of type {type(batch).__name__}")
            empty = False
            yield x.to(device), None if y is None else y.to(device)
        if empty:
            raise ValueError("data is empty: consolidate needs at least one batch")

    def _all_reduce_(self, sums: list[Tensor], count: int) -> float:
        """Sum ``sums`` in place and ``count`` across ranks when distributed; return the count."""
        if self.process_group is None and not (dist.is_available() and dist.is_initialized()):
            return float(count)
        for s in sums:
            dist.all_reduce(s, group=self.process_group)
        total = torch.tensor(float(count), dtype=torch.float64, device=sums[0].device)
        dist.all_reduce(total, group=self.process_group)
        return total.item()

    @staticmethod
    def _sample_chunk(params: dict[str, Tensor], outputs_per_sample: int = 1) -> int:
        """Samples per vmap call so that per-sample gradients stay within PER_SAMPLE_ELEMENTS."""
        numel = outputs_per_sample * sum(p.numel() for p in params.values())
        return max(1, PER_SAMPLE_ELEMENTS // numel)

    @staticmethod
    def _accumulator(p: Tensor) -> Tensor:
        """A zero sum for ``p`` in at least float32."""
        return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))

    # ----------------------------------------------------------------- per-sample sums
    def _sample_losses(self, output: Tensor, y: Tensor | None) -> Tensor:
        """Per-sample scalars L_kc, shape (batch, outputs), from the model output."""
        raise NotImplementedError

    def _sample_weights(self, losses: Tensor) -> Tensor | None:
        """Weights w_kc of the per-sample terms from the detached ``losses``; None for ones."""
        return None

    def _add_per_sample(self, x: Tensor, y: Tensor | None, params, sums) -> None:
        """Add sum_k sum_c w_kc stat(dL_kc / d theta) over the batch ``x`` to ``sums``.

        Parameters of nn.Linear layers that are called once per forward on 2-D inputs and
        used nowhere else take the exact outer-product form from one batch backward per
        output column (``_add_linear_per_sample``); the others take per-sample gradients from
        torch.func vmap, with the former held fixed. Samples must not interact in eval().
        """
        handled, outputs = self._add_linear_per_sample(x, y, params, sums)
        rest = {name: p.detach() for name, p in params.items() if name not in handled}
        if rest:
            fixed = {name: params[name].detach() for name in handled}
            self._add_vmap_per_sample(x, y, rest, fixed, outputs, sums)

    def _add_linear_per_sample(self, x, y, params, sums) -> tuple[set[str], int]:
        """Per-sample sums of the eligible Linear parameters; return their names and outputs.

        For a Linear layer on (batch, in) inputs X with output gradients Delta (row k:
        dL_kc / dy_k, all rows from one backward of sum_k L_kc), the per-sample weight gradient
        is delta_k x_k^T, so for stat = abs or square the sum over samples is
        (w_c * stat(Delta))^T @ stat(X), and the bias sum is that of w_c * stat(Delta).
        """
        names = {}
        for prefix, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
                local = {n: f"{prefix}.{n}" if prefix else n
                         for n, _ in module.named_parameters(recurse=False)}
                local = {n: full for n, full in local.items() if full in params}
                if local:
                    names[module] = local
        calls = {module: [] for module in names}

        def hook(module, inputs, output):
            # The added zero's gradient is dL/dy even if later ops modify the output in place.
            probe = torch.zeros_like(output, requires_grad=True)
            calls[module].append((inputs[0] if inputs else None, probe))
            return output + probe

        handles = [module.register_forward_hook(hook, prepend=True) for module in names]
        try:
            losses = self._sample_losses(self.model(x), y)
        finally:
            for handle in handles:
                handle.remove()
        uses = _parameter_uses(losses.grad_fn)
        layers = [(names[m], *calls[m][0]) for m in names
                  if len(calls[m]) == 1 and isinstance(calls[m][0][0], Tensor)
                  and calls[m][0][0].dim() == 2
                  and all(uses.get(id(params[full])) == 1 for full in names[m].values())]
        outputs = losses.shape[1]
        if not layers:
            return set(), outputs
        weights = self._sample_weights(losses.detach())
        inputs = [self._statistic(x_in.detach()) for _, x_in, _ in layers]
        for c in range(outputs):
            deltas = torch.autograd.grad(losses[:, c].sum(), [probe for *_, probe in layers],
                                         retain_graph=c + 1 < outputs, allow_unused=True)
            for (local, _, _), x_stat, delta in zip(layers, inputs, deltas):
                if delta is None:
                    continue
                d = self._statistic(delta)
                if weights is not None:
                    d.mul_(weights[:, c, None])
                if "weight" in local:
                    sums[local["weight"]] += d.T @ x_stat
                if "bias" in local:
                    sums[local["bias"]] += d.sum(0)
        return {full for local, _, _ in layers for full in local.values()}, outputs

    def _add_vmap_per_sample(self, x, y, rest, fixed, outputs: int, sums) -> None:
        """Per-sample sums of the parameters ``rest`` from torch.func per-sample Jacobians."""
        def sample_losses(p, x_k, y_k):
            output = functional_call(self.model, {**fixed, **p}, (x_k.unsqueeze(0),))
            losses = self._sample_losses(output, None if y_k is None else y_k.unsqueeze(0))[0]
            return losses, losses.detach()

        jacobian = vmap(jacrev(sample_losses, has_aux=True),
                        in_dims=(None, 0, None if y is None else 0))
        chunk = self._sample_chunk(rest, outputs)
        x_chunks = x.split(chunk)
        y_chunks = [None] * len(x_chunks) if y is None else y.split(chunk)
        for x_chunk, y_chunk in zip(x_chunks, y_chunks):
            jac, losses = jacobian(rest, x_chunk, y_chunk)
            weights = self._sample_weights(losses)
            for name, j in jac.items():
                j = self._statistic(j, out=j)
                sums[name] += (j.sum((0, 1)) if weights is None
                               else torch.einsum("bc,bc...->...", weights, j))

    # ----------------------------------------------------------------- penalty
    def _terms(self, task: Task) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, importances, anchors) of one task for the params that require grad."""
        importance, anchor = task
        params, imps, anchors = [], [], []
        for name, p in self.model.named_parameters():
            if name in importance and p.requires_grad:
                params.append(p)
                imps.append(_local(self._match_shard(importance, name, p)))
                anchors.append(_local(self._match_shard(anchor, name, p)))
        return params, imps, anchors

    @staticmethod
    def _match_shard(state: dict[str, Tensor], name: str, p: Tensor) -> Tensor:
        """``state[name]``, made (once, in place in ``state``) a DTensor like ``p`` if ``p`` is."""
        t = state[name]
        if isinstance(p, DTensor) and not isinstance(t, DTensor):
            t = state[name] = _like_param(t, p)
        return t

    def penalty(self) -> Tensor:
        """The scalar penalty, differentiable w.r.t. the model parameters (0 before consolidate)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for task in self.tasks:
            for p, imp, anchor in zip(*self._terms(task)):
                total = total + (imp * (_local(p) - anchor).pow(2)).sum()
        return self._scale * total

    @torch.no_grad()
    def add_penalty_grad_(self) -> None:
        """Add the penalty's gradient ``2*scale*Omega*(theta - theta*)`` to each param's .grad.

        Call it after backward; a missing .grad is created. One multi-tensor pass per task,
        elementwise on local tensors, so it works where adding the penalty to the loss does
        not (FSDP2).
        """
        for task in self.tasks:
            params, imps, anchors = self._terms(task)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diffs = torch._foreach_sub([_local(p) for p in params], anchors)
            torch._foreach_mul_(diffs, imps)
            torch._foreach_add_([_local(p.grad) for p in params], diffs, alpha=2 * self._scale)

    # ----------------------------------------------------------------- state
    @property
    def importance(self) -> dict[str, Tensor]:
        """Importance per parameter name; for several remembered tasks, their elementwise sum.

        Under FSDP2 an entry is a DTensor once the state has been laid out like its parameter.
        """
        if len(self.tasks) == 1:
            return dict(self.tasks[0][0])
        total: dict[str, Tensor] = {}
        for importance, _ in self.tasks:
            for name, t in importance.items():
                total[name] = total[name] + t if name in total else t.clone()
        return total

    def state_bytes(self) -> int:
        """Bytes this rank keeps: importance and anchor of every remembered task."""
        return sum(_local(t).numel() * t.element_size()
                   for task in self.tasks for state in task for t in state.values())

    def state_dict(self) -> dict:
        """Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it.

        For a DTensor parameter (FSDP2) the entries are DTensors with its mesh and placements,
        as torch.distributed.checkpoint needs; the returned tensors are the state itself, so
        ``dcp.load`` into them loads in place.
        """
        params = dict(self.model.named_parameters())
        for task in self.tasks:
            for state in task:
                for name in state:
                    self._match_shard(state, name, params[name])
        return {"method": type(self).__name__,
                "tasks": [{"importance": dict(imp), "anchor": dict(anchor)}
                          for imp, anchor in self.tasks]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the tasks of ``state_dict()``; hyperparameters stay the constructor's.

        Entries are full-shaped plain tensors (a single-process ``torch.save``) or DTensors
        (torch.distributed.checkpoint); each is re-laid out like its parameter.
        """
        if state.get("method") != type(self).__name__:
            raise ValueError(f"state is for {state.get('method')!r}, not {type(self).__name__}")
        params = dict(self.model.named_parameters())
        tasks = []
        for task in state["tasks"]:
            pair = []
            for key in ("importance", "anchor"):
                tensors = {}
                for name, t in task[key].items():
                    p = params.get(name)
                    if p is None or t.shape != p.shape:
                        raise ValueError(f"state {key} {name!r} matches no parameter of the model")
                    tensors[name] = _like_param(t.to(dtype=p.dtype), p)
                pair.append(tensors)
            tasks.append(tuple(pair))
        self._check_task_count(len(tasks))
        self.tasks = tasks

    def _check_task_count(self, n: int) -> None:
        """Methods that keep one combined task reject states with more."""
        if n > 1:
            raise ValueError(f"{type(self).__name__} keeps one task, the state has {n}")

    # ----------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _importance_sums(self, batches, params: dict[str, nn.Parameter]) -> tuple[dict, int]:
        """Per-parameter importance summed over the samples of ``batches``, and their count."""

    @abc.abstractmethod
    def _combine(self, new: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Enter a finished task's importance ``new`` and its ``anchor`` into ``self.tasks``."""


def _parameter_uses(root) -> dict[int, int]:
    """For each leaf tensor (by id) of the autograd graph below ``root``, its number of uses."""
    uses: dict[int, int] = {}
    seen, stack = {root}, [root] if root is not None else []
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)
            if leaf is not None:
                uses[id(leaf)] = uses.get(id(leaf), 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return uses
