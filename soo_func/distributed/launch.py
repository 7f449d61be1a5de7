"""Run a function on N local ranks (spawned processes, a gloo or NCCL group on localhost),
with a deadline: the tests, the benchmark and single-node experiments. A multi-node job is
launched by ``torchrun`` instead (see the example ``examples/distributed_logreg.py``)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["free_port", "run_local"]


def free_port() -> int:
    """A TCP port free on localhost now (bound to port 0 and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, threads: int | None, job, args):
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        job(rank, world_size, *args)
    except BaseException:  # reported, then a non-zero exit code for the parent
        sys.stderr.write(f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def run_local(
    job: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 600.0,
    num_threads: int | None = 1,
) -> list[int | None]:
    """Call ``job(rank, world_size, *args)`` on ``world_size`` spawned ranks of a fresh
    process group; return their exit codes (0: returned; 1: raised; negative: killed).

    ``job`` must be importable (a module-level function) and writes its own results.
    Ranks still running after ``timeout`` seconds are killed, so a hung collective cannot
    hang the caller. ``num_threads``: ``OMP_NUM_THREADS`` and ``torch.set_num_threads``
    in each rank (``None``: unchanged).
    """
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    saved = os.environ.get("OMP_NUM_THREADS")
    if num_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
    try:
        procs = [
            ctx.Process(
                target=_rank_main, args=(r, world_size, port, backend, num_threads, job, args)
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
    return [p.exitcode for p in procs]
