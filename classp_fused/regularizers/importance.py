"""Importance passes: the eval()-mode context, batches, all-reduce and per-sample sums.

``ImportancePasses`` is mixed into ``Regularizer``; it uses ``self.model``,
``self.process_group`` and the subclass's ``_statistic``, ``_sample_losses`` and
``_sample_weights``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import jacrev, vmap

from . import sharded
from .batches import (Forward, Labels, ModelCall, batch_size, labels_of, model_input,
                      sample_dims, split_batch, tensor_leaves, to_device, unsqueeze_samples)
from .shards import local

# Bound on the per-sample gradient elements held at once (512 MiB in float32); larger vmap
# chunks run markedly faster per sample on CPU than small ones.
PER_SAMPLE_ELEMENTS = 2**27


@dataclass
class PassTrace:
    """Where an importance pass stands: the index in ``data`` of the batch in use, and why the
    pass stopped early (a batch whose importance statistics are not finite), or None."""

    index: int = -1
    refusal: str | None = None


class ImportancePasses:
    """The machinery of an importance pass over a model's data.

    Subclasses implement ``_add_batch(x, y, params, sums)``: add one batch's per-parameter
    importance sums over its samples to ``sums``.
    """

    # Elementwise statistic of a per-sample gradient (torch.abs, torch.square); takes ``out=``.
    _statistic = None

    @contextlib.contextmanager
    def _importance_pass(self, forward: Forward) -> Iterator[None]:
        """eval() mode and grad enabled, the model called through ``forward``; training
        flags, requires_grad and buffers restored."""
        training = [(m, m.training) for m in self.model.modules()]
        requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        buffers = [(m, n, b, b.clone()) for m in self.model.modules()
                   for n, b in m.named_buffers(recurse=False)]
        self._call = ModelCall(self.model, forward)
        self.model.eval()
        try:
            with torch.enable_grad():
                yield
        finally:
            del self._call
            for module, flag in training:
                module.training = flag
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            with torch.no_grad():
                for module, name, buffer, saved in buffers:
                    buffer.copy_(saved)
                    setattr(module, name, buffer)

    def _batches(self, data, labels: Labels, whole: bool, trace: PassTrace
                 ) -> Iterator[tuple[Any, Tensor | None]]:
        """Yield (model input, labels or None) with tensors on the model's device (see
        ``batches.model_input``; ``whole`` for a user forward); skip empty batches. Each
        batch's index in ``data`` goes to ``trace.index``."""
        device = next(self.model.parameters()).device
        for index, batch in enumerate([data] if isinstance(data, Tensor) else data):
            batch = to_device(batch, device)
            x, y = model_input(batch, whole, labels), labels_of(batch, labels)
            if batch_size(x, y):  # a batch without samples adds nothing
                trace.index = index
                yield x, y

    def _importance_sums(self, batches, params: dict[str, nn.Parameter], trace: PassTrace
                         ) -> tuple[dict[str, Tensor], int]:
        """Per-parameter importance summed over the samples of ``batches``, and their count.

        The pass stops at the first batch after which a sum is not finite; ``trace.refusal``
        then says which batch and parameter."""
        sums = {name: self._accumulator(p) for name, p in params.items()}
        count = 0
        for x, y in batches:
            self._add_batch(x, y, params, sums)
            bad = _first_false((name, torch.isfinite(s).all()) for name, s in sums.items())
            if bad is not None:
                self._refuse_batch(trace, bad, x, params)
                break
            count += batch_size(x, y)
        return sums, count

    @staticmethod
    def _refuse_batch(trace: PassTrace, name: str, x, params) -> None:
        """Record in ``trace`` that the batch in use gave a non-finite statistic for ``name``,
        and the likely cause."""
        diverged = (n for n, p in params.items() if not bool(torch.isfinite(local(p)).all()))
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in tensor_leaves(x)):
            cause = "its input holds NaN or inf"
        elif (param := next(diverged, None)) is not None:
            cause = f"parameter {param!r} is not finite"
        else:
            cause = "the model's outputs or gradients on it are not finite"
        trace.refusal = (f"batch {trace.index} of data gives a non-finite importance for "
                         f"{name!r} ({cause})")

    def _logits(self, x) -> Tensor:
        """The logits of the model call chosen by ``consolidate`` (its ``forward``) on ``x``."""
        return self._call(x)

    def _all_reduce_(self, sums: list[Tensor], count: int, device: torch.device,
                     refused: bool) -> tuple[float, bool]:
        """Sum ``sums`` in place and ``count`` across ranks when distributed; return the count
        and whether any rank ``refused`` its data (so that all ranks raise together)."""
        if self.process_group is None and not (dist.is_available() and dist.is_initialized()):
            return float(count), refused
        for s in sums:
            dist.all_reduce(s, group=self.process_group)
        total = torch.tensor([float(count), float(refused)], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.process_group)
        count, refusals = total.tolist()
        return count, refusals > 0

    def _batch_losses(self, x: Tensor, y: Tensor | None, reforward: bool
                      ) -> Iterator[tuple[Tensor, float]]:
        """The batch form's scalar losses on (x, y) and the weight of each one's gradient
        statistic; ``reforward`` runs a fresh forward for each loss after the first (FSDP2
        frees the unsharded weights after each backward)."""
        raise NotImplementedError

    def _add_batch_form(self, x: Tensor, y: Tensor | None, params, sums) -> None:
        """Add weight * stat(gradient) of each of the batch form's losses to ``sums``."""
        for loss, weight in self._batch_losses(x, y, reforward=False):
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True,
                                        allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    sums[name] += weight * self._statistic(g)

    def _sharded_importance_sums(self, batches, params, trace: PassTrace) -> tuple[dict, int]:
        """Importance sums of this rank's shards of an FSDP2 model (see ``sharded``), and the
        number of samples this rank saw. Every rank must call it. A unit of data whose
        statistics are not finite ends this rank's data (``trace.refusal`` says which batch);
        the others go on in lock-step."""
        owners = sharded.linear_owners(self.model, params) if self.per_sample else None
        state = {"stand_in": False, "weight": 1.0, "column": None, "linear": owners is not None}
        finite: list[tuple[str, Tensor]] = []

        def checked_statistic(name: str, g: Tensor) -> Tensor:
            s = statistic(name, g)
            if not state["stand_in"]:
                finite.append((name, torch.isfinite(s).all()))
            return s

        def statistic(name: str, g: Tensor) -> Tensor:
            if state["stand_in"]:
                return torch.zeros_like(g)
            if not state["linear"]:
                return self._statistic(g) * state["weight"]
            module, role = owners[name]
            record = records[module]
            d = self._statistic(record.delta)
            if state["column"] is not None:
                d = d * state["column"][:, None]
            s = d.T @ self._statistic(record.inputs[0]) if role == "weight" else d.sum(0)
            return s.to(g.dtype)

        def batch_form(x, y):
            for loss, weight in self._batch_losses(x, y, reforward=True):
                state["weight"] = float(weight)
                loss.backward()

        def single_samples() -> bool:
            return self.per_sample and not state["linear"]

        count, checked, group = 0, False, self.process_group
        with sharded.statistic_gradients(self.model, params, checked_statistic) as unsharded, \
                sharded.linear_records(owners) as records:
            units = _until_refused(sharded.units(batches, single_samples), trace)
            for x, y, stand_in in sharded.lockstep(units, group):
                state["stand_in"] = stand_in
                if not state["linear"]:
                    batch_form(x, y)
                elif not self._sharded_linear_form(x, y, state, records, unsharded, checked):
                    state["linear"] = False  # on every rank: the check is all-reduced
                    for x_k, y_k, stand_in_k in sharded.lockstep(sharded.samples(x, y), group):
                        state["stand_in"] = stand_in_k
                        batch_form(x_k, y_k)
                checked = True
                count += x.shape[0]
                bad = _first_false(finite)
                finite.clear()
                if bad is not None and not stand_in:
                    self._refuse_batch(trace, bad, x, params)
            sums = sharded.shard_sums(params)
        return sums, count

    def _sharded_linear_form(self, x, y, state, records, unsharded, checked: bool) -> bool:
        """One batch of the per-sample Linear form on shards: one forward and backward per
        output column. Unless ``checked``, first check on every rank that each layer ran once
        on 2-D inputs and each parameter had one use; if not, complete the pass with zero
        statistics and return False."""
        records.clear()
        losses = self._sample_losses(self._logits(x), y)
        if not checked:
            uses = _parameter_uses(losses.grad_fn)
            ok = (all(len(r.inputs) == 1 and isinstance(r.inputs[0], Tensor)
                      and r.inputs[0].dim() == 2 for r in records.values())
                  and all(uses.get(id(u)) == 1 for u in unsharded.values()))
            flag = torch.tensor(float(ok), device=losses.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
            if not flag.item():
                state["stand_in"] = True
                losses.sum().backward()
                return False
        weights = self._sample_weights(losses.detach())
        for c in range(losses.shape[1]):
            if c:
                records.clear()
                losses = self._sample_losses(self._logits(x), y)
            state["column"] = None if weights is None else weights[:, c]
            losses[:, c].sum().backward()
        return True

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
            losses = self._sample_losses(self._logits(x), y)
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
        """Per-sample sums of the parameters ``rest`` from torch.func per-sample Jacobians.

        The model input ``x`` may be any nesting of tensors, mappings and sequences: its
        tensors with the batch's leading size are split per sample, the others shared."""
        if not tensor_leaves(x):
            raise TypeError("per_sample=True splits batches into samples: a batch must be "
                            "tensors in sequences or mappings, got one of type "
                            f"{type(x).__name__}")
        dims = sample_dims(x, batch_size(x))

        def sample_losses(p, x_k, y_k):
            output = self._call.functional({**fixed, **p}, unsqueeze_samples(x_k, dims))
            losses = self._sample_losses(output, None if y_k is None else y_k.unsqueeze(0))[0]
            return losses, losses.detach()

        jacobian = vmap(jacrev(sample_losses, has_aux=True),
                        in_dims=(None, dims, None if y is None else 0))
        chunk = self._sample_chunk(rest, outputs)
        x_chunks = split_batch(x, dims, chunk)
        y_chunks = [None] * len(x_chunks) if y is None else y.split(chunk)
        for x_chunk, y_chunk in zip(x_chunks, y_chunks):
            try:
                jac, losses = jacobian(rest, x_chunk, y_chunk)
            except RuntimeError as error:
                if "vmap" not in str(error):
                    raise
                raise RuntimeError(
                    "per_sample=True runs the model under torch.func.vmap, which this model's "
                    "forward does not support (data-dependent control flow such as transformers' "
                    "attention-mask handling); per_sample=False on batches of one sample gives "
                    "the per-sample importance") from error
            weights = self._sample_weights(losses)
            for name, j in jac.items():
                j = self._statistic(j, out=j)
                sums[name] += (j.sum((0, 1)) if weights is None
                               else torch.einsum("bc,bc...->...", weights, j))


def _first_false(flags: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first (name, bool tensor) pair whose flag is false, with one host sync;
    None when all are true."""
    flags = list(flags)
    if not flags:
        return None
    device = flags[0][1].device
    stacked = torch.stack([flag.to(device) for _, flag in flags])
    if bool(stacked.all()):
        return None
    return flags[int(stacked.to(torch.uint8).argmin())][0]


def _until_refused(units: Iterator, trace: PassTrace) -> Iterator:
    """``units`` until ``trace`` records a refusal (checked once the consumer asks for the next
    unit, so the refused batch's remaining samples are not used)."""
    for unit in units:
        yield unit
        if trace.refusal is not None:
            return


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
