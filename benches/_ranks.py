"""The multi-rank benches' harness: N gloo ranks in spawned processes that run each command in
lockstep, and the interleaved block schedule they time contenders in."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


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
