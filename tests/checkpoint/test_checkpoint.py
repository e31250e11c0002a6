"""The Checkpointer against its oracles: PEFT's save_pretrained for adapter checkpoints,
huggingface_hub's shard split + safetensors' save_file + transformers' from_pretrained for full ones."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fastadapter
from fastadapter import Checkpointer
from fastadapter.checkpoint import parse_size
from helpers import (
    LLAMA_LINEARS,
    assert_same_files,
    leftovers,
    logits,
    lora_config,
    make_peft,
    perturb_trainable,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)


def peft_model(seed: int = 1) -> PeftModel:
    return make_peft(tiny_llama(), lora_config(target_modules=LLAMA_LINEARS), seed=seed)


def lora_values(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


# --- adapter checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_adapter_checkpoint_is_what_save_pretrained_writes(tmp_path: Path, async_save: bool) -> None:
    model = peft_model()
    with Checkpointer(tmp_path / "ck", async_save=async_save) as ck:
        ck.save(7, model, extra={"loss": 0.25})
        if not async_save:  # published before save() returned
            assert ck.steps() == [7]
    model.save_pretrained(str(tmp_path / "peft"))
    ours = Path(ck.path(7))
    (ours / "fastadapter_checkpoint.json").rename(tmp_path / "meta.json")
    keys = assert_same_files(ours, tmp_path / "peft")  # safetensors bytes equal, config, card
    assert len(keys["adapter_model.safetensors"]) == 2 * 7 * 2
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["step"] == 7
    assert meta["kind"] == "adapter"
    assert meta["extra"] == {"loss": 0.25}
    assert leftovers(tmp_path / "ck") == []


def test_adapter_checkpoint_loads_in_peft(tmp_path: Path) -> None:
    model = peft_model()
    with Checkpointer(tmp_path) as ck:
        ck.save(1, model, extra={"loss": 0.25})
    assert ck.extra(1) == {"loss": 0.25}
    reloaded = PeftModel.from_pretrained(tiny_llama(), ck.path(1))
    x = token_ids()
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=0, atol=0)


def test_snapshot_is_taken_when_save_returns(tmp_path: Path) -> None:
    """Training goes on while the thread writes: later updates must not leak into the checkpoint."""
    model = peft_model()
    before = lora_values(model)
    with Checkpointer(tmp_path, fsync=False) as ck:
        ck.save(1, model)
        perturb_trainable(model, seed=9, scale=5.0)  # immediately, while the write may be running
        saved = ck.load(1)
    for key, value in saved.items():
        live = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(value, before["base_model.model." + live]), key


def test_several_adapters_and_load_into_existing_adapter(tmp_path: Path) -> None:
    model = peft_model()
    model.add_adapter("other", lora_config(r=2))
    perturb_trainable(model, seed=3)
    expected = lora_values(model)
    with Checkpointer(tmp_path) as ck:
        ck.save(2, model)
    assert (Path(ck.path(2)) / "other" / "adapter_model.safetensors").is_file()
    perturb_trainable(model, seed=4)  # a resumed run: same adapters, other values
    ck.load(2, model)
    ck.load(2, model, adapter_name="other")
    for key, value in lora_values(model).items():
        assert torch.equal(value, expected[key]), key


def test_load_injects_into_a_bare_model_without_peft_state(tmp_path: Path) -> None:
    model = peft_model()
    with Checkpointer(tmp_path) as ck:
        ck.save(3, model)
    bare = tiny_llama()
    ck.load(model=bare)  # latest
    x = token_ids()
    torch.testing.assert_close(logits(bare, x), logits(model, x), rtol=0, atol=0)
    assert fastadapter.active_adapters(bare) == ["default"]


# --- full checkpoints -------------------------------------------------------------------------------


def test_full_state_dict_shards_like_save_pretrained(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(64, 40 + i, generator=g) for i in range(12)}
    state["big"] = torch.randn(300, 100, generator=g)  # larger than a shard: a shard of its own
    state["half"] = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    limit = 40_000
    with Checkpointer(tmp_path, max_shard_size=limit) as ck:
        ck.save(5, state)
    directory = Path(ck.path(5))
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=limit
    )
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"] == split.metadata
    for filename, keys in split.filename_to_tensors.items():
        save_file(
            {k: state[k] for k in keys}, str(tmp_path / "oracle.safetensors"), metadata={"format": "pt"}
        )
        assert (directory / filename).read_bytes() == (tmp_path / "oracle.safetensors").read_bytes(), filename
    loaded = ck.load(5)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    state = {"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.int64)}
    with Checkpointer(tmp_path) as ck:
        ck.save(0, state)
    directory = Path(ck.path(0))
    assert sorted(os.listdir(directory)) == ["fastadapter_checkpoint.json", "model.safetensors"]
    save_file(state, str(tmp_path / "oracle.safetensors"), metadata={"format": "pt"})
    assert (directory / "model.safetensors").read_bytes() == (tmp_path / "oracle.safetensors").read_bytes()


def test_transformers_model_reloads_with_from_pretrained(tmp_path: Path) -> None:
    """GPT-2 ties lm_head to the embedding: the alias is stored once, as save_pretrained does, and
    both from_pretrained and Checkpointer.load restore it."""
    model = tiny_gpt2()
    with Checkpointer(tmp_path, max_shard_size="50KB") as ck:
        ck.save(9, model)
    directory = ck.path(9)
    assert (
        "lm_head.weight"
        not in json.loads(Path(directory, "model.safetensors.index.json").read_text())["weight_map"]
    )
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    x = token_ids()
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=0, atol=0)
    state = ck.load(9)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    fresh = tiny_gpt2(seed=5)
    ck.load(9, fresh)
    torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("text", "value"), [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("10kb", 10_000), (123, 123)]
)
def test_shard_sizes_parse_like_transformers(text: Any, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["lots", "0GB", -1, "5 parsecs"])
def test_bad_shard_size_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


# --- rotation, restart, failures, back-pressure -------------------------------------------------------


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=2) as ck:
        for step in (10, 20, 30, 40):
            ck.save(step, {"w": torch.full((4,), float(step))})
    assert ck.steps() == [30, 40]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-30", "checkpoint-40"]


def test_latest_after_restart_ignores_and_cleans_leftovers(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"w": torch.ones(2)})
        ck.save(2, {"w": torch.full((2,), 2.0)})
    # What a writer killed mid-save leaves: a hidden temp directory of a process that is gone.
    dead = tmp_path / f".checkpoint-3.tmp-2147483647-{'ab' * 8}"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    restarted = Checkpointer(tmp_path)
    assert not dead.exists()
    assert restarted.latest() == 2
    assert torch.equal(restarted.load()["w"], torch.full((2,), 2.0))


def test_background_failure_is_raised_once_by_the_next_call_and_nothing_is_rotated(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(1, {"w": torch.ones(2)})
    ck.wait()
    # A name only the writer thread checks (it refuses paths leaving the checkpoint).
    ck.save(2, {"w": torch.ones(2)}, files={"../escape": b"x"})
    with pytest.raises(OSError, match="escape"):
        ck.wait()
    ck.wait()  # raised once, not forever
    assert ck.steps() == [1]  # the failed save deleted nothing
    assert leftovers(tmp_path) == []
    assert not (tmp_path.parent / "escape").exists()
    ck.save(3, {"w": torch.ones(2)}, files={"../escape": b"x"})
    with pytest.raises(OSError, match="escape"):
        ck.save(4, {"w": torch.ones(2)})  # back-pressure waits for 3 and raises its failure
    ck.close()
    assert ck.steps() == [1]


def test_back_pressure_bounds_pending_saves_and_reuses_buffers(tmp_path: Path) -> None:
    for max_pending in (1, 2):
        ck = Checkpointer(tmp_path / str(max_pending), max_pending=max_pending, fsync=False)
        pointers = set()
        for step in range(6):
            ck.save(step, {"w": torch.full((1 << 18,), float(step))})
            assert len(ck._pending) <= max_pending
            pointers.add(ck._pending[-1].buffer.reserve(1, pinned=False).data_ptr())
        ck.close()
        assert len(pointers) == max_pending  # one buffer per slot, reused, never more
        assert ck.steps() == list(range(6))
        assert torch.equal(ck.load(3)["w"], torch.full((1 << 18,), 3.0))


def test_closed_checkpointer_refuses_saves(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    ck.close()
    ck.close()
    with pytest.raises(RuntimeError, match="closed"):
        ck.save(1, {"w": torch.ones(1)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"max_pending": 0}, "max_pending"),
        ({"rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path, **kwargs)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="step"):
        ck.save(-1, {"w": torch.ones(1)})
    with pytest.raises(TypeError, match=r"JSON|serializable"):
        ck.save(1, {"w": torch.ones(1)}, extra={"x": object()})
    with pytest.raises(TypeError, match="state dict"):
        ck.save(1, [torch.ones(1)])  # type: ignore[arg-type]
    with pytest.raises(fastadapter.TensorError, match="`c`"):
        ck.save(1, {"c": torch.ones(2, dtype=torch.complex128)})
    ck.close()
    assert ck.steps() == []
    assert leftovers(tmp_path) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.load()
    with pytest.raises(FileNotFoundError, match="step 5"):
        ck.load(5)


# --- ranks ------------------------------------------------------------------------------------------


def test_only_rank0_writes_shared_checkpoints_and_parts_complete_together(tmp_path: Path) -> None:
    r0 = Checkpointer(tmp_path, rank=0, world_size=2)
    r1 = Checkpointer(tmp_path, rank=1, world_size=2)
    r1.save(1, {"w": torch.ones(2)})  # shared: rank 1 writes nothing
    r1.wait()
    assert r0.steps() == []
    r1.save(2, {"part": torch.full((2,), 1.0)}, per_rank=True)
    r1.wait()
    assert r0.steps() == []  # rank 0's part is missing: not a checkpoint yet
    r0.save(2, {"part": torch.full((2,), 0.0)}, per_rank=True)
    r0.wait()
    assert r0.steps() == r1.steps() == [2]
    part = Path(r0.path(2)) / "rank-00001-of-00002" / "model.safetensors"
    assert torch.equal(load_file(str(part))["part"], torch.full((2,), 1.0))


# --- the packed (snapshot) path: strided tensors, CUDA ---------------------------------------------------


def test_strided_and_bf16_tensors_snapshot_like_save_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    state = {
        "t": torch.randn(6, 4, generator=g).t(),  # not contiguous: copied into place by torch
        "b": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "s": torch.randn(8, generator=g)[::2],
        "e": torch.empty(0, 3),
    }
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp_path / "o.safetensors"),
        metadata={"format": "pt"},
    )
    assert (Path(ck.path(1)) / "model.safetensors").read_bytes() == (tmp_path / "o.safetensors").read_bytes()


def test_save_through_the_packed_path_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path CUDA saves take (pack into one reusable buffer, write from it), run on CPU."""
    save_module = importlib.import_module("fastadapter.save")  # `fastadapter.save` is the function
    monkeypatch.setattr(save_module, "SNAPSHOT_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(save_module, "_SNAPSHOT_BUFFER", None)
    model = peft_model()
    model.save_pretrained(str(tmp_path / "peft"))
    fastadapter.save(model, tmp_path / "ours")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
    first = save_module._SNAPSHOT_BUFFER.reserve(1, pinned=False).data_ptr()
    fastadapter.save(model, tmp_path / "ours")
    assert save_module._SNAPSHOT_BUFFER.reserve(1, pinned=False).data_ptr() == first  # reused


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_checkpoint_equals_cpu_and_uses_a_pinned_reused_buffer(tmp_path: Path) -> None:
    model = peft_model()
    with Checkpointer(tmp_path / "cpu") as ck_cpu:
        ck_cpu.save(1, model)
    cuda_model = model.to("cuda:0")
    ck = Checkpointer(tmp_path / "gpu", max_pending=1)
    ck.save(1, cuda_model)
    buffer = ck._pending[-1].buffer
    ck.save(2, cuda_model)
    ck.close()
    assert buffer.pinned
    assert len(ck._free) == 1
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (Path(ck.path(1)) / name).read_bytes() == (Path(ck_cpu.path(1)) / name).read_bytes()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_save_is_byte_identical_to_peft(tmp_path: Path) -> None:
    model = peft_model().to("cuda:0")
    model.save_pretrained(str(tmp_path / "peft"))
    fastadapter.save(model, tmp_path / "ours")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert importlib.import_module("fastadapter.save")._SNAPSHOT_BUFFER.pinned


# --- synchronous saves, written straight from the tensors ------------------------------------------


@pytest.mark.parametrize("fsync", [False, True])
def test_sync_save_from_the_tensors_equals_the_snapshot_path(tmp_path: Path, fsync: bool) -> None:
    # async_save=False with host tensors skips the snapshot buffer: its files must be the async
    # (snapshot) path's, byte for byte, shards, index and metadata included.
    g = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(64, 40 + i, generator=g) for i in range(12)}
    state["half"] = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    state["strided"] = torch.randn(30, 20, generator=g).t()
    with Checkpointer(tmp_path / "async", max_shard_size=40_000) as ck:
        ck.save(5, state, extra={"x": 1}, files={"trainer_state.json": b"{}"})
    sync = Checkpointer(tmp_path / "sync", async_save=False, fsync=fsync, max_shard_size=40_000, keep_last=2)
    for step in (3, 4, 5, 5):  # the last one replaces step 5 in place
        sync.save(step, state, extra={"x": 1}, files={"trainer_state.json": b"{}"})
    assert sync.steps() == [4, 5]
    ours, theirs = Path(sync.path(5)), Path(ck.path(5))
    names = sorted(p.name for p in theirs.iterdir())
    assert len([n for n in names if n.startswith("model-")]) > 1
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    fastadapter._core.wait_released()  # the replaced step 5 is removed on the release thread
    assert leftovers(tmp_path / "sync") == []


def test_failed_sync_save_from_the_tensors_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, async_save=False, keep_last=1, max_shard_size=8)
    ck.save(1, {"w": torch.ones(2)})
    # The second shard's dtype has no safetensors name: refused after the staging directory is made,
    # before any shard is written (a shard failing while the others are written:
    # test_checkpoint_crash.py).
    with pytest.raises(ValueError, match="complex128"):
        ck.save(2, {"a": torch.ones(2), "w": torch.ones(2, dtype=torch.complex128)})
    assert ck.steps() == [1]
    assert torch.equal(ck.load(1)["w"], torch.ones(2))
    assert leftovers(tmp_path) == []
