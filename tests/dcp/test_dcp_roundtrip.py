"""fastadapter.dcp's writer and reader against DCP's own: DTensor state dicts of every placement, dtype
and uneven or empty shard round-trip through ours, through ours into torch's reader and through torch's
writer into ours, across world sizes (2 -> 4 -> 1); the consolidated file equals
`safetensors.torch.save_file` of the full tensors, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _dist import run_ranks
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from fastadapter.dcp import StorageReader, StorageWriter

# name -> (dtype, shape, placement when saved, placement when loaded)
SPEC: dict[str, tuple[torch.dtype, tuple[int, ...], Placement, Placement]] = {
    "layers.0.rows": (torch.float32, (7, 5), Shard(0), Shard(1)),  # uneven rows
    "layers.0.cols": (torch.bfloat16, (6, 9), Shard(1), Shard(0)),  # strided runs
    "layers.1.repl": (torch.int64, (3, 4), Replicate(), Shard(0)),
    "layers.1.empty_shard": (torch.float32, (1, 8), Shard(0), Shard(1)),  # a rank holds no rows
    "layers.2.cube": (torch.float16, (4, 6, 5), Shard(1), Shard(2)),
    "layers.2.bytes": (torch.int8, (10,), Shard(0), Replicate()),
    "layers.3.zero_size": (torch.float32, (0, 3), Shard(0), Replicate()),
}


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (dtype, shape, _, _) in SPEC.items():
        values = torch.randn(shape, generator=g) * 50
        out[name] = values.to(dtype)
    out["scale"] = torch.tensor(3.5)  # a plain (not distributed) 0-d tensor, the same on every rank
    return out


def sharded(saving: bool) -> dict[str, torch.Tensor]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out: dict[str, torch.Tensor] = {}
    for name, full in full_tensors().items():
        if name not in SPEC:
            out[name] = full.clone() if saving else torch.zeros_like(full)
            continue
        placement = SPEC[name][2] if saving else SPEC[name][3]
        source = full if saving else torch.zeros_like(full)
        out[name] = distribute_tensor(source, mesh, [placement])
    return out


def assert_holds_full(state: dict[str, torch.Tensor]) -> None:
    expected = full_tensors()
    for name, t in state.items():
        got = t.full_tensor() if isinstance(t, DTensor) else t
        assert got.dtype == expected[name].dtype, name
        assert torch.equal(got, expected[name]), name


def load_with(reader: dcp.StorageReader, no_dist: bool = False) -> None:
    state = (
        sharded(saving=False) if not no_dist else {k: torch.zeros_like(v) for k, v in full_tensors().items()}
    )
    dcp.load(state, storage_reader=reader, no_dist=no_dist)
    assert_holds_full(state)


def save_two_ways(rank: int, world: int, root: Path) -> None:
    state = sharded(saving=True)
    dcp.save(state, storage_writer=StorageWriter(root / "ours", sync_files=False))
    dcp.save(state, storage_writer=StorageWriter(root / "ours_per_rank", consolidate=False, sync_files=False))
    dcp.save(
        state, storage_writer=HuggingFaceStorageWriter(str(root / "torch_sharded"), save_distributed=True)
    )
    dist.barrier()
    # Ours, read back by ours and by torch's reader; torch's per-rank files and our per-rank files by ours.
    load_with(StorageReader(root / "ours"))
    load_with(HuggingFaceStorageReader(str(root / "ours")))
    load_with(HuggingFaceStorageReader(str(root / "ours_per_rank")))
    load_with(StorageReader(root / "ours_per_rank"))
    load_with(StorageReader(root / "torch_sharded"))


def reshard_to_four(rank: int, world: int, root: Path) -> None:
    load_with(StorageReader(root / "ours"))
    load_with(StorageReader(root / "torch_sharded"))
    state = sharded(saving=True)
    dcp.save(state, storage_writer=StorageWriter(root / "from_four", sync_files=False))


def test_round_trips_across_plugins_and_world_sizes(tmp_path: Path) -> None:
    run_ranks(save_two_ways, 2, tmp_path)
    run_ranks(reshard_to_four, 4, tmp_path)
    # One process, no process group: the 4-rank checkpoint into plain tensors.
    with pytest.warns(UserWarning, match="single process"):
        load_with(StorageReader(tmp_path / "from_four"), no_dist=True)

    reference = tmp_path / "reference.safetensors"
    save_file(full_tensors(), reference, metadata={"format": "pt"})
    for written in ("ours", "from_four"):
        assert sorted(p.name for p in (tmp_path / written).iterdir()) == ["model.safetensors"]
        assert (tmp_path / written / "model.safetensors").read_bytes() == reference.read_bytes()
    with safe_open(tmp_path / "ours" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in full_tensors().items():
            assert torch.equal(f.get_tensor(name), t), name
    # Nothing hidden left beside the published checkpoints.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
