"""Aligned views of tensors in bounded pieces: how the pure-PyTorch passes (the foreach backend,
the penalty's gradient and proximal step) keep their temporaries to a chunk's size instead of
the params' size, on any device.

A tensor of more than ``chunk_elements(device)`` elements is cut into views of at most that
many consecutive elements (in its logical order, so tensors of one shape but different strides
are cut alike); smaller tensors stay whole. ``batches`` packs the pieces of aligned lists into
runs of at most that many elements, for one multi-tensor op per list and run.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
from torch import Tensor

# Elements per chunk. On the CPU every op on a chunk stays under ATen's parallel grain (32768
# elements): the ops run on the calling thread, with no fork and join of the thread pool per op,
# which costs most where cores are shared, and a chunk's temporaries stay in L2 cache. A
# multiple of 64 elements, so ATen's vectorized loops (up to 64 bf16 elements a turn) cover a
# chunk as they cover the whole tensor, and an op whose scalar tail rounds otherwise (add with
# alpha on bf16) gives what one pass on one thread gives. Elsewhere a chunk is larger, so fewer
# kernels are launched.
CHUNK_ELEMENTS = {"cpu": 2 ** 15 - 64}
DEFAULT_CHUNK_ELEMENTS = 2 ** 20


def chunk_elements(device: torch.device) -> int | float:
    """The chunk size on ``device``; unbounded while compiling (the compiler fuses the ops and
    allocates no temporaries)."""
    if torch.compiler.is_compiling():
        return math.inf
    return CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)


def chunks(tensors: list[Tensor], size: int) -> list[list[Tensor]]:
    """``tensors`` (one shape, more than ``size`` elements) cut alike into views of at most
    ``size`` consecutive elements in their logical order: per tensor, its list of views."""
    if all(map(Tensor.is_contiguous, tensors)):
        return [list(t.view(-1).split(size)) for t in tensors]
    shape, dim, inner = tensors[0].shape, tensors[0].dim(), 1
    while inner * shape[dim - 1] <= size:  # the trailing dims that fit in one chunk
        dim -= 1
        inner *= shape[dim]
    rows = size // inner  # a chunk: rows of dim - 1, at one index of the dims before it
    index = [lead + (slice(start, start + rows),)
             for lead in itertools.product(*map(range, shape[:dim - 1]))
             for start in range(0, shape[dim - 1], rows)]
    return [[t[i] for i in index] for t in tensors]


def pieces(entries: tuple, size: int) -> Iterator[tuple]:
    """The aligned pieces of one index's ``entries``: its tensors (one shape) cut alike, any
    other value (a float, say) repeated for each piece."""
    tensors = [e for e in entries if isinstance(e, Tensor)]
    cuts = iter(chunks(tensors, size) if tensors[0].numel() > size else [[t] for t in tensors])
    return zip(*[next(cuts) if isinstance(e, Tensor) else itertools.repeat(e) for e in entries])


def batches(lists: list[list], size: int) -> Iterator[list[list]]:
    """Aligned ``lists`` (index by index tensors of one shape, the first list all tensors;
    other values are repeated per piece) as runs of pieces of at most ``size`` elements in all,
    empty tensors left out: per run, per list, its pieces."""
    run, total = [[] for _ in lists], 0
    for entries in zip(*lists):
        for piece in pieces(entries, size) if entries[0].numel() else ():
            numel = piece[0].numel()
            if total and total + numel > size:
                yield run
                run, total = [[] for _ in lists], 0
            for column, value in zip(run, piece):
                column.append(value)
            total += numel
    if total:
        yield run
