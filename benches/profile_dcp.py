"""Where a `dcp.save` through `fastadapter.dcp.StorageWriter` spends its time, phase by phase, on gloo ranks.

Same state as bench_dcp.py (64 fp32 tensors, `Shard(0)`; FASTADAPTER_BENCH_DCP_WORLD / _MIB / _FSYNC). Each
plugin call is timed on every rank (timestamps relative to the start of `dcp.save`, medians over the
rounds), so the gaps between them are DCP's own work: its local planning, the gather of the plans to the
coordinator (pickled), the global plan and its scatter, the gather of the write results, the broadcast
after `finish`. Inside `write_data`, the Python preparation and the Rust write (`_core.write_chunks`) are
timed apart; inside `finish`, the publish (`_core.publish_dir`). Beside it, each rank writing its bytes
with one `pwrite()` into one shared file and into a file of its own, and a bare gloo barrier.

Usage: flock /tmp/fastadapter-bench.lock .venv/bin/python benches/profile_dcp.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

WORLD = int(os.environ.get("FASTADAPTER_BENCH_DCP_WORLD", "2"))
MIB = int(os.environ.get("FASTADAPTER_BENCH_DCP_MIB", "512"))
FSYNC = os.environ.get("FASTADAPTER_BENCH_DCP_FSYNC") == "1"
ROUNDS = int(os.environ.get("FASTADAPTER_BENCH_DCP_ROUNDS", "5"))
TENSORS, COLS = 64, 1024
ROWS = 4 * MIB


def _worker(rank: int, port: int, root: str, queue: Any) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from _ranks import join, sharded_state  # type: ignore[import-not-found]
    from fastadapter import _core
    from fastadapter.dcp import StorageWriter, writer

    join(rank, port, WORLD)
    state, local = sharded_state(WORLD, TENSORS, ROWS, COLS)
    events: dict[str, float] = {}
    start = [0.0]

    def mark(name: str) -> None:
        events[name] = time.perf_counter() - start[0]

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            mark(f"{name} in")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(f"{name} out")

        return wrapper

    class Timed(StorageWriter):  # type: ignore[misc]
        pass

    for method in ("prepare_local_plan", "prepare_global_plan", "write_data", "finish"):
        setattr(Timed, method, timed(method, getattr(StorageWriter, method)))
    writer._core = type(  # type: ignore[attr-defined]
        "TimedCore",
        (),
        {
            "write_chunks": staticmethod(timed("rust write_chunks", _core.write_chunks)),
            "publish_dir": staticmethod(timed("rust publish_dir", _core.publish_dir)),
            "stage_bytes": staticmethod(_core.stage_bytes),
            "plan_header": staticmethod(_core.plan_header),
        },
    )

    rows: dict[str, list[float]] = defaultdict(list)
    for i in range(ROUNDS + 1):
        out = os.path.join(root, "ckpt")
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
        dist.barrier()
        events.clear()
        start[0] = time.perf_counter()
        dcp.save(state, storage_writer=Timed(out, sync_files=FSYNC))
        mark("dcp.save returned")
        t = time.perf_counter()
        dist.barrier()
        events["(gloo barrier alone)"] = time.perf_counter() - t
        for kind in ("own", "shared"):
            path = os.path.join(root, f"raw-{kind}-{rank}" if kind == "own" else "raw-shared")
            dist.barrier()
            t = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(fd, local.numpy().data, 0 if kind == "own" else rank * local.nbytes)
            if FSYNC:
                os.fsync(fd)
            os.close(fd)
            dist.barrier()
            events[f"(one pwrite per rank, {kind} file, + barrier)"] = time.perf_counter() - t
            dist.barrier()
            if rank == 0:
                for n in os.listdir(root):
                    if n.startswith("raw-"):
                        os.unlink(os.path.join(root, n))
        if i:  # the first round warms up
            for k, v in events.items():
                rows[k].append(v)
    queue.put((rank, {k: statistics.median(v) for k, v in rows.items()}))
    dist.destroy_process_group()


def main() -> None:
    from _ranks import free_port

    root = tempfile.mkdtemp(prefix="fastadapter-profile-dcp-")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, root, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(root, ignore_errors=True)
    mb = TENSORS * ROWS * COLS * 4 / 1e6
    print(
        f"dcp.save phases, {WORLD} gloo ranks, {mb:.0f} MB Shard(0), fsync={FSYNC}, median of {ROUNDS} "
        f"rounds, ms from the start of dcp.save; load average {os.getloadavg()[0]:.1f}"
    )
    names = sorted(results[0], key=lambda k: (k.startswith("("), results[0][k]))
    print("| event | " + " | ".join(f"rank {r}" for r in range(WORLD)) + " |")
    print("|---|" + "---:|" * WORLD)
    for name in names:
        cells = [f"{results[r][name] * 1e3:.1f}" if name in results[r] else "" for r in range(WORLD)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
