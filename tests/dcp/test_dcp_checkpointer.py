"""`Checkpointer` in a torch.distributed job with FSDP2-sharded models: a full model goes through
`fastadapter.dcp` (every rank writes its shards into one consolidated checkpoint, asynchronously, rotated
by `keep_last`) and loads back into the sharded model. A sharded adapter goes the same way, nothing
gathered (`full_tensor` and the all-gathers are made to raise): with `async_save` True and False the
checkpoint holds PEFT's files for the unsharded model byte for byte (an adapter in a subdirectory too),
loads back into a fresh sharded model shard for shard, and a rank failing mid-save or the coordinator's
publish failing raises on every rank and leaves the previous checkpoints as they were. `per_rank=True`
saves every rank's own state dict (other keys, shapes and values on every rank, a rank with none) the
same way, async and sync: each rank writes only its own part, reads it back, and `safe_open` reads
every part; the failures behave the same, and so does a state dict one rank refuses; a job of another
world size is refused."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from _dist import run_ranks
from peft import PeftModel
from safetensors import safe_open
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

from fastadapter import Checkpointer, _core
from fastadapter.errors import RankFailedError, WorldSizeError
from helpers import (
    CONFIG,
    SAFETENSORS,
    add_perturbed_adapter,
    assert_same_config,
    leftovers,
    lora_config,
    make_peft,
    snapshot,
    tiny_llama,
    token_ids,
    tree,
)

# r=3 splits 2/1 over 2 ranks (uneven); down_proj's r=1 leaves rank 1 empty lora_A shards.
TARGETS = ["q_proj", "v_proj", "down_proj"]
CHECKPOINT_FILES = {"fastadapter_checkpoint.json", "trainer_state.json"}
META = "fastadapter_checkpoint.json"
SAFETENSORS_MODEL = "model.safetensors"


def sharded_llama(seed: int) -> torch.nn.Module:
    model = tiny_llama(seed=seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def peft_model(seed: int) -> PeftModel:
    """Adapter "default" at the top of PEFT's directory, "other" in its subdirectory."""
    config = lora_config(r=3, lora_alpha=6, target_modules=TARGETS, rank_pattern={"down_proj": 1})
    model = make_peft(tiny_llama(seed=0), config, seed=seed)
    add_perturbed_adapter(model, "other", lora_config(), seed=seed + 1)
    return model


def shard(model: PeftModel) -> None:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def lora_shards(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.to_local() for k, v in model.state_dict().items() if "lora_" in k}


