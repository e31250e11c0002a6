"""Per-rank checkpoints (`save(..., per_rank=True)`) read back in one process: each rank's own state dict
from the per-process parts `checkpoint-<step>/rank-<r>-of-<n>/` that earlier versions wrote in every job
(and jobs without torch.distributed still write), written here by hand as those versions laid them out
and through that path (sharded parts, tied aliases); a job of another world size is refused. DCP's
per-rank layout (a torch.distributed job) is tested in tests/dcp/test_dcp_checkpointer.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastadapter import Checkpointer
from fastadapter.errors import WorldSizeError

META = "fastadapter_checkpoint.json"


def rank_state(rank: int) -> dict[str, torch.Tensor]:
    """The same keys on both ranks with other shapes and values, and a key of one rank only."""
    g = torch.Generator().manual_seed(rank)
    return {
        "rng_state": torch.randint(0, 256, (16,), dtype=torch.uint8, generator=g),
        "optim.exp_avg": torch.randn(2 + rank, 3, generator=g),
        "optim.exp_avg_sq": torch.randn(4, generator=g).to(torch.bfloat16),
        "optim.step": torch.tensor(7 + rank),
        f"only.rank{rank}": torch.arange(3, dtype=torch.int32),
    }


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, t in expected.items():
        assert got[key].dtype == t.dtype, key
        assert torch.equal(got[key], t), key


def write_old_checkpoint(root: Path, step: int, world: int) -> None:
    """A per-rank checkpoint as fastadapter wrote it before DCP: one directory per rank with its
    `model.safetensors` and `fastadapter_checkpoint.json`, nothing at the top."""
    for rank in range(world):
        part = root / f"checkpoint-{step}" / f"rank-{rank:05d}-of-{world:05d}"
        part.mkdir(parents=True)
        save_file(rank_state(rank), str(part / "model.safetensors"), metadata={"format": "pt"})
        meta = {"format": "fastadapter-checkpoint", "version": 1, "step": step, "kind": "full"}
        meta["extra"] = {"rank": rank}
        (part / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def test_old_per_rank_checkpoint_loads_each_ranks_own_state(tmp_path: Path) -> None:
    write_old_checkpoint(tmp_path, 5, world=2)
    for rank in range(2):
        ck = Checkpointer(tmp_path, rank=rank, world_size=2)
        assert ck.steps() == [5]
        assert_same_state(ck.load(), rank_state(rank))
        assert ck.extra(5) == {"rank": rank}


def test_old_per_rank_checkpoint_loads_into_a_module(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2)
    part = tmp_path / "checkpoint-1" / "rank-00001-of-00002"
    part.mkdir(parents=True)
    save_file(module.state_dict(), str(part / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "checkpoint-1" / "rank-00000-of-00002").mkdir()  # rank 0's part: not read by rank 1
    fresh = torch.nn.Linear(3, 2)
    Checkpointer(tmp_path, rank=1, world_size=2).load(1, fresh)
    assert_same_state(fresh.state_dict(), module.state_dict())


def test_per_process_parts_sharded_with_aliases_load_back(tmp_path: Path) -> None:
    """Without torch.distributed every process publishes its own part, sharded by `max_shard_size`,
    tied weights stored once: each loads its own back, aliases restored."""
    states = []
    for rank in range(2):
        state = rank_state(rank)
        state["tied"] = state["optim.exp_avg"]
        states.append(state)
        with Checkpointer(tmp_path, rank=rank, world_size=2, max_shard_size=40) as ck:
            ck.save(3, state, per_rank=True, extra={"rank": rank})
    part = tmp_path / "checkpoint-3" / "rank-00001-of-00002"
    assert (part / "model.safetensors.index.json").is_file()
    for rank in range(2):
        ck = Checkpointer(tmp_path, rank=rank, world_size=2)
        got = ck.load(3)
        assert_same_state(got, states[rank])
        assert got["tied"] is got["optim.exp_avg"]
        assert ck.extra(3) == {"rank": rank}


def test_another_world_size_is_refused_naming_the_checkpoint(tmp_path: Path) -> None:
    write_old_checkpoint(tmp_path, 5, world=2)
    module = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for world_size in (1, 4):
        ck = Checkpointer(tmp_path, rank=0, world_size=world_size)
        with pytest.raises(WorldSizeError, match=rf"checkpoint-5 is .* of 2 ranks, .* has {world_size}"):
            ck.load(5, module)
        with pytest.raises(WorldSizeError):
            ck.extra(5)
    assert_same_state(module.state_dict(), before)  # untouched
