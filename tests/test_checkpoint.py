"""Atomic checkpoint files, and optimizer state moving between backends, dtypes and devices."""
import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from classp_fused import CLASSP
from classp_fused.checkpoint import load_checkpoint, save_checkpoint
from helpers import CPU_BACKENDS, tiny_model, train_steps

HYPER = dict(lr=0.05, threshold=1e-4, power=2.0)


def _training_state(model, optimizer):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key]


def _write_partially_then_fail(obj, file, *args, **kwargs):
    file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("disk full")


def test_round_trip_and_no_temporary_files_left(tmp_path):
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), **HYPER)
    train_steps(model, optimizer, 2)
    path = tmp_path / "run.pt"
    save_checkpoint(_training_state(model, optimizer), path)
    train_steps(model, optimizer, 1)
    save_checkpoint(_training_state(model, optimizer), str(path))  # str or PathLike; overwrites
    _assert_same(load_checkpoint(path), _training_state(model, optimizer))
    assert os.listdir(tmp_path) == ["run.pt"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    old = {"weights": torch.arange(5.0), "step": 1}
    save_checkpoint(old, path)
    monkeypatch.setattr(torch, "save", _write_partially_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"weights": torch.zeros(5), "step": 2}, path)
    monkeypatch.undo()
    _assert_same(load_checkpoint(path), old)
    assert os.listdir(tmp_path) == ["run.pt"]


def test_process_killed_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.pt"
    old = {"weights": torch.arange(5.0), "step": 1}
    save_checkpoint(old, path)
    crash = textwrap.dedent(f"""
        import os, torch
        from classp_fused.checkpoint import save_checkpoint

        def killed_mid_write(obj, file, *args, **kwargs):
            file.write(b"PK\\x03\\x04 half a checkpoint")
            file.flush()
            os._exit(9)

        torch.save = killed_mid_write
        save_checkpoint({{"weights": torch.zeros(5), "step": 2}}, {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    _assert_same(load_checkpoint(path), old)
    leftovers = [name for name in os.listdir(tmp_path) if name != "run.pt"]
    assert all(name.startswith(".run.pt.") and name.endswith(".tmp") for name in leftovers)


def test_missing_directory_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_checkpoint({"step": 1}, tmp_path / "absent" / "run.pt")
    assert os.listdir(tmp_path) == []


def test_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "object.pt"
    save_checkpoint({"callable": copy.deepcopy}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(path)


def test_map_location(tmp_path):
    path = tmp_path / "run.pt"
    save_checkpoint({"w": torch.ones(3)}, path)
    loaded = load_checkpoint(path, map_location="meta")
    assert loaded["w"].device.type == "meta" and loaded["w"].shape == (3,)


@pytest.mark.parametrize("first", CPU_BACKENDS)
@pytest.mark.parametrize("second", CPU_BACKENDS)
def test_state_moves_to_another_backend_and_back(tmp_path, first, second):
    """Steps 1-2 on ``first``, 3-4 on ``second``, 5-6 on ``first`` again, through checkpoints."""
    path = tmp_path / "run.pt"
    straight = tiny_model()
    straight_optimizer = CLASSP(straight.parameters(), backend=first, **HYPER)
    for seed in (1, 2, 3):
        train_steps(straight, straight_optimizer, 2, seed=seed)

    model = tiny_model()
    optimizer = CLASSP(model.parameters(), backend=first, **HYPER)
    train_steps(model, optimizer, 2, seed=1)
    for backend, seed in ((second, 2), (first, 3)):
        save_checkpoint(_training_state(model, optimizer), path)
        state = load_checkpoint(path)
        model = tiny_model(seed=9)
        model.load_state_dict(state["model"])
        optimizer = CLASSP(model.parameters(), backend=backend, **HYPER)
        optimizer.load_state_dict(state["optimizer"])
        train_steps(model, optimizer, 2, seed=seed)

    for p, q in zip(model.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[p]["accumulator"],
                                   straight_optimizer.state[q]["accumulator"], rtol=1e-5, atol=1e-6)
        assert optimizer.state[p]["step"].item() == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_state_round_trips_through_another_param_dtype(tmp_path, dtype):
    """fp32 -> ``dtype`` -> fp32: accumulators keep their values (fp32, fp64 for fp64 params)."""
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), **HYPER)
    train_steps(model, optimizer, 3)
    path = tmp_path / "run.pt"
    save_checkpoint(optimizer.state_dict(), path)

    other = tiny_model(dtype)
    other_optimizer = CLASSP(other.parameters(), backend="torch", **HYPER)
    other_optimizer.load_state_dict(load_checkpoint(path))
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for p, q in zip(model.parameters(), other.parameters()):
        acc = other_optimizer.state[q]["accumulator"]
        assert acc.dtype == expected_dtype and acc.is_contiguous()
        assert torch.equal(acc.float(), optimizer.state[p]["accumulator"])
        assert other_optimizer.state[q]["step"].dtype == torch.float32
    train_steps(other, other_optimizer, 1)
    save_checkpoint(other_optimizer.state_dict(), path)

    back = tiny_model()
    back_optimizer = CLASSP(back.parameters(), **HYPER)
    back_optimizer.load_state_dict(load_checkpoint(path))
    for p, q in zip(other.parameters(), back.parameters()):
        acc = back_optimizer.state[q]["accumulator"]
        assert acc.dtype == torch.float32
        assert torch.equal(acc, other_optimizer.state[p]["accumulator"].float())
        assert back_optimizer.state[q]["step"].item() == 4


def test_state_follows_the_params_device(tmp_path):
    """A CPU state loaded for params on another device ('meta' here) is moved there."""
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), **HYPER)
    train_steps(model, optimizer, 2)
    path = tmp_path / "run.pt"
    save_checkpoint(optimizer.state_dict(), path)

    meta_model = tiny_model(torch.bfloat16).to("meta")
    meta_optimizer = CLASSP(meta_model.parameters(), backend="torch", **HYPER)
    meta_optimizer.load_state_dict(load_checkpoint(path))
    for p in meta_model.parameters():
        state = meta_optimizer.state[p]
        assert state["accumulator"].device.type == "meta" and state["step"].device.type == "meta"
        assert state["accumulator"].dtype == torch.float32 and state["accumulator"].shape == p.shape
    assert meta_optimizer.state_bytes() == optimizer.state_bytes()
