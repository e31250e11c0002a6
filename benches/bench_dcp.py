"""torch.distributed.checkpoint on 2 gloo ranks: fastadapter's StorageWriter/StorageReader against DCP's
FileSystemWriter and torch's HuggingFaceStorageWriter (per-rank files, and consolidated afterwards), and
the ceiling: each rank writing its bytes with one `write()` to a new file of its own (`raw_write`), or
with one `pwrite()` at its offset of one file the ranks share (`raw_write_shared`: a consolidated file is
one inode, whose lock serialises buffered writes); and `dcp_no_io`, a `dcp.save` through a plugin that
plans and resolves every item but writes nothing (DCP's own cost: the plan collectives, pickling,
resolving), which no plugin can go below. Loads are measured against `floor`: each rank reading as many
bytes of the consolidated file with one `preadv()` into memory it holds (the one copy any reader makes),
and against `dcp_no_io`, a `dcp.load` through a reader that plans, resolves and commits every item but
reads nothing (DCP's own cost of a load: what every plugin pays on top of its reads).

64 tensors, `Shard(0)` over the ranks, fp32: 512 MiB on 2 ranks by default (64 MiB with
FASTADAPTER_BENCH_QUICK=1); FASTADAPTER_BENCH_DCP_WORLD and FASTADAPTER_BENCH_DCP_MIB change both,
FASTADAPTER_BENCH_DCP_ROUNDS the timed rounds per block. Every save goes to a fresh directory (the previous
one removed and `os.sync()` untimed), no fsync for anyone (`sync_files=False`), unless
FASTADAPTER_BENCH_DCP_FSYNC=1: then every contender makes its files durable (the ceilings `fsync` theirs).
The ranks are spawned once and kept; a round is the parent sending the command to both ranks and
receiving both replies (the same pipe round trip for every contender).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from _ranks import Ranks, join, pwrite_all, schedule, sharded_state, time_save  # type: ignore[import-not-found]
from conftest import QUICK

WORLD = int(os.environ.get("FASTADAPTER_BENCH_DCP_WORLD", "2"))
TENSORS = 64
COLS = 1024
ROWS = 4 * int(os.environ.get("FASTADAPTER_BENCH_DCP_MIB", "64" if QUICK else "512"))  # fp32 rows of 4 KiB
NBYTES = TENSORS * ROWS * COLS * 4
BLOCKS = 1 if QUICK else 2
ROUNDS = 1 if QUICK else int(os.environ.get("FASTADAPTER_BENCH_DCP_ROUNDS", "3"))
FSYNC = os.environ.get("FASTADAPTER_BENCH_DCP_FSYNC") == "1"
SAVE_CONTENDERS = (
    "fastadapter",
    "fastadapter_per_rank",
    "torch_filesystem",
    "torch_hf",
    "torch_hf_consolidated",
    "raw_write",
    "raw_write_shared",
    "dcp_no_io",
)
LOAD_CONTENDERS = ("fastadapter", "torch_hf_reader", "floor", "dcp_no_io")


def _no_io_writer() -> type:
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    from fastadapter.dcp import StorageWriter

    class NoIoWriter(StorageWriter):  # type: ignore[misc]
        def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
            return plans

        def write_data(self, plan: Any, planner: Any) -> Any:
            results = []
            for item in plan.items:
                data = planner.resolve_data(item)
                size = data.nbytes if item.type != WriteItemType.BYTE_IO else 0
                results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=None))
            future: Future[list[Any]] = Future()
            future.set_result(results)
            return future

        def finish(self, metadata: Any, results: Any) -> None:
            pass

    return NoIoWriter


def _no_io_reader() -> type:
    from torch.futures import Future

    from fastadapter.dcp import StorageReader

    class NoIoReader(StorageReader):  # type: ignore[misc]
        """Plans, resolves and commits every read item, reads nothing: DCP's own cost of a load."""

        def read_data(self, plan: Any, planner: Any) -> Any:
            for item in plan.items:
                planner.commit_tensor(item, planner.resolve_tensor(item))
            future: Future[None] = Future()
            future.set_result(None)
            return future

    return NoIoReader


