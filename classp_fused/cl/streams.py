"""Task streams: split and permuted digits, IDX image datasets and domain sequences.

A stream is a sequence of tasks, each with a held-out test split and the classes it contains
(task-incremental evaluation masks the logits to those classes). Images are float32 tensors of
shape (N, 1, H, W) with pixels in [0, 1]; token streams (``classp_fused.cl.text``) hold int64
token ids of shape (N, L) and name their vocabulary size; labels are int64.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

#: IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: Where Debian's dataset-fashion-mnist package installs Fashion-MNIST.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGITS_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Task:
    """One task: train and held-out test data, and the labels it contains."""

    name: str
    classes: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class Stream:
    """A sequence of tasks sharing one label space of ``num_classes`` labels.

    ``vocab_size`` is None for images and the number of token ids for token streams.
    """

    name: str
    tasks: tuple[Task, ...]
    num_classes: int
    vocab_size: Optional[int] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.tasks[0].x_train.shape[1:])


@dataclass(frozen=True)
class ImageDataset:
    """An image classification dataset with its official train/test split (numpy arrays)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian numpy array.

    Checks the magic number (two zero bytes, a known type code, at least one dimension) and
    that the payload holds exactly the elements the dimensions announce. Raises ValueError
    naming the file on any malformed input.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions need {header} bytes,"
                         f" file has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX payload is {len(raw) - header} bytes, dimensions {dims}"
                         f" of {dtype.name} need {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx_file(directory: Path, stem: str, ndim: int) -> Path:
    names = [f"{stem}{sep}idx{ndim}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory}: no {names[0]} or {names[1]} (nor the .idx spelling)")


def _read_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx_file(directory, f"{prefix}-images", 3)
    labels_path = _find_idx_file(directory, f"{prefix}-labels", 1)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected 3-dimensional unsigned-byte images, got"
                         f" {images.ndim} dimensions of {images.dtype}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected 1-dimensional unsigned-byte labels, got"
                         f" {labels.ndim} dimensions of {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images"
                         f" in {images_path}")
    return images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)


@lru_cache(maxsize=None)
def load_idx_dataset(directory: str) -> ImageDataset:
    """Load an MNIST-style IDX directory (train-/t10k- images and labels, .gz or not), cached."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{path}: dataset directory does not exist")
    x_train, y_train = _read_idx_split(path, "train")
    x_test, y_test = _read_idx_split(path, "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{path}: train images are {x_train.shape[2:]}, test images"
                         f" {x_test.shape[2:]}")
    return ImageDataset(path.name, x_train, y_train, x_test, y_test)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return images, digits.target.astype(np.int64)


def digits_dataset(seed: int, test_fraction: float = DIGITS_TEST_FRACTION) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images), stratified held-out split seeded by ``seed``."""
    from sklearn.model_selection import train_test_split

    images, labels = _digits()
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed)
    return ImageDataset("digits", x_train, y_train, x_test, y_test)


def _task(name: str, classes: Sequence[int], x_train, y_train, x_test, y_test) -> Task:
    return Task(name, tuple(int(c) for c in classes),
                torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train),
                torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(y_test))


def split_stream(dataset: ImageDataset, num_tasks: int = 5) -> Stream:
    """Split the label set into ``num_tasks`` consecutive groups of classes, one per task."""
    labels = np.unique(dataset.y_train)
    if not 1 <= num_tasks <= len(labels):
        raise ValueError(f"cannot split {len(labels)} classes into {num_tasks} tasks")
    tasks = []
    for classes in np.array_split(labels, num_tasks):
        train = np.isin(dataset.y_train, classes)
        test = np.isin(dataset.y_test, classes)
        tasks.append(_task(f"{dataset.name} {'/'.join(map(str, classes))}", classes,
                           dataset.x_train[train], dataset.y_train[train],
                           dataset.x_test[test], dataset.y_test[test]))
    return Stream(f"split-{dataset.name}", tuple(tasks), int(labels.max()) + 1)


def pixel_permutations(num_pixels: int, num_tasks: int, seed: int) -> list[np.ndarray]:
    """One random pixel permutation per task, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(num_pixels) for _ in range(num_tasks)]


def permuted_stream(dataset: ImageDataset, num_tasks: int, seed: int) -> Stream:
    """The same classification problem under a different fixed pixel permutation per task."""
    shape = dataset.x_train.shape[1:]
    classes = np.unique(dataset.y_train)

    def permute(x: np.ndarray, order: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1)[:, order].reshape(len(x), *shape)

    tasks = tuple(
        _task(f"{dataset.name} perm {t}", classes, permute(dataset.x_train, order),
              dataset.y_train, permute(dataset.x_test, order), dataset.y_test)
        for t, order in enumerate(pixel_permutations(math.prod(shape), num_tasks, seed)))
    return Stream(f"permuted-{dataset.name}", tasks, int(classes.max()) + 1)


def domain_stream(name: str, datasets: Sequence[ImageDataset]) -> Stream:
    """One task per dataset, in order (e.g. MNIST then Fashion-MNIST), sharing the label space."""
    shapes = {d.x_train.shape[1:] for d in datasets}
    if len(shapes) != 1:
        raise ValueError(f"{name}: datasets have different image shapes {sorted(shapes)}")
    tasks = tuple(_task(d.name, np.unique(d.y_train), d.x_train, d.y_train, d.x_test, d.y_test)
                  for d in datasets)
    return Stream(name, tasks, max(max(t.classes) for t in tasks) + 1)


def subsample_dataset(dataset: ImageDataset, max_train: int, max_test: int,
                      seed: int) -> ImageDataset:
    """Keep at most ``max_train`` training and ``max_test`` test images (seeded, no repeats)."""
    rng = np.random.default_rng(seed)
    train = np.sort(rng.permutation(len(dataset.x_train))[:max_train])
    test = np.sort(rng.permutation(len(dataset.x_test))[:max_test])
    return ImageDataset(dataset.name, dataset.x_train[train], dataset.y_train[train],
                        dataset.x_test[test], dataset.y_test[test])


def subsample_stream(stream: Stream, max_train: int, max_test: int, seed: int) -> Stream:
    """Keep at most ``max_train`` training and ``max_test`` test examples per task (seeded)."""
    generator = torch.Generator().manual_seed(seed)

    def first(n: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        keep = torch.randperm(len(x), generator=generator)[:n]
        return x[keep], y[keep]

    tasks = tuple(Task(t.name, t.classes, *first(max_train, t.x_train, t.y_train),
                       *first(max_test, t.x_test, t.y_test)) for t in stream.tasks)
    return replace(stream, tasks=tasks)


def validation_stream(stream: Stream, fraction: float, seed: int) -> Stream:
    """Hold out ``fraction`` of each task's training data as its evaluation split (seeded).

    The task's test split is dropped: tuning on the result never sees test data.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for t in stream.tasks:
        order = torch.randperm(len(t.x_train), generator=generator)
        held = max(1, round(fraction * len(order)))
        if held >= len(order):
            raise ValueError(f"task {t.name!r}: {len(order)} training examples leave none to"
                             f" train on after holding out {fraction:.0%}")
        val, train = order[:held], order[held:]
        tasks.append(Task(t.name, t.classes, t.x_train[train], t.y_train[train],
                          t.x_train[val], t.y_train[val]))
    return replace(stream, tasks=tuple(tasks))
