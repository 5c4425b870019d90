"""Spawning gloo ranks on CPU for the torch.distributed tests."""
import datetime
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    finally:
        dist.destroy_process_group()


def run_ranks(body, *args, timeout_s, collective_timeout_s=None, abort_retries=3):
    """Run ``body(rank, *args)`` on WORLD_SIZE spawned ranks in one gloo group.

    ``body`` must be a module-level function (it is pickled). A rank's exception fails the test,
    and so does not finishing within ``timeout_s``. ``collective_timeout_s`` bounds each
    collective; None keeps torch's default. ``abort_retries``: how often to run the ranks again
    when one dies by SIGABRT inside torch's C++ ("terminate called without an active
    exception", seen in 1 of 20 to 1 of 3 runs of the FSDP2 and ZeRO tests) rather than by a
    Python error; each such rerun is reported as a warning.
    """
    for attempt in range(abort_retries + 1):
        try:
            _run_once(body, args, timeout_s, collective_timeout_s)
            return
        except mp.ProcessExitedException as error:
            if error.signal_name != "SIGABRT" or attempt == abort_retries:
                raise
            warnings.warn(f"rank {error.error_index} aborted in C++ ({error}); running the ranks "
                          f"again", RuntimeWarning)


def _run_once(body, args, timeout_s, collective_timeout_s):
    context = mp.start_processes(_rank_entry, args=(body, free_port(), collective_timeout_s, args),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks did not finish within {timeout_s} s")
