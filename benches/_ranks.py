"""The multi-rank benches' harness: N gloo ranks in spawned processes that run each command in
lockstep, and the interleaved block schedule they time contenders in."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def join(rank: int, port: int, world: int) -> None:
    """Join the gloo group as `rank` of `world`, with one torch thread (the ranks share the cores)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(600)
    )


def sharded_state(world: int, tensors: int, rows: int, cols: int) -> tuple[dict[str, Any], Any]:
    """`tensors` seeded fp32 (rows, cols) tensors sharded Shard(0) over a 1-D mesh of the group (the same on
    every run), and this rank's bytes of them in one contiguous tensor (what a ceiling writes)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    state = {
        f"layers.{i}.weight": distribute_tensor(torch.randn(rows, cols, generator=g), mesh, [Shard(0)])
        for i in range(tensors)
    }
    return state, torch.cat([t.to_local().reshape(-1) for t in state.values()])


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """`data` written at `offset` of `fd` with as few `pwrite()` calls as the kernel takes (one, at
    these sizes): the ceilings' write."""
    data = data.cast("B")
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ranks:
    """`world` processes running `worker(rank, port, conn)`: each receives (command, contender, path)
    tuples and answers ("ok", value) or ("error", traceback) until ("stop", "", "")."""

    def __init__(self, worker: Callable[[int, int, Any], None], world: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        port = free_port()
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(rank, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, command: str, contender: str = "", path: str = "") -> Any:
        """Every rank runs the command; rank 0's answer (a rank's error is raised here)."""
        for c in self.conns:
            c.send((command, contender, path))
        replies = [c.recv() for c in self.conns]
        errors = [r[1] for r in replies if r[0] != "ok"]
        if errors:
            raise RuntimeError(errors[0])
        return replies[0][1]

    def stop(self) -> None:
        for c in self.conns:
            c.send(("stop", "", ""))
        for p in self.procs:
            p.join(60)


def schedule(contenders: tuple[str, ...], blocks: int) -> list[tuple[int, str]]:
    """(block, contender) in run order, each block starting one contender later than the previous:
    a slow phase of the shared machine lands on all of them."""
    n = len(contenders)
    return [(b, contenders[(b + i) % n]) for b in range(blocks) for i in range(n)]


def time_save(benchmark: Any, ranks: Ranks, contender: str, out: Path, rounds: int) -> None:
    """Time the ranks' `save` of `contender` into `out`, each round into a new directory (the previous
    one removed untimed, after which `os.sync()`: no writeback in flight)."""

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()

    benchmark.pedantic(
        lambda: ranks.run("save", contender, str(out)), setup=fresh, rounds=rounds, warmup_rounds=1
    )
