"""Task streams over the bundled digits, and the strict IDX reader on files written here."""
import gzip
import struct

import numpy as np
import pytest
import torch

from classp_fused.cl.streams import (FASHION_MNIST_DIR, digits_dataset, domain_stream,
                                     load_idx_dataset, permuted_stream, pixel_permutations,
                                     read_idx, split_stream, subsample_stream)

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file, written from the format description (not with the reader's code)."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[big.dtype], array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()


def write_idx_dir(directory, n_train=20, n_test=10, size=8, gz=True, sep="-", seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, ndim, array in (("images", 3, images), ("labels", 1, labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}{sep}idx{ndim}-ubyte"
            (directory / (name + ".gz" if gz else name)).write_bytes(
                gzip.compress(data) if gz else data)
    return directory


# ------------------------------------------------------------------ digits streams
def test_digits_split_is_stratified_held_out_and_scaled():
    data = digits_dataset(seed=0)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() == 1.0
    test_share = np.bincount(data.y_test) / (np.bincount(data.y_train) + np.bincount(data.y_test))
    assert np.all(np.abs(test_share - 0.25) < 0.02)


def test_digits_split_is_seeded():
    a, b, c = digits_dataset(0), digits_dataset(0), digits_dataset(1)
    assert np.array_equal(a.y_test, b.y_test) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_split_stream_has_disjoint_classes_covering_all_labels():
    stream = split_stream(digits_dataset(0), num_tasks=5)
    assert len(stream.tasks) == 5 and stream.num_classes == 10
    seen = set()
    for task in stream.tasks:
        assert len(task.classes) == 2
        assert not seen & set(task.classes)
        seen |= set(task.classes)
        assert set(task.y_train.tolist()) == set(task.classes)
        assert set(task.y_test.tolist()) == set(task.classes)
        assert task.x_train.dtype == torch.float32 and task.y_train.dtype == torch.int64
    assert seen == set(range(10))
    assert sum(len(t.x_train) + len(t.x_test) for t in stream.tasks) == 1797


def test_split_stream_rejects_more_tasks_than_classes():
    with pytest.raises(ValueError, match="cannot split"):
        split_stream(digits_dataset(0), num_tasks=11)


def test_pixel_permutations_fixed_per_seed_and_different_per_task():
    perms = pixel_permutations(64, 5, seed=3)
    assert all(sorted(p.tolist()) == list(range(64)) for p in perms)
    assert all(np.array_equal(p, q) for p, q in zip(perms, pixel_permutations(64, 5, seed=3)))
    assert len({p.tobytes() for p in perms}) == 5
    assert not np.array_equal(perms[0], pixel_permutations(64, 5, seed=4)[0])


def test_permuted_stream_permutes_the_same_images():
    data = digits_dataset(0)
    stream = permuted_stream(data, num_tasks=3, seed=0)
    perms = pixel_permutations(64, 3, seed=0)
    flat = data.x_train.reshape(len(data.x_train), -1)
    for task, perm in zip(stream.tasks, perms):
        assert task.classes == tuple(range(10))
        assert torch.equal(task.y_train, torch.from_numpy(data.y_train))
        assert np.array_equal(task.x_train.reshape(len(flat), -1).numpy(), flat[:, perm])
        assert task.x_test.shape[1:] == (1, 8, 8)
    assert not torch.equal(stream.tasks[0].x_train, stream.tasks[1].x_train)
    again = permuted_stream(data, num_tasks=3, seed=0)
    assert all(torch.equal(a.x_test, b.x_test) for a, b in zip(stream.tasks, again.tasks))


def test_subsample_caps_every_task():
    stream = subsample_stream(split_stream(digits_dataset(0), 5), 7, 3, seed=0)
    assert all(len(t.x_train) == 7 and len(t.x_test) == 3 for t in stream.tasks)
    assert all(set(t.y_train.tolist()) <= set(t.classes) for t in stream.tasks)


# ------------------------------------------------------------------ IDX reader
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / "a.idx"
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    read = read_idx(path)
    assert read.shape == (2, 3, 4) and read.dtype.isnative
    assert np.array_equal(read, array)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
    (b"\x00\x00\x08\x00", "not an IDX file"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00\x01\x02", "need 4"),
    (b"\x00\x00\x0c\x01" + struct.pack(">I", 1) + b"\x00" * 5, "need 4"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
])
def test_malformed_idx_is_rejected_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_directory_both_spellings_gz_or_not(tmp_path):
    a = load_idx_dataset(str(write_idx_dir(tmp_path / "a", gz=True)))
    b = load_idx_dataset(str(write_idx_dir(tmp_path / "b", gz=False, sep=".")))
    for data in (a, b):
        assert data.x_train.shape == (20, 1, 8, 8) and data.x_test.shape == (10, 1, 8, 8)
        assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() <= 1.0
        assert data.y_train.dtype == np.int64
    assert np.array_equal(a.x_train, b.x_train)


def test_idx_directory_checks(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_idx_dataset(str(tmp_path / "missing"))
    directory = write_idx_dir(tmp_path / "few-labels")
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(ValueError, match="9 labels for 10 images"):
        load_idx_dataset(str(directory))
    directory = write_idx_dir(tmp_path / "no-test")
    (directory / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_idx_dataset(str(directory))
    directory = write_idx_dir(tmp_path / "float-images")
    (directory / "train-images-idx3-ubyte.gz").write_bytes(
        idx_bytes(np.zeros((20, 8, 8), ">f4")))
    with pytest.raises(ValueError, match="unsigned-byte images"):
        load_idx_dataset(str(directory))


def test_domain_stream_one_task_per_dataset(tmp_path):
    first = load_idx_dataset(str(write_idx_dir(tmp_path / "first", seed=1)))
    second = load_idx_dataset(str(write_idx_dir(tmp_path / "second", seed=2)))
    stream = domain_stream("pair", [first, second])
    assert [t.name for t in stream.tasks] == ["first", "second"]
    assert stream.num_classes == 10 and stream.input_shape == (1, 8, 8)
    assert torch.equal(stream.tasks[1].x_test, torch.from_numpy(second.x_test))
    other = load_idx_dataset(str(write_idx_dir(tmp_path / "big", size=10)))
    with pytest.raises(ValueError, match="different image shapes"):
        domain_stream("mixed", [first, other])


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_reads():
    data = load_idx_dataset(str(FASHION_MNIST_DIR))
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert set(np.unique(data.y_train)) == set(range(10))
