"""Ending a torch.distributed rank without an abort at exit.

DDP, ``ZeroRedundancyOptimizer``, FSDP2's ``DeviceMesh`` and the like sit in reference cycles that
keep the C++ process group, and with gloo its worker threads, alive after
``dist.destroy_process_group()`` (which only unregisters the group). When such a worker drops the
last reference to a collective's tensor while the interpreter is finalizing, it needs the GIL, is
ended by ``pthread_exit``, and the forced unwind through a noexcept destructor calls
``std::terminate``: the rank dies by SIGABRT after its work finished. Collecting the cycles before
destroying the group, and leaving without interpreter teardown, removes the cause.
"""
from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def release_process_group() -> None:
    """Collect the objects that still hold the default process group, then destroy it."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def exit_rank(code: int = 0) -> NoReturn:
    """End a rank after its work: release the process group, flush, and ``os._exit(code)``.

    ``os._exit`` skips ``atexit`` handlers and interpreter teardown, where live C++ threads of a
    collective backend would otherwise meet a finalizing interpreter; flush or close anything
    that relies on ``atexit`` (loggers, trackers) before calling it.
    """
    release_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
