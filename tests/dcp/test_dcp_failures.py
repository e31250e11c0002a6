"""A failed or killed distributed save never touches the published checkpoint: everything is written into
a hidden directory beside it, renamed into place only by the coordinator's `finish`. Also: what the writer
refuses, and `dcp.async_save` (thread and process executors) with it."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _dist import run_ranks
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import fastadapter._core as core
import fastadapter.dcp.writer as writer_module
from fastadapter.dcp import StorageReader, StorageWriter


def state(value: float) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = {f"w{i}": torch.full((64, 32), value + i) for i in range(3)}
    out: dict[str, Any] = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    out["step"] = int(value)  # a non-tensor entry: DCP's BYTE_IO
    return out


def loaded(path: Path) -> dict[str, Any]:
    target: dict[str, Any] = {f"w{i}": torch.zeros(64, 32) for i in range(3)}
    target["step"] = -1
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(target, storage_reader=StorageReader(path), no_dist=True)
    return target


def die_while_writing(rank: int, world: int, path: Path) -> None:
    dcp.save(state(1.0), storage_writer=StorageWriter(path, sync_files=False))
    if rank == 1:

        class DyingCore:
            def __getattr__(self, name: str) -> Any:
                return getattr(core, name)

            @staticmethod
            def write_chunks(files: Any, fsync: bool) -> int:
                core.write_chunks(files, fsync)  # this rank's bytes are in the new files ...
                os.kill(os.getpid(), signal.SIGKILL)  # ... and it dies before the save is complete
                return 0

        writer_module._core = DyingCore()  # type: ignore[assignment]
    dcp.save(state(2.0), storage_writer=StorageWriter(path, sync_files=False))


def test_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    with pytest.raises(Exception, match=r"signal|SIGKILL|exit"):
        run_ranks(die_while_writing, 2, path, timeout_s=20)
    before = sorted(p.name for p in path.iterdir())
    assert before[:2] == ["dcp_objects.json", "model.safetensors"]
    assert len(before) == 3
    assert before[2].startswith("objects-")
    got = loaded(path)
    for i in range(3):
        assert torch.equal(got[f"w{i}"], torch.full((64, 32), 1.0 + i))
    assert got["step"] == 1
    # What the dead save wrote is only a hidden directory beside the checkpoint, never inside it ...
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftovers
    assert all(name.startswith(".ckpt.tmp-") for name in leftovers)
    # ... which the next save to the same path removes (its writer is gone). The checkpoint that save
    # replaces is deleted on the release thread.
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"w0": torch.ones(2)}, storage_writer=StorageWriter(path, sync_files=False), no_dist=True)
    core.wait_released()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def fail_then_succeed(rank: int, world: int, path: Path) -> None:
    dcp.save(state(1.0), storage_writer=StorageWriter(path, sync_files=False))
    published = {p.name: p.read_bytes() for p in path.iterdir()}

    class FailingWriter(StorageWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            if self.rank == 1:
                raise OSError(28, "No space left on device")
            return super().write_data(plan, planner)

    with pytest.raises(CheckpointException) as failed:
        dcp.save(state(2.0), storage_writer=FailingWriter(path, sync_files=False))
    assert list(failed.value.failures) == [1]
    dist.barrier()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == published
    dcp.save(state(3.0), storage_writer=StorageWriter(path, sync_files=True))
    dist.barrier()
    assert {p.name: p.read_bytes() for p in path.iterdir()} != published
    published = {p.name: p.read_bytes() for p in path.iterdir()}

    class ElsewhereWriter(StorageWriter):
        """Rank 1 as if on a node that does not share the file system: it cannot see the directory."""

        def write_data(self, plan: Any, planner: Any) -> Any:
            if self.rank == 1:
                elsewhere = dataclasses.replace(
                    plan.storage_data, staging=plan.storage_data.staging + "-elsewhere"
                )
                plan = dataclasses.replace(plan, storage_data=elsewhere)
            return super().write_data(plan, planner)

    with pytest.raises(CheckpointException) as failed:
        dcp.save(state(5.0), storage_writer=ElsewhereWriter(path, sync_files=False))
    assert "SharedStorageError" in str(failed.value.failures)
    assert "consolidate=False" in str(failed.value.failures)
    dist.barrier()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == published


def async_saves(rank: int, world: int, root: Path) -> None:
    for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
        path = root / kind.value
        future = dcp.async_save(state(4.0), storage_writer=StorageWriter(path), async_checkpointer_type=kind)
        future.result()  # type: ignore[union-attr]
        dist.barrier()


def test_failed_save_keeps_published_files_and_async_saves_publish(tmp_path: Path) -> None:
    run_ranks(fail_then_succeed, 2, tmp_path / "ckpt")
    got = loaded(tmp_path / "ckpt")
    assert torch.equal(got["w0"], torch.full((64, 32), 3.0))
    assert got["step"] == 3
    run_ranks(async_saves, 2, tmp_path)
    for kind in ("thread", "process"):
        got = loaded(tmp_path / kind)
        assert torch.equal(got["w2"], torch.full((64, 32), 6.0))
        assert got["step"] == 4


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # warned on DCP's thread
def test_async_save_returns_before_the_write(tmp_path: Path) -> None:
    """The caller's stall is the staging copy: `async_save` returns while the writer is still held."""
    release = threading.Event()
    writing = threading.Event()

    class HeldWriter(StorageWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            writing.set()
            assert release.wait(30)
            return super().write_data(plan, planner)

    sd = {"w": torch.arange(12.0).reshape(3, 4)}
    future = dcp.async_save(sd, storage_writer=HeldWriter(tmp_path / "c"), no_dist=True)
    assert writing.wait(30)
    assert not (tmp_path / "c").exists()  # returned, nothing published yet
    sd["w"].zero_()  # the loop goes on: the checkpoint holds the staged copy
    release.set()
    future.result()  # type: ignore[union-attr]
    target = {"w": torch.zeros(3, 4)}
    dcp.load(target, storage_reader=StorageReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(target["w"], torch.arange(12.0).reshape(3, 4))


def test_a_directory_with_other_files_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="single process"), pytest.raises(CheckpointException) as failed:
        dcp.save({"w": torch.ones(2)}, storage_writer=StorageWriter(tmp_path), no_dist=True)
    assert "FileExistsError" in str(failed.value.failures)
    assert "config.json" in str(failed.value.failures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
