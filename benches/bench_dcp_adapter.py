"""Saving an FSDP2-sharded LoRA adapter on N gloo ranks (FASTADAPTER_BENCH_DCP_WORLD, default 2).

A Llama-shaped PeftModel (4 layers, hidden 4096, intermediate 11008, r=64 on the 7 linear projections,
bf16 base, fp32 LoRA: 80 MB, 56 tensors) built on the meta device, `fully_shard` on each decoder layer and
on the model, then materialised with `to_empty` (the base weights are never touched: only the adapter
is saved). Contenders, each called on every rank:
- `fastadapter`: `fastadapter.save(model, dir, is_main_process=rank == 0)` (every rank writes its own
  slices of `adapter_model.safetensors` in place; rank 0 publishes PEFT's files);
- `fastadapter_gathered`: the same files the way `fastadapter.save` wrote them before (and still does on
  storage the ranks do not share): every rank gathers the adapter (`full_tensor` each), rank 0 writes;
- `peft_gathered`: what PEFT's `save_pretrained` needs for a sharded model: every rank gathers the
  adapter's DTensors (`full_tensor`), rank 0 calls `save_pretrained(dir, state_dict=full)`;
- `checkpointer`: `Checkpointer(dir, async_save=False, fsync=False).save(0, model)` (DCP and
  `fastadapter.dcp.StorageWriter` with PEFT's file and key names: `fastadapter.save`'s files plus the
  checkpoint's metadata, published as `checkpoint-0`, nothing gathered);
- `fastadapter_dcp` / `torch_filesystem`: `dcp.save` of the adapter's sharded state dict through
  `fastadapter.dcp.StorageWriter` (one consolidated `model.safetensors`) / DCP's `FileSystemWriter`;
- `raw_write` (ceiling): each rank writes its shards' bytes with one `write()` to a new file of its own;
- `raw_write_shared` (ceiling for one file): rank 0 creates one file, each rank writes its shards' bytes
  into it with one `pwrite()` at its own offset (the ranks' writes share the file's inode lock).
Every save into a fresh directory (removed and `os.sync()` untimed), no fsync.
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

from _ranks import Ranks, join, pwrite_all, schedule, time_save  # type: ignore[import-not-found]
from conftest import LLAMA_TARGETS, QUICK

WORLD = int(os.environ.get("FASTADAPTER_BENCH_DCP_WORLD", "2"))
BLOCKS = 1 if QUICK else 2
ROUNDS = 1 if QUICK else 5
CONTENDERS = (
    "fastadapter",
    "fastadapter_gathered",
    "peft_gathered",
    "fastadapter_dcp",
    "checkpointer",
    "torch_filesystem",
    "raw_write",
    "raw_write_shared",
)


def _sharded_peft_llama() -> Any:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256 if QUICK else 4096,
        intermediate_size=512 if QUICK else 11008,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=32,
        torch_dtype=torch.bfloat16,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=64, lora_alpha=128, target_modules=LLAMA_TARGETS))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.to_local().normal_(generator=g)
    return model


def _worker(rank: int, port: int, conn: Any) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from peft.utils.save_and_load import get_peft_model_state_dict
    from torch.distributed.checkpoint import FileSystemWriter

    import fastadapter
    from fastadapter.dcp import StorageWriter
    from fastadapter.save import adapter_files, save_planned

    join(rank, port, WORLD)
    model = _sharded_peft_llama()
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    local = torch.cat([t.to_local().reshape(-1) for t in lora.values()])
    sizes: list[int] = [0] * WORLD
    dist.all_gather_object(sizes, local.nbytes)
    at = sum(sizes[:rank])  # this rank's offset in the one shared file

    def save(contender: str, out: str) -> None:
        if contender == "fastadapter":
            fastadapter.save(model, out, is_main_process=rank == 0)
        elif contender == "fastadapter_gathered":
            if rank == 0:
                os.makedirs(out, exist_ok=True)
            save_planned(adapter_files(model, out, is_main_process=rank == 0), out, True, False)
        elif contender == "peft_gathered":
            full = {k: v.full_tensor() for k, v in get_peft_model_state_dict(model).items()}
            if rank == 0:
                model.save_pretrained(out, state_dict=full)
        elif contender == "checkpointer":
            fastadapter.Checkpointer(out, async_save=False, fsync=False).save(0, model)
        elif contender == "fastadapter_dcp":
            dcp.save(lora, storage_writer=StorageWriter(out, sync_files=False))
        elif contender == "torch_filesystem":
            dcp.save(lora, storage_writer=FileSystemWriter(out, sync_files=False))
        elif contender == "raw_write":
            if rank == 0:
                os.makedirs(out, exist_ok=True)
            dist.barrier()
            with open(os.path.join(out, f"rank-{rank}"), "wb") as f:
                f.write(local.numpy().data)
        else:
            shared = os.path.join(out, "shared")
            if rank == 0:
                os.makedirs(out, exist_ok=True)
                with open(shared, "wb") as f:
                    f.truncate(sum(sizes))
            dist.barrier()  # the file exists before any rank opens it
            fd = os.open(shared, os.O_WRONLY)
            try:
                pwrite_all(fd, local.numpy().data, at)
            finally:
                os.close(fd)
        dist.barrier()

    while True:
        command, contender, path = conn.recv()
        if command == "stop":
            break
        try:
            if command == "save":
                save(contender, path)
            elif command == "nbytes":
                conn.send(("ok", (sum(t.numel() * t.element_size() for t in lora.values()), len(lora))))
                continue
            conn.send(("ok", None))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> Iterator[tuple[Ranks, Path, tuple[int, int]]]:
    root = Path(tempfile.mkdtemp(prefix="fastadapter-bench-dcp-adapter-"))
    r = Ranks(_worker, WORLD)
    try:
        yield r, root, r.run("nbytes")
    finally:
        r.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("block", "contender"),
    schedule(CONTENDERS, BLOCKS),
    ids=[f"b{b}-{c}" for b, c in schedule(CONTENDERS, BLOCKS)],
)
def test_fsdp2_adapter_save(
    benchmark: Any, ranks: tuple[Ranks, Path, tuple[int, int]], block: int, contender: str
) -> None:
    r, root, (nbytes, tensors) = ranks
    benchmark.group = f"FSDP2 adapter save, {WORLD} gloo ranks"
    benchmark.extra_info.update(contender=contender, block=block, bytes=nbytes, tensors=tensors)
    time_save(benchmark, r, contender, root / f"save-{contender}", ROUNDS)
