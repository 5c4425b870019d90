"""Memory Aware Synapses (Aljundi et al., ECCV 2018): importance from unlabeled inputs."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .base import Regularizer
from .checks import check_choice, check_number

HEBBIAN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MAS(Regularizer):
    """MAS: penalty ``lam * sum Omega * (theta - theta*)^2`` (no 1/2).

    Omega = (1/N) sum_k |d ||F(x_k)||^2 / d theta| with F the model output (pre-softmax).

    - ``per_sample=False``: the batch form of the original code, sum over batches of
      |gradient of the batch's summed squared output norm|, divided by N. It never exceeds
      the per-sample form and equals it for batches of one sample.
    - ``per_sample=True``: the paper's definition: for single-use Linear layers on 2-D inputs
      the exact form |Delta|^T @ |X| from one backward per batch, for other parameters
      per-sample gradients via torch.func.
    - ``local=True``: the Hebbian variant, per Linear/Conv layer from its own input and
      output (captured by forward hooks): mean_k |d ||layer(x_k)||^2 / d theta| with the
      layer input held fixed. For a Linear layer on (batch, in) inputs this is
      Omega_ij = 2 * mean_k |y_k[i] * x_k[j]| (bias: x_j = 1); for convolutions (and Linear
      layers on inputs with extra dims) the products are summed over positions before the
      absolute value, i.e. the spatial reduction of the layer's own gradient. For a model of
      one layer it equals global per-sample MAS exactly. Parameters of other modules get zero
      importance; ``per_sample`` is ignored.
    - ``accumulate``: across tasks, "sum" adds the new Omega to the old, "ema" keeps
      ``alpha*old + (1 - alpha)*new`` (the first task takes new). theta* is reset each time.

    - ``penalty``: the form an attached optimizer applies (``attach``): ``"explicit"`` or
      ``"proximal"``.
    - ``normalize``: ``"none"`` (the paper's raw Omega), ``"mean"`` or ``"max"``: each task's
      Omega divided by its mean (max) over all regularized elements (``Regularizer``).
    - ``state_dtype``: how Omega is stored: ``"param"`` (the parameter's dtype), ``"bf16"``
      (float32 parameters) or ``"8bit"`` (codes plus a scale per 256 elements), rounded to
      nearest once per task (``TaskState``); theta* stays in the parameter's dtype.

    Labels in the data are ignored.
    """

    _statistic = staticmethod(torch.abs)

    def __init__(self, model: nn.Module, lam: float = 1.0, accumulate: str = "sum",
                 alpha: float = 0.5, per_sample: bool = False, local: bool = False,
                 process_group=None, penalty: str = "explicit", normalize: str = "none",
                 state_dtype: str = "param"):
        super().__init__(model, lam, per_sample, process_group, penalty=penalty,
                         normalize=normalize, state_dtype=state_dtype)
        check_choice("accumulate", accumulate, ("sum", "ema"))
        self.accumulate = accumulate
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)
        self.local = bool(local)

    @property
    def _scale(self) -> float:
        return self.lam

    def _sample_losses(self, output, y):
        return output.pow(2).flatten(1).sum(1, keepdim=True)

    def _add_batch(self, x, y, params, sums):
        if self.local:
            self._add_hebbian(x, params, sums)
        elif self.per_sample:
            self._add_per_sample(x, None, params, sums)
        else:
            self._add_batch_form(x, None, params, sums)

    def _merge_importance(self, old: Tensor, new: Tensor) -> Tensor:
        if self.accumulate == "sum":
            return old + new
        return self.alpha * old + (1 - self.alpha) * new

    def _batch_losses(self, x, y, reforward):
        yield self._logits(x).pow(2).sum(), 1.0

    def _sharded_variant_error(self) -> str | None:
        if self.local:
            return ("MAS(local=True) needs each layer's input and output, which an FSDP2 model "
                    "does not keep; on a sharded model use MAS with local=False (batch or "
                    "per-sample, sum or ema)")
        return None

    def _add_hebbian(self, x: Tensor, params, sums) -> None:
        def hook(layer, inputs, output):
            names = {n: prefixes[layer] + n for n, _ in layer.named_parameters(recurse=False)
                     if prefixes[layer] + n in params}
            if names:
                importance = _hebbian_sums(layer, inputs[0], output, names)
                for local_name, full_name in names.items():
                    sums[full_name] += importance[local_name]

        prefixes = {m: f"{name}." if name else "" for name, m in self.model.named_modules()
                    if isinstance(m, HEBBIAN_LAYERS)}
        handles = [m.register_forward_hook(hook) for m in prefixes]
        try:
            with torch.no_grad():
                self._logits(x)
        finally:
            for handle in handles:
                handle.remove()


def _hebbian_sums(layer: nn.Module, x: Tensor, y: Tensor, names) -> dict[str, Tensor]:
    """Sum over the batch of |d ||layer(x_k)||^2 / d theta| for the parameters in ``names``."""
    x, y = x.detach(), y.detach()
    if isinstance(layer, nn.Linear) and x.dim() == 2:
        abs_y = y.abs()
        return {"weight": 2 * abs_y.T @ x.abs(), "bias": 2 * abs_y.sum(0)}
    forward = nn.functional.linear if isinstance(layer, nn.Linear) else layer._conv_forward

    def squared_norm(p, x_k):
        out = forward(x_k.unsqueeze(0), p.get("weight", layer.weight), p.get("bias", layer.bias))
        return out.pow(2).sum()

    detached = {n: getattr(layer, n).detach() for n in names}
    sums = {n: torch.zeros_like(t) for n, t in detached.items()}
    per_sample_grad = vmap(grad(squared_norm), in_dims=(None, 0))
    for chunk in x.split(Regularizer._sample_chunk(detached)):
        for n, g in per_sample_grad(detached, chunk).items():
            sums[n] += g.abs_().sum(0)
    return sums
