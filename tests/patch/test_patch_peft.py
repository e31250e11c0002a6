"""`fastadapter.patch()` on PEFT's own calls: routed calls leave the model, the files and the return value
exactly as PEFT's original does (PEFT, unpatched, is the oracle), and report that they were routed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

import fastadapter
from helpers import (
    assert_same_files,
    assert_same_state,
    logits,
    lora_config,
    make_peft,
    model_state,
    tiny_llama,
    token_ids,
)

CALL_FROM = "PeftModel.from_pretrained"
CALL_LOAD = "PeftModel.load_adapter"
CALL_SAVE = "PeftModel.save_pretrained"


def saved(
    tmp_path: Path, name: str = "a", seed: int = 1, dtype: torch.dtype = torch.float32, **cfg: Any
) -> Path:
    model = make_peft(tiny_llama(seed=0).to(dtype), lora_config(**cfg), seed=seed)
    directory = tmp_path / name
    model.save_pretrained(str(directory))
    return directory


def both_ways(call: Callable[[], Any]) -> tuple[Any, Any]:
    """`call()` unpatched, then patched (each builds its own model): both results."""
    fastadapter.unpatch()
    torch.manual_seed(123)
    expected = call()
    fastadapter.patch()
    torch.manual_seed(123)
    got = call()
    fastadapter.unpatch()
    return got, expected


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_builds_the_model_peft_builds(
    tmp_path: Path, is_trainable: bool, low_cpu_mem_usage: bool, dtype: torch.dtype
) -> None:
    directory = saved(tmp_path)

    def load() -> PeftModel:
        base = tiny_llama(seed=0).to(dtype)
        return PeftModel.from_pretrained(
            base, str(directory), is_trainable=is_trainable, low_cpu_mem_usage=low_cpu_mem_usage
        )

    got, expected = both_ways(load)
    assert type(got) is type(expected)
    assert_same_state(model_state(got), model_state(expected))
    assert torch.equal(logits(got, token_ids()), logits(expected, token_ids()))
    report = fastadapter.patch_report()
    if low_cpu_mem_usage and dtype != torch.float32:
        # PEFT rounds the weights through the 16-bit base on this path: only PEFT's own code gives that.
        assert report.fallbacks_of(CALL_FROM) == 1
    else:
        assert report.routed[CALL_FROM] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_pretrained_autocast_adapter_dtype_false_keeps_the_base_dtype_as_peft(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    directory = saved(tmp_path)

    def load() -> PeftModel:
        return PeftModel.from_pretrained(
            tiny_llama(seed=0).to(dtype), str(directory), autocast_adapter_dtype=False
        )

    got, expected = both_ways(load)
    assert_same_state(model_state(got), model_state(expected))
    assert fastadapter.patch_report().routed[CALL_FROM] == 1


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "v_proj"], ["o_proj"]])
def test_load_adapter_adds_an_inactive_adapter_and_returns_peft_load_result(
    tmp_path: Path, is_trainable: bool, targets: list[str]
) -> None:
    first = saved(tmp_path, "first")
    second = saved(tmp_path, "second", seed=2, target_modules=targets)

    results: list[Any] = []

    def run() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(seed=0), str(first))
        results.append(model.load_adapter(str(second), "other", is_trainable=is_trainable))
        return model

    got, expected = both_ways(run)
    assert results[1] == results[0]
    assert type(results[1]) is type(results[0])
    assert_same_state(model_state(got), model_state(expected))
    assert got.active_adapter == "default"
    got.set_adapter("other")
    expected.set_adapter("other")
    assert torch.equal(logits(got, token_ids()), logits(expected, token_ids()))
    report = fastadapter.patch_report()
    assert report.routed[CALL_LOAD] == 1


def test_save_pretrained_writes_peft_files(tmp_path: Path) -> None:
    model = make_peft(tiny_llama(seed=0), lora_config(), seed=1)
    model.save_pretrained(str(tmp_path / "peft"))
    with fastadapter.patched():
        model.save_pretrained(str(tmp_path / "ours"))
        model.save_pretrained(str(tmp_path / "ours_bin"), safe_serialization=False)
    model.save_pretrained(str(tmp_path / "peft_bin"), safe_serialization=False)
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert_same_files(tmp_path / "ours_bin", tmp_path / "peft_bin")
    assert fastadapter.patch_report().routed[CALL_SAVE] == 2
