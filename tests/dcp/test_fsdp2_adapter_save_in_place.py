"""`fastadapter.save` on every rank of an FSDP2-sharded PeftModel writes each rank's slices in place: the
directory equals PEFT's `save_pretrained` of the same model unsharded, byte for byte, on 2 and 4 gloo
ranks, fp32 and bf16, with uneven and empty shards, without any rank gathering (`full_tensor` is made to
raise). Tensor-parallel placements (`Shard(1)`, `Replicate`, a 2-D mesh) given as `state_dict=` are
written in place too; `Partial` falls back to the gather. A rank failing mid-write, or the coordinator's
publish failing after every rank wrote, makes every rank raise and leaves the previous directory as it
was; a rank that cannot see the coordinator's file (storage not shared) makes the save fall back to the
gather, with the same bytes. `is_main_process`: several main ranks publish one copy, none publishes
nothing."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from _dist import run_ranks
from peft import PeftModel
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import fastadapter
from fastadapter import _core, _sharded_save
from fastadapter._fileset import FileSet
from fastadapter.errors import RankFailedError
from helpers import (
    CONFIG,
    SAFETENSORS,
    assert_same_config,
    leftovers,
    lora_config,
    make_peft,
    snapshot,
    tiny_llama,
)

# r=3 splits 2/1 over 2 ranks and 1/1/1/0 over 4 (uneven, and an empty shard); down_proj's r=1 leaves every
# rank but rank 0 an empty lora_A shard.
TARGETS = ["q_proj", "v_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peft_model(dtype: torch.dtype, seed: int = 3) -> PeftModel:
    base = tiny_llama(seed=0).to(dtype)
    config = lora_config(r=3, lora_alpha=6, target_modules=TARGETS, rank_pattern={"down_proj": 1})
    return make_peft(base, config, seed=seed, autocast_adapter_dtype=False)


def shard(model: PeftModel) -> None:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


@contextmanager
def no_gather() -> Iterator[None]:
    """`DTensor.full_tensor` raises inside: the save must not gather."""
    original = DTensor.full_tensor

    def refuse(self: DTensor, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a rank gathered an adapter tensor")

    DTensor.full_tensor = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        DTensor.full_tensor = original  # type: ignore[method-assign]


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def save_on_ranks(rank: int, world: int, root: Path) -> None:
    for tag, dtype in DTYPES.items():
        model = peft_model(dtype)
        full = {k: v.detach().clone() for k, v in lora_state(model).items()}
        if rank == 0:
            model.save_pretrained(root / f"peft-{tag}")
        shard(model)
        assert all(isinstance(v, DTensor) for v in lora_state(model).values())
        with no_gather():
            fastadapter.save(model, root / f"ours-{tag}", is_main_process=rank == 0)
            fastadapter.save(model, root / f"every-rank-main-{tag}", is_main_process=True)
            fastadapter.save(model, root / f"no-main-{tag}", is_main_process=False)
            # Tensor-parallel placements, handed over as the state dict to save.
            mesh = init_device_mesh("cpu", (world,))
            placed = {
                k: distribute_tensor(v, mesh, [Shard(1) if "lora_A" in k else Replicate()])
                for k, v in full.items()
            }
            fastadapter.save(
                model, root / f"shard1-{tag}", is_main_process=rank == 0, state_dict=placed, fsync=True
            )
            if world == 4:
                mesh2 = init_device_mesh("cpu", (2, 2))
                hsdp = {
                    k: distribute_tensor(
                        v, mesh2, [Replicate(), Shard(0)] if "lora_A" in k else [Shard(0), Shard(1)]
                    )
                    for k, v in full.items()
                }
                fastadapter.save(model, root / f"mesh2d-{tag}", is_main_process=rank == 0, state_dict=hsdp)
        # A placement the in-place path does not write: every rank gathers (the sum of the partials).
        partial = {
            k: DTensor.from_local(v if rank == 0 else torch.zeros_like(v), mesh, [Partial()])
            for k, v in full.items()
        }
        fastadapter.save(model, root / f"partial-{tag}", is_main_process=rank == 0, state_dict=partial)
    dist.barrier()


def check_saves(root: Path, world: int) -> None:
    for tag in DTYPES:
        peft = root / f"peft-{tag}"
        saved = ["ours", "every-rank-main", "shard1", "partial"] + (["mesh2d"] if world == 4 else [])
        for name in saved:
            ours = root / f"{name}-{tag}"
            assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in peft.iterdir()), name
            assert (ours / SAFETENSORS).read_bytes() == (peft / SAFETENSORS).read_bytes(), (name, tag)
            assert_same_config(ours / CONFIG, peft / CONFIG)
        assert list((root / f"no-main-{tag}").iterdir()) == []
    assert b'"BF16"' in (root / "peft-bf16" / SAFETENSORS).read_bytes()[:2000]


def fail_or_fall_back(rank: int, world: int, root: Path) -> None:
    model = peft_model(torch.float32)
    if rank == 0:
        model.save_pretrained(root / "peft")
    shard(model)
    out = root / "adapter"
    fastadapter.save(peft_model(torch.float32, seed=9), out, is_main_process=rank == 0)  # the previous one
    dist.barrier()
    before = snapshot(out)

    # A write failing on one rank (the coordinator, then another): every rank raises, nothing changes.
    for failing in (1, 0):

        def disk_full(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch.object(_core, "write_chunks", disk_full if rank == failing else _core.write_chunks):
            expected = OSError if rank == failing else RankFailedError
            with pytest.raises(expected, match="No space left on device"):
                fastadapter.save(model, out, is_main_process=rank == 0)
        dist.barrier()
        after, left = snapshot(out), leftovers(out)
        dist.barrier()  # every rank has looked before rank 0 stages the next save's file
        assert after == before, failing
        assert left == [], failing

    # Every rank wrote, then the coordinator's publish (its renames, fsyncs) fails: every rank raises.
    class PublishFails(FileSet):
        def commit(self) -> None:
            raise OSError(errno.EIO, "Input/output error", str(out / SAFETENSORS))

    with mock.patch.object(_sharded_save, "FileSet", PublishFails if rank == 0 else FileSet):
        expected = OSError if rank == 0 else RankFailedError
        with pytest.raises(expected, match=f"Input/output error: '{out / SAFETENSORS}'"):
            fastadapter.save(model, out, is_main_process=rank == 0)
    dist.barrier()
    after, left = snapshot(out), leftovers(out)
    dist.barrier()
    assert after == before
    assert left == []

    # Rank 1 as if on a node that does not share the file system: it cannot see the coordinator's file.
    exchange = _sharded_save._exchange

    def elsewhere(mine: Any) -> list[Any]:
        out = exchange(mine)
        if isinstance(out[0], _sharded_save._Plan):
            out = [dataclasses.replace(p, temps=tuple(t + "-elsewhere" for t in p.temps)) for p in out]
        return out

    gathers, gather = [], _sharded_save.full_tensors

    def counted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gathers.append(len(weights))
        return gather(weights)

    with (
        mock.patch.object(_sharded_save, "_exchange", elsewhere if rank == 1 else exchange),
        mock.patch.object(_sharded_save, "full_tensors", counted),
    ):
        fastadapter.save(model, out, is_main_process=rank == 0)
    dist.barrier()
    assert gathers, "the save did not fall back to the gather"
    assert (out / SAFETENSORS).read_bytes() == (root / "peft" / SAFETENSORS).read_bytes()
    assert leftovers(out) == []


def saves_then_failures(rank: int, world: int, root: Path) -> None:
    save_on_ranks(rank, world, root / "saves")
    fail_or_fall_back(rank, world, root / "failures")


def test_fsdp2_save_in_place_on_2_ranks_equals_unsharded_save_pretrained_failures_raise_on_every_rank(
    tmp_path: Path,
) -> None:
    """One spawn of 2 ranks for both (each spawn costs seconds of imports)."""
    (tmp_path / "saves").mkdir()
    (tmp_path / "failures").mkdir()
    # The gloo timeout bounds a rank left waiting in a collective: a failure that hangs fails the test.
    run_ranks(saves_then_failures, 2, tmp_path, timeout_s=60)
    check_saves(tmp_path / "saves", 2)


def test_fsdp2_save_in_place_on_4_ranks_equals_unsharded_save_pretrained(tmp_path: Path) -> None:
    run_ranks(save_on_ranks, 4, tmp_path, timeout_s=120)
    check_saves(tmp_path, 4)