def no_gather() -> ExitStack:
    """Every way to gather a tensor raises (`full_tensor`, DTensor's all-gather, FSDP2's): DCP's object
    exchanges (`all_gather_object` and the like, through `all_gather`) still work."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a rank gathered a tensor")

    stack = ExitStack()
    stack.enter_context(mock.patch.object(DTensor, "full_tensor", refuse))
    stack.enter_context(mock.patch.object(funcol, "all_gather_tensor", refuse))
    stack.enter_context(mock.patch.object(c10d, "all_gather_into_tensor", refuse))
    stack.enter_context(mock.patch.object(dist, "all_gather_into_tensor", refuse))
    return stack


def full_checkpoints(rank: int, world: int, root: Path) -> None:
    with Checkpointer(root / "full", keep_last=2, fsync=False) as ck:
        for step in (1, 2, 3):
            ck.save(step, sharded_llama(seed=step), extra={"step": step})
        ck.wait()
        dist.barrier()  # rank 0 rotates once its save is published
        assert ck.steps() == [2, 3]
        model = sharded_llama(seed=0)
        ck.load(2, model)
        expected = tiny_llama(seed=2).state_dict()
        for name, t in model.state_dict().items():
            assert torch.equal(t.full_tensor(), expected[name]), name


def adapter_checkpoints(rank: int, world: int, root: Path) -> None:
    model = peft_model(seed=5)
    if rank == 0:
        model.save_pretrained(root / "peft_unsharded")
    shard(model)
    saved = {k: v.clone() for k, v in lora_shards(model).items()}
    for async_save in (True, False):
        out = root / f"adapter-async-{async_save}"
        with Checkpointer(out, keep_last=2, async_save=async_save) as ck:
            with no_gather():
                for step in (1, 2, 3):
                    ck.save(step, model, files={"trainer_state.json": b'{"step": %d}' % step})
                    if async_save:
                        # Training goes on while the checkpoint is written: DCP staged a copy.
                        with torch.no_grad():
                            for t in lora_shards(model).values():
                                t.zero_()
                        ck.wait()
                        with torch.no_grad():
                            for k, t in lora_shards(model).items():
                                t.copy_(saved[k])
            dist.barrier()  # rank 0 rotates once its save is published
            assert ck.steps() == [2, 3]
            for name in ("default", "other"):
                fresh = peft_model(seed=9)
                shard(fresh)
                ck.load(3, fresh, adapter_name=name)
                got = lora_shards(fresh)
                mine = [k for k in saved if f".{name}." in k]
                assert mine
                for k in mine:
                    assert torch.equal(got[k], saved[k]), k
            failures(rank, ck, lambda: ck.save(4, model))


def rank_state(rank: int, step: int) -> dict[str, torch.Tensor]:
    """What a rank keeps of its own (RNG, data loader, a ZeRO-style optimizer partition): the same keys
    on both ranks with other values and shapes, a key of one rank only; rank 1 has nothing at step 2."""
    if rank == 1 and step == 2:
        return {}
    g = torch.Generator().manual_seed(100 * step + rank)
    return {
        "rng_state": torch.randint(0, 256, (24,), dtype=torch.uint8, generator=g),
        "optim.exp_avg": torch.randn(3 + rank, 4, generator=g),
        "optim.exp_avg_sq": torch.randn(5, generator=g).to(torch.bfloat16),
        "optim.step": torch.tensor(10 * step + rank),
        f"loader.rank{rank}.position": torch.arange(rank + 2, dtype=torch.int32),
    }


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, t in expected.items():
        assert got[key].dtype == t.dtype, key
        assert torch.equal(got[key], t), key


def per_rank_checkpoints(rank: int, world: int, root: Path) -> None:
    """Every rank's own state dict through DCP (async and sync): each rank loads back its own; a write
    failing on either rank, or the publish, raises on every rank and keeps the previous checkpoints."""
    written: list[str] = []  # the files this rank wrote tensor bytes to
    write_chunks = _core.write_chunks

    def recording(files: list[tuple[str, Any, list[Any]]], *args: Any) -> Any:
        written.extend(Path(path).parent.name for path, _, records in files if records)
        return write_chunks(files, *args)

    for async_save in (True, False):
        with Checkpointer(root / f"per-rank-async-{async_save}", keep_last=2, async_save=async_save) as ck:
            with mock.patch.object(_core, "write_chunks", recording):
                for step in (1, 2, 3):
                    state = rank_state(rank, step)
                    files = {"loader.json": b'{"rank": %d}' % rank}
                    ck.save(step, state, per_rank=True, extra={"rank": rank, "step": step}, files=files)
                    if async_save:
                        for t in state.values():
                            t.zero_()  # training goes on: DCP staged a copy
                ck.wait()
            assert set(written) == {f"rank-0000{rank}-of-00002"}  # each rank wrote its own bytes only
            dist.barrier()  # rank 0 rotates once its save is published
            assert ck.steps() == [2, 3]
            for step in (2, 3):
                assert_same_state(ck.load(step), rank_state(rank, step))
            assert ck.extra(3) == {"rank": rank, "step": 3}
            failures(rank, ck, lambda: ck.save(4, rank_state(rank, 4), per_rank=True))
            # Rank 1 alone refuses its state dict: every rank raises, none waits in a collective.
            bad: dict[str, Any] = rank_state(rank, 4) | ({"loader.epoch": 3} if rank == 1 else {})
            expected = TypeError if rank == 1 else RankFailedError
            with pytest.raises(expected, match="rank 1 failed: TypeError" if rank == 0 else "loader.epoch"):
                ck.save(4, bad, per_rank=True)
            assert ck.steps() == [2, 3]
    torch.manual_seed(rank)
    module = torch.nn.Linear(4, 2 + rank)  # a module of its own on every rank
    with Checkpointer(root / "per-rank-module", async_save=False) as ck:
        ck.save(1, module, per_rank=True)
        fresh = torch.nn.Linear(4, 2 + rank)
        ck.load(1, fresh)
        assert_same_state(fresh.state_dict(), module.state_dict())


def failures(rank: int, ck: Checkpointer, save: Callable[[], None]) -> None:
    """A rank's write failing (either rank), then the coordinator's publish: every rank raises, the
    previous checkpoints stay byte for byte, no staging directory is left."""
    dist.barrier()
    before = snapshot(Path(ck.root))

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    cases = [(1, "write_chunks"), (0, "write_chunks"), (0, "publish_dir")]
    for failing, function in cases:
        replacement = disk_full if rank == failing else getattr(_core, function)
        with mock.patch.object(_core, function, replacement):
            expected = OSError if rank == failing else RankFailedError
            with pytest.raises(expected, match="No space left on device"):
                save_and_wait(ck, save)
        dist.barrier()
        after, left = snapshot(Path(ck.root)), leftovers(Path(ck.root))
        dist.barrier()  # every rank has looked before the next save stages its directory
        assert after == before, (failing, function)
        assert left == [], (failing, function)
        assert ck.steps() == [2, 3]


def save_and_wait(ck: Checkpointer, save: Callable[[], None]) -> None:
    save()
    ck.wait()  # where an asynchronous save's failure is raised


def checkpoints(rank: int, world: int, root: Path) -> None:
    full_checkpoints(rank, world, root)
    adapter_checkpoints(rank, world, root)
    per_rank_checkpoints(rank, world, root)


def test_checkpointer_on_fsdp2_models(tmp_path: Path) -> None:
    """One spawn of 2 ranks for the full model, the adapter and per-rank state dicts (each spawn costs
    seconds of imports)."""
    run_ranks(checkpoints, 2, tmp_path)
    check_per_rank_files(tmp_path)
    step3 = tmp_path / "full" / "checkpoint-3"
    assert sorted(p.name for p in step3.iterdir()) == [
        "config.json",
        "fastadapter_checkpoint.json",
        "model.safetensors",
    ]
    assert Checkpointer(tmp_path / "full").extra(3) == {"step": 3}
    loaded = LlamaForCausalLM.from_pretrained(step3).eval()
    inputs = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, tiny_llama(seed=3)(inputs).logits)

    peft = tmp_path / "peft_unsharded"
    assert tree(peft) == {
        "README.md",
        SAFETENSORS,
        CONFIG,
        "other/",
        f"other/{SAFETENSORS}",
        f"other/{CONFIG}",
    }
    for async_save in (True, False):
        ours = tmp_path / f"adapter-async-{async_save}" / "checkpoint-3"
        assert tree(ours) == tree(peft) | CHECKPOINT_FILES
        for rel in (SAFETENSORS, f"other/{SAFETENSORS}", "README.md"):
            assert (ours / rel).read_bytes() == (peft / rel).read_bytes(), (async_save, rel)
        for rel in (CONFIG, f"other/{CONFIG}"):
            assert_same_config(ours / rel, peft / rel)
        assert (ours / "trainer_state.json").read_bytes() == b'{"step": 3}'
        assert json.loads((ours / "fastadapter_checkpoint.json").read_text())["kind"] == "adapter"


def check_per_rank_files(root: Path) -> None:
    """Each rank's part is a safetensors file of its own keys, read by `safe_open`; an empty rank's part
    has no weights file; a job of another world size is refused; a process that is told its rank reads
    its part without torch.distributed."""
    parts = [f"rank-0000{r}-of-00002" for r in range(2)]
    for async_save in (True, False):
        ck_root = root / f"per-rank-async-{async_save}"
        step3 = ck_root / "checkpoint-3"
        rank_files = {f"{p}/{n}" for p in parts for n in (SAFETENSORS_MODEL, META, "loader.json")}
        assert tree(step3) == {META, *(f"{p}/" for p in parts), *rank_files}
        meta = json.loads((step3 / META).read_text())
        assert (meta["kind"], meta["world_size"], meta["step"]) == ("per_rank", 2, 3)
        for r, part in enumerate(parts):
            with safe_open(step3 / part / SAFETENSORS_MODEL, "pt") as f:
                keys = f.keys()
                assert_same_state({k: f.get_tensor(k) for k in keys}, rank_state(r, 3))
            assert json.loads((step3 / part / META).read_text())["extra"] == {"rank": r, "step": 3}
            assert (step3 / part / "loader.json").read_bytes() == b'{"rank": %d}' % r
            assert_same_state(Checkpointer(ck_root, rank=r, world_size=2).load(3), rank_state(r, 3))
        assert tree(ck_root / "checkpoint-2" / parts[1]) == {META, "loader.json"}
        for world_size in (1, 4):
            with pytest.raises(WorldSizeError, match=rf"checkpoint-3 .* of 2 ranks.* has {world_size}"):
                Checkpointer(ck_root, rank=0, world_size=world_size).load(3)