def _worker(rank: int, port: int, conn: Any) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import (
        FileSystemWriter,
        HuggingFaceStorageReader,
        HuggingFaceStorageWriter,
    )
    from torch.distributed.tensor import Shard, zeros

    from fastadapter.dcp import StorageReader, StorageWriter

    _NoIoWriter, _NoIoReader = _no_io_writer(), _no_io_reader()
    join(rank, port, WORLD)
    state, local = sharded_state(WORLD, TENSORS, ROWS, COLS)
    mesh = next(iter(state.values())).device_mesh
    target = {k: zeros((ROWS, COLS), device_mesh=mesh, placements=[Shard(0)]) for k in state}

    floor_buffer = torch.empty_like(local)

    def save(contender: str, out: str) -> None:
        if contender in ("raw_write", "raw_write_shared"):
            shared = contender == "raw_write_shared"
            if rank == 0:
                os.makedirs(out, exist_ok=True)
            dist.barrier()  # the directory exists before any rank opens its file
            name = os.path.join(out, "shared" if shared else f"rank-{rank}")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | (0 if shared else os.O_TRUNC), 0o644)
            try:
                pwrite_all(fd, local.numpy().data, rank * local.nbytes if shared else 0)
                if FSYNC:
                    os.fsync(fd)
            finally:
                os.close(fd)
            dist.barrier()
            return
        if contender == "fastadapter":
            writer: Any = StorageWriter(out, sync_files=FSYNC)
        elif contender == "fastadapter_per_rank":
            writer = StorageWriter(out, consolidate=False, sync_files=FSYNC)
        elif contender == "dcp_no_io":
            writer = _NoIoWriter(out)
        elif contender == "torch_filesystem":
            writer = FileSystemWriter(out, sync_files=FSYNC)
        else:
            writer = HuggingFaceStorageWriter(
                out, save_distributed=True, enable_consolidation=contender == "torch_hf_consolidated"
            )
            writer.sync_files = FSYNC
        dcp.save(state, storage_writer=writer)

    def load(contender: str, path: str) -> None:
        if contender == "floor":
            # As many bytes as this rank's shards, from this rank's share of the file, one preadv().
            fd = os.open(os.path.join(path, "model.safetensors"), os.O_RDONLY)
            try:
                _pread_all(fd, floor_buffer.numpy().data, rank * floor_buffer.nbytes)
            finally:
                os.close(fd)
            dist.barrier()
            return
        if contender == "dcp_no_io":
            reader: Any = _NoIoReader(path)
        else:
            reader = StorageReader(path) if contender == "fastadapter" else HuggingFaceStorageReader(path)
        dcp.load(target, storage_reader=reader)

    while True:
        command, contender, path = conn.recv()
        if command == "stop":
            break
        try:
            if command == "save":
                save(contender, path)
            elif command == "load":
                load(contender, path)
            elif command == "check":
                for k, t in state.items():
                    assert torch.equal(target[k].to_local(), t.to_local()), k
            conn.send(("ok", None))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


def _pread_all(fd: int, into: memoryview, offset: int) -> None:
    into = into.cast("B")
    while into:
        n = os.preadv(fd, [into], offset)
        if n == 0:
            raise EOFError(f"file ends at {offset}")
        into, offset = into[n:], offset + n


@pytest.fixture(scope="module")
def ranks() -> Iterator[tuple[Ranks, Path]]:
    root = Path(tempfile.mkdtemp(prefix="fastadapter-bench-dcp-"))
    r = Ranks(_worker, WORLD)
    r.run("save", "fastadapter", str(root / "readme"))  # the checkpoint both readers load
    try:
        yield r, root
    finally:
        r.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("block", "contender"),
    schedule(SAVE_CONTENDERS, BLOCKS),
    ids=[f"b{b}-{c}" for b, c in schedule(SAVE_CONTENDERS, BLOCKS)],
)
def test_dcp_save(benchmark: Any, ranks: tuple[Ranks, Path], block: int, contender: str) -> None:
    r, root = ranks
    benchmark.group = f"dcp save, {WORLD} gloo ranks, Shard(0){', fsync' if FSYNC else ''}"
    benchmark.extra_info.update(contender=contender, block=block, bytes=NBYTES, tensors=TENSORS)
    time_save(benchmark, r, contender, root / f"save-{contender}", ROUNDS)


@pytest.mark.parametrize(
    ("block", "contender"),
    schedule(LOAD_CONTENDERS, BLOCKS),
    ids=[f"b{b}-{c}" for b, c in schedule(LOAD_CONTENDERS, BLOCKS)],
)
def test_dcp_load(benchmark: Any, ranks: tuple[Ranks, Path], block: int, contender: str) -> None:
    r, root = ranks
    benchmark.group = f"dcp load of the consolidated checkpoint, {WORLD} gloo ranks, Shard(0)"
    benchmark.extra_info.update(contender=contender, block=block, bytes=NBYTES, tensors=TENSORS)
    benchmark.pedantic(lambda: r.run("load", contender, str(root / "readme")), rounds=ROUNDS, warmup_rounds=1)
    if contender not in ("floor", "dcp_no_io"):
        r.run("check", contender, "")
