"""FSDP2 models: `fastadapter.save` on a sharded PEFT model, called on every rank (as transformers' Trainer
calls `save_pretrained`), equals what PEFT's `save_pretrained` writes for the same model unsharded, byte for
byte, and PEFT loads it to the same logits; a sharded model's state dict saved through `fastadapter.dcp`
is a checkpoint `from_pretrained` loads to the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _dist import run_ranks
from peft import PeftModel
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

import fastadapter
from fastadapter.dcp import StorageWriter
from helpers import assert_same_config, lora_config, make_peft, tiny_llama, token_ids


def peft_llama() -> PeftModel:
    return make_peft(
        tiny_llama(seed=0), lora_config(target_modules=["q_proj", "v_proj", "down_proj"]), seed=3
    )


def save_sharded(rank: int, world: int, root: Path) -> None:
    model = peft_llama()
    if rank == 0:
        model.save_pretrained(root / "peft_unsharded")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora
    assert all(isinstance(p, DTensor) for p in lora)
    fastadapter.save(model, root / "ours_fsdp2", is_main_process=rank == 0)
    dist.barrier()


def test_fsdp2_save_on_every_rank_equals_unsharded_save_pretrained(tmp_path: Path) -> None:
    run_ranks(save_sharded, 2, tmp_path)
    ours, peft = tmp_path / "ours_fsdp2", tmp_path / "peft_unsharded"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in peft.iterdir())
    assert (ours / "adapter_model.safetensors").read_bytes() == (
        peft / "adapter_model.safetensors"
    ).read_bytes()
    assert_same_config(ours / "adapter_config.json", peft / "adapter_config.json")
    inputs = token_ids()
    reference = peft_llama()
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), ours).eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, reference(inputs).logits)


def save_fsdp2_llama(rank: int, world: int, root: Path) -> None:
    model = tiny_llama(seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    state = model.state_dict()
    assert all(isinstance(t, DTensor) for t in state.values())
    # Two files: the first layer and the embeddings in one, the rest in the other.
    files = {k: 1 if k.startswith(("model.layers.0.", "model.embed_tokens")) else 2 for k in state}
    dcp.save(
        state, storage_writer=StorageWriter(root / "llama", fqn_to_index_mapping=files, sync_files=False)
    )


def test_fsdp2_model_through_dcp_loads_with_from_pretrained(tmp_path: Path) -> None:
    run_ranks(save_fsdp2_llama, 2, tmp_path)
    out = tmp_path / "llama"
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    reference = tiny_llama(seed=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference.state_dict())
    reference.config.save_pretrained(out)  # what a user adds beside the weights
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    inputs = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, reference(inputs).logits)
