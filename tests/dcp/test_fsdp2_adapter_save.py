"""`fastadapter.save` on an FSDP2-sharded PEFT model, called on every rank (as transformers' Trainer calls
`save_pretrained`): the directory equals what PEFT's `save_pretrained` writes for the same model unsharded,
byte for byte, and PEFT loads it to the same logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from _dist import run_ranks
from helpers import assert_same_config, lora_config, make_peft, tiny_llama, token_ids
from peft import PeftModel
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastadapter


def peft_llama() -> PeftModel:
    return make_peft(tiny_llama(seed=0), lora_config(target_modules=["q_proj", "v_proj", "down_proj"]), seed=3)


def save_sharded(rank: int, world: int, root: Path) -> None:
    model = peft_llama()
    if rank == 0:
        model.save_pretrained(root / "peft_unsharded")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(isinstance(p, DTensor) for p in lora)  # the case that used to raise
    fastadapter.save(model, root / "ours_fsdp2", is_main_process=rank == 0)
    dist.barrier()


def test_fsdp2_save_on_every_rank_equals_unsharded_save_pretrained(tmp_path: Path) -> None:
    run_ranks(save_sharded, 2, tmp_path)
    ours, peft = tmp_path / "ours_fsdp2", tmp_path / "peft_unsharded"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in peft.iterdir())
    assert (ours / "adapter_model.safetensors").read_bytes() == (peft / "adapter_model.safetensors").read_bytes()
    assert_same_config(ours / "adapter_config.json", peft / "adapter_config.json")
    inputs = token_ids()
    reference = peft_llama()
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), ours).eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, reference(inputs).logits)
