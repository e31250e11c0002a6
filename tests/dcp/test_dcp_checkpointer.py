"""`Checkpointer` in a torch.distributed job with FSDP2-sharded models: a full model goes through
`fastadapter.dcp` (every rank writes its shards into one consolidated checkpoint, asynchronously, rotated
by `keep_last`) and loads back into the sharded model; a sharded adapter is gathered by every rank and
written by rank 0 as PEFT writes it for the unsharded model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from _dist import run_ranks
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM

from fastadapter import Checkpointer
from helpers import lora_config, make_peft, tiny_llama, token_ids


def sharded_llama(seed: int) -> torch.nn.Module:
    model = tiny_llama(seed=seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


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
    peft = make_peft(tiny_llama(seed=0), lora_config(), seed=5)
    if rank == 0:
        peft.save_pretrained(root / "peft_unsharded")
    for layer in peft.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft)
    with Checkpointer(root / "adapter", fsync=False) as ck:
        ck.save(7, peft)
    dist.barrier()


def test_checkpointer_on_fsdp2_models(tmp_path: Path) -> None:
    run_ranks(full_checkpoints, 2, tmp_path)
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
    ours = tmp_path / "adapter" / "checkpoint-7" / "adapter_model.safetensors"
    assert ours.read_bytes() == (tmp_path / "peft_unsharded" / "adapter_model.safetensors").read_bytes()
