"""Batches of an importance pass: the model call, its logits, labels, sizes and per-sample splits.

A batch is a tensor, an (input, label, ...) sequence, a mapping of keyword arguments (a
transformers ``BatchEncoding`` or a collator's dict) or anything a user ``forward(model,
batch)`` understands. Mappings become plain dicts of tensors on the model's device, so that
torch.func can split them per sample.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn
from torch.func import functional_call

Forward = Callable[[nn.Module, Any], Any]
Labels = Union[None, str, int, Callable[[Any], Tensor]]

# The key transformers' collators and models use for the targets.
LABELS_KEY = "labels"


def check_forward_and_labels(forward, labels) -> None:
    """Raise TypeError naming the argument unless ``forward`` and ``labels`` are usable."""
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, batch) or None, "
                        f"got {type(forward).__name__}")
    if labels is not None and not (callable(labels) or isinstance(labels, (str, int))):
        raise TypeError("labels must be a batch key or index, a callable labels(batch) "
                        f"or None, got {type(labels).__name__}")


def to_device(batch, device):
    """``batch`` with its tensors on ``device``; mappings become dicts, sequences keep type."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def tensor_leaves(batch) -> list[Tensor]:
    """The tensors in ``batch``, depth first."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in tensor_leaves(value)]
    if isinstance(batch, (tuple, list)):
        return [t for value in batch for t in tensor_leaves(value)]
    return []


def model_input(batch, whole: bool, labels: Labels):
    """What the model call gets from ``batch``: all of it for a user ``forward`` (``whole``);
    else a tensor itself, an (input, label, ...) sequence's input, or a mapping without its
    labels entry (``labels`` when it is a key, else ``"labels"``) as a dict."""
    if whole or isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        label_key = labels if isinstance(labels, str) else LABELS_KEY
        return {k: v for k, v in batch.items() if k != label_key}
    raise TypeError("data must yield input tensors, (input, label) sequences or mappings of "
                    f"model arguments, got a batch of type {type(batch).__name__}; give "
                    "consolidate a forward(model, batch) for other batches")


def default_forward(model: nn.Module, x):
    """The model call without a user ``forward``: ``model(x)``, or ``model(**x)`` for a dict."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def logits_of(output) -> Tensor:
    """The logits in a model's output: a tensor, an output with ``.logits`` (transformers'
    ModelOutput) or a mapping with a ``"logits"`` entry."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError("the model call must return logits: a tensor, an output with .logits "
                        f"or a mapping with 'logits', got {type(output).__name__}")
    return logits


def labels_of(batch, labels: Labels) -> Optional[Tensor]:
    """The labels of ``batch``: ``labels(batch)`` for a callable, ``batch[labels]`` for a key;
    without ``labels``, a sequence's second entry or a mapping's ``"labels"`` (None if absent)."""
    if callable(labels):
        y = labels(batch)
    elif labels is not None:
        try:
            y = batch[labels]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"labels={labels!r} names no entry of a batch of type "
                             f"{type(batch).__name__}") from error
    elif isinstance(batch, Mapping):
        y = batch.get(LABELS_KEY)
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        y = batch[1]
    else:
        y = None
    if y is not None and not isinstance(y, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(y).__name__}")
    return y


def batch_size(batch, labels: Optional[Tensor] = None) -> int:
    """Samples in ``batch``: the leading size of its first tensor, else of its ``labels``."""
    leaves = tensor_leaves(batch) or ([] if labels is None else [labels])
    if not leaves or leaves[0].dim() == 0:
        raise TypeError(f"cannot count the samples of a batch of type {type(batch).__name__}: "
                        "it holds no batched tensor and has no labels")
    return leaves[0].shape[0]


def sample_dims(batch, n: int):
    """vmap ``in_dims`` for ``batch``: 0 for tensors with leading size ``n``, None otherwise."""
    if isinstance(batch, Tensor):
        return 0 if batch.dim() > 0 and batch.shape[0] == n else None
    if isinstance(batch, Mapping):
        return {key: sample_dims(value, n) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(sample_dims(value, n) for value in batch)
    return None


def split_batch(batch, dims, chunk: int) -> list:
    """``batch`` in pieces of ``chunk`` samples along the dims ``sample_dims`` marked 0."""
    if isinstance(batch, Tensor):
        return list(batch.split(chunk)) if dims == 0 else None
    if isinstance(batch, Mapping):
        parts = {key: split_batch(value, dims[key], chunk) for key, value in batch.items()}
        pieces = _piece_count(parts.values())
        return [{key: value if parts[key] is None else parts[key][i]
                 for key, value in batch.items()} for i in range(pieces)]
    if isinstance(batch, (tuple, list)):
        parts = [split_batch(value, d, chunk) for value, d in zip(batch, dims)]
        pieces = _piece_count(parts)
        return [type(batch)(value if part is None else part[i]
                            for value, part in zip(batch, parts)) for i in range(pieces)]
    return None


def _piece_count(parts) -> int:
    return next(len(part) for part in parts if part is not None)


def unsqueeze_samples(batch, dims):
    """One vmapped sample made a batch of one again, along the dims ``sample_dims`` marked 0."""
    if isinstance(batch, Tensor):
        return batch.unsqueeze(0) if dims == 0 else batch
    if isinstance(batch, Mapping):
        return {key: unsqueeze_samples(value, dims[key]) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(unsqueeze_samples(value, d) for value, d in zip(batch, dims))
    return batch


class ModelCall(nn.Module):
    """``forward(model, batch)`` as a module whose parameters are the model's (under the
    prefix ``model.``), so torch.func.functional_call can swap them."""

    def __init__(self, model: nn.Module, forward: Forward):
        super().__init__()
        self.model = model
        self.call = forward

    def forward(self, batch):
        return logits_of(self.call(self.model, batch))

    def functional(self, params: dict[str, Tensor], batch) -> Tensor:
        """The logits with the model's parameters ``params`` (names as in the model)."""
        return functional_call(self, {f"model.{n}": t for n, t in params.items()}, (batch,))
