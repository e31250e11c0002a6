"""`fastadapter.load` into an FSDP2-sharded model, on 2 gloo ranks: an adapter PEFT saved from an unsharded
model goes into the sharded model's adapter of that name (PeftModel, transformers' integration,
fastadapter's own layers); every rank's local shard equals torch's own sharding of the file's tensor
(`distribute_tensor`), including uneven and empty shards, and the sharded model's logits equal the
unsharded PeftModel's with that adapter; `fastadapter.save` on every rank writes the file back byte for
byte. A new adapter name is refused before the model changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import run_ranks
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import fastadapter
from fastadapter.errors import UnsupportedAdapterError
from helpers import SAFETENSORS, lora_config, make_peft, tiny_llama, token_ids

# r=5 splits 3/2 over 2 ranks (uneven); down_proj's rank 1 leaves rank 1 an empty lora_A shard.
TARGETS = ["q_proj", "v_proj", "down_proj"]
HOSTS = ("peft", "transformers", "fastadapter")


def config() -> object:
    return lora_config(r=5, lora_alpha=10, target_modules=TARGETS, rank_pattern={"down_proj": 1})


def build(host: str) -> nn.Module:
    """A model holding adapter "default" with other weights than the file's."""
    if host == "peft":
        return make_peft(tiny_llama(seed=0), config(), seed=11)
    model = tiny_llama(seed=0)
    if host == "transformers":
        model.add_adapter(config())
    else:
        fastadapter.inject(model, config())
    return model


def shard(model: nn.Module) -> None:
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    for layer in inner.model.layers:
        fully_shard(layer)
    fully_shard(model)


def file_key(name: str) -> str:
    return "base_model.model." + name.removeprefix("base_model.model.").replace(".default", "")


def logits_of(adapter: Path, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = PeftModel.from_pretrained(tiny_llama(seed=0), adapter).eval()(inputs).logits
        return out


def load_into_sharded(rank: int, world: int, adapter: Path, second: Path) -> None:
    tensors = load_file(adapter / SAFETENSORS)
    inputs = token_ids()
    expected, expected_second = logits_of(adapter, inputs), logits_of(second, inputs)
    assert not torch.equal(expected, expected_second)
    for host in HOSTS:
        model = build(host)
        shard(model)
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert len(lora) == len(tensors), host
        assert all(isinstance(p, DTensor) for p in lora.values()), host
        storage = {n: p.to_local().data_ptr() for n, p in lora.items()}

        fastadapter.load(model, adapter)

        for name, param in lora.items():
            full = tensors[file_key(name)]
            oracle = distribute_tensor(full, param.device_mesh, param.placements).to_local()
            local = param.to_local()
            assert torch.equal(local, oracle), (host, rank, name)
            assert local.data_ptr() == storage[name], (host, name)  # in place, same shard
            assert torch.equal(param.full_tensor(), full), (host, name)
        rank_one = next(p for n, p in lora.items() if "down_proj.lora_A" in n)
        assert rank_one.to_local().shape[0] == (1 if rank == 0 else 0)  # an empty shard on rank 1
        with torch.no_grad():
            logits = model(inputs).logits
        assert torch.equal(logits, expected), (host, (logits - expected).abs().max())

        # Saved back from the shards (each rank writes its own slices), the file is the one PEFT wrote.
        out = adapter.parent / f"saved-{host}"
        fastadapter.save(model, out, is_main_process=rank == 0)
        dist.barrier()
        assert (out / SAFETENSORS).read_bytes() == (adapter / SAFETENSORS).read_bytes(), host

        # A new adapter cannot join a sharded model: refused before anything changes.
        before = [n for n, _ in model.named_parameters()]
        with pytest.raises(UnsupportedAdapterError, match="sharded model"):
            fastadapter.load(model, adapter, adapter_name="second")
        assert [n for n, _ in model.named_parameters()] == before, host
        assert fastadapter.active_adapters(model) == ["default"], host
        with torch.no_grad():
            assert torch.equal(model(inputs).logits, expected), host

        # Loaded again after forwards (FSDP2 has unsharded and resharded the layers since).
        fastadapter.load(model, second)
        with torch.no_grad():
            assert torch.equal(model(inputs).logits, expected_second), host


def test_load_into_fsdp2_model_gives_every_rank_its_shard(tmp_path: Path) -> None:
    make_peft(tiny_llama(seed=0), config(), seed=3).save_pretrained(tmp_path / "adapter")
    make_peft(tiny_llama(seed=0), config(), seed=5).save_pretrained(tmp_path / "second")
    run_ranks(load_into_sharded, 2, tmp_path / "adapter", tmp_path / "second", timeout_s=120)
