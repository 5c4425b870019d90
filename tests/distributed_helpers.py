"""Spawning gloo ranks on CPU for the torch.distributed tests."""
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from classp_fused.distributed import exit_rank, release_process_group

WORLD_SIZE = 2

requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                   reason="needs torch.distributed with gloo")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, body, port, collective_timeout_s, args):
    torch.set_num_threads(1)
    timeout = None if collective_timeout_s is None else datetime.timedelta(
        seconds=collective_timeout_s)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timeout)
    try:
        body(rank, *args)
    except BaseException:
        release_process_group()  # the error is recorded by torch's spawn wrapper on the way out
        raise
    exit_rank(0)  # no interpreter teardown beside gloo's live threads (classp_fused.distributed)


def run_ranks(body, *args, timeout_s, collective_timeout_s=None):
    """Run ``body(rank, *args)`` on WORLD_SIZE spawned ranks in one gloo group.

    ``body`` must be a module-level function (it is pickled). A rank's exception fails the test,
    and so do a rank that dies by a signal and not finishing within ``timeout_s``.
    ``collective_timeout_s`` bounds each collective; None keeps torch's default.
    """
    context = mp.start_processes(_rank_entry, args=(body, free_port(), collective_timeout_s, args),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks did not finish within {timeout_s} s")
