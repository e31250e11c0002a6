"""What a hotswap reuses and where it writes: the plan kept from the last swap (only while the model's
layers and the file's header are unchanged) and the in-place mapping of a file laid out like the one the
weights are views of. The oracle is the file itself: after a swap every LoRA weight equals the file's
tensor, whichever way it got there.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_hotswap import INPUTS, oracle, saved_adapter
from torch import nn

import fastadapter
from fastadapter import _hotswap
from helpers import SAFETENSORS, logits, tiny_llama


def lora_weights(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's LoRA weights by PEFT's file key (`base_model.model.<path>.lora_A.weight`)."""
    out = {}
    for key, p in model.named_parameters():
        if f".{name}." in f"{key}." and "lora_" in key:
            module_path = key.split(".lora_")[0].removeprefix("base_model.model.")
            slot = "lora_A" if ".lora_A." in key else "lora_B"
            out[f"base_model.model.{module_path}.{slot}.weight"] = p
    return out


def assert_holds_file(model: nn.Module, directory: Path, name: str = "default") -> None:
    expected = load_file(str(directory / SAFETENSORS))
    got = lora_weights(model, name)
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key].detach(), tensor), key


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The swaps that copied bytes into the weights (`_hotswap._write`), by file."""
    seen: list[str] = []
    real = _hotswap._write

    def counted(swap: Any, where: str, staged: Any) -> None:
        seen.append(where)
        real(swap, where, staged)

    monkeypatch.setattr(_hotswap, "_write", counted)
    return seen


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("host", ["transformers", "fastadapter"])
def test_a_file_laid_out_alike_is_mapped_over_the_weights_in_place(
    tmp_path: Path, host: str, writes: list[str]
) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, r=4, lora_alpha=16)
    layers = "fastadapter" if host == "fastadapter" else "auto"
    model = fastadapter.load(tiny_llama(), first, layers=layers).eval()
    pointers = {k: p.data_ptr() for k, p in model.named_parameters()}
    fastadapter.hotswap(model, second)
    assert writes == []  # no byte copied: the weights are views of `first`'s mapping, laid out alike
    assert_holds_file(model, second)
    torch.testing.assert_close(logits(model, INPUTS), oracle(tiny_llama, first, second), rtol=1e-5, atol=1e-6)
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == pointers
    fastadapter.hotswap(model, first)  # and back, through the plan kept from the first swap
    assert writes == []
    assert_holds_file(model, first)
    # The mapping is private: training the swapped weights in place never reaches either file.
    files = {d: sha(d / SAFETENSORS) for d in (first, second)}
    with torch.no_grad():
        for p in lora_weights(model).values():
            p.add_(1.0)
    assert {d: sha(d / SAFETENSORS) for d in (first, second)} == files


def test_weights_peft_loaded_are_copied_into(tmp_path: Path, writes: list[str]) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, r=4, lora_alpha=16)
    model = PeftModel.from_pretrained(tiny_llama(), str(first)).eval()
    fastadapter.hotswap(model, second)
    fastadapter.hotswap(model, first)  # through the plan kept from the first swap
    assert writes == [str(second / SAFETENSORS), str(first / SAFETENSORS)]
    assert_holds_file(model, first)


def test_a_swap_leaves_another_adapter_loaded_from_the_same_file_alone(tmp_path: Path) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, r=4, lora_alpha=8)
    model = fastadapter.load(tiny_llama(), first)
    fastadapter.load(model, first, adapter_name="other")
    fastadapter.hotswap(model, second)
    assert_holds_file(model, second)
    assert_holds_file(model, first, "other")


def test_the_kept_plan_is_not_used_for_an_adapter_loaded_again_with_other_targets(tmp_path: Path) -> None:
    small = saved_adapter(tmp_path, "small", "linear", seed=1, target_modules=["q_proj"])
    small_too = saved_adapter(tmp_path, "small_too", "linear", seed=2, target_modules=["q_proj"])
    wide = saved_adapter(tmp_path, "wide", "linear", seed=3, target_modules=["q_proj", "k_proj"])
    wide_too = saved_adapter(tmp_path, "wide_too", "linear", seed=4, target_modules=["q_proj", "k_proj"])
    model = PeftModel.from_pretrained(tiny_llama(), str(small), adapter_name="x")
    model.load_adapter(str(small), adapter_name="keep")  # so that "x" can be deleted
    fastadapter.hotswap(model, small_too, adapter_name="x")
    fastadapter.hotswap(model, small, adapter_name="x")  # the plan is kept
    model.delete_adapter("x")
    model.load_adapter(str(wide), adapter_name="x")
    fastadapter.hotswap(model, wide_too, adapter_name="x")
    assert_holds_file(model, wide_too, "x")


@pytest.mark.parametrize("replaced", ["parameter", "layer"])
def test_the_kept_plan_follows_replaced_parameters_and_layers(tmp_path: Path, replaced: str) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1)
    second = saved_adapter(tmp_path, "second", "linear", seed=2)
    model = PeftModel.from_pretrained(tiny_llama(), str(first)).eval()
    fastadapter.hotswap(model, second)
    attention = model.base_model.model.model.layers[0].self_attn
    if replaced == "parameter":
        lora_a = attention.q_proj.lora_A["default"]
        lora_a.weight = nn.Parameter(lora_a.weight.detach().clone())
    else:
        attention.q_proj = copy.deepcopy(attention.q_proj)
    fastadapter.hotswap(model, first)
    assert_holds_file(model, first)
    torch.testing.assert_close(
        logits(model, INPUTS), logits(PeftModel.from_pretrained(tiny_llama(), str(first)).eval(), INPUTS)
    )
