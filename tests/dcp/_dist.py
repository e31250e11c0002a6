"""Running a test body on N gloo ranks (CPU): torch.multiprocessing spawn, one process per rank."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 60) -> None:
    """Run `fn(rank, world, *args)` on `world` spawned gloo ranks; a failure in any rank raises here
    with that rank's traceback."""
    port = free_port()
    mp.start_processes(_main, args=(fn, world, port, timeout_s, args), nprocs=world, start_method="spawn")


def _main(
    rank: int, fn: Callable[..., None], world: int, port: int, timeout_s: float, args: tuple[Any, ...]
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # The rank's work is done and checked: leave without the interpreter's teardown, where gloo's C++
    # objects can abort a process (a known torch/gloo shutdown problem, pytorch#179291). Once in a CI run
    # here a rank aborted with `terminate called without an active exception` and no Python error.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
