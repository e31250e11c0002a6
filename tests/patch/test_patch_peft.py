"""`fastadapter.patch()` on PEFT's own calls: routed calls leave the model, the files and the return value
exactly as PEFT's original does (PEFT, unpatched, is the oracle), and report that they were routed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel

import fastadapter
from helpers import (
    LLAMA_LINEARS,
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


@pytest.mark.parametrize("second_trainable", [False, True])
def test_load_adapter_onto_a_model_in_training_as_peft(tmp_path: Path, second_trainable: bool) -> None:
    # The first adapter trainable: the model is in train mode, so the load's eval() (or its absence) and
    # the trainability it leaves are seen in the state.
    first = saved(tmp_path, "first")
    second = saved(tmp_path, "second", seed=2, target_modules=["k_proj", "v_proj"])

    def run() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(seed=0), str(first), is_trainable=True)
        model.load_adapter(str(second), "other", is_trainable=second_trainable)
        return model

    got, expected = both_ways(run)
    assert_same_state(model_state(got), model_state(expected))
    assert got.training == second_trainable
    assert fastadapter.patch_report().routed[CALL_LOAD] == 1


def test_load_adapter_resets_an_other_adapters_entry_left_in_training_as_peft(tmp_path: Path) -> None:
    # PEFT's eval() reaches every module, also another adapter's dropout that was put in train mode by hand
    # inside a container in eval mode (the fast path's plan does not list those entries).
    first = saved(tmp_path, "first", lora_dropout=0.1)
    second = saved(tmp_path, "second", seed=2)

    def run() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(seed=0), str(first))
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].train()
        model.load_adapter(str(second), "other")
        return model

    got, expected = both_ways(run)
    assert_same_state(model_state(got), model_state(expected))
    assert not got.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].training
    assert fastadapter.patch_report().routed[CALL_LOAD] == 1


@pytest.mark.parametrize(
    "overrides",
    [
        {"target_modules": "all-linear"},
        {"fan_in_fan_out": True},  # on nn.Linear: PEFT warns and sets it to False
        {"target_modules": [*LLAMA_LINEARS, *(f"absent{i}" for i in range(15))]},  # PEFT shortens >= 20
    ],
    ids=["all-linear", "fan_in_fan_out", "long-target-list"],
)
@pytest.mark.parametrize("plan_kept", [True, False])
def test_from_pretrained_rewrites_the_given_config_and_warns_as_peft(
    tmp_path: Path, overrides: dict[str, Any], plan_kept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The routed call plans on a copy of the config before PEFT's wrapper exists and builds from that
    # plan (or, should the wrapper have moved a target, plans again): the config passed in must still
    # end up registered, rewritten as PEFT rewrites it, with PEFT's warnings given once.
    if not plan_kept:
        from fastadapter.integrations import _patch_peft_load

        monkeypatch.setattr(_patch_peft_load, "_still_planned", lambda *_: False)
    directory = saved(tmp_path, target_modules=LLAMA_LINEARS)
    configs: list[LoraConfig] = []
    caught: list[list[str]] = []

    def load() -> PeftModel:
        config = lora_config(**{"target_modules": LLAMA_LINEARS, **overrides})
        configs.append(config)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(tiny_llama(seed=0), str(directory), config=config)
        caught.append([str(w.message) for w in seen])
        return model

    got, expected = both_ways(load)
    assert got.peft_config["default"] is configs[1]
    assert expected.peft_config["default"] is configs[0]
    assert_same_state(model_state(got), model_state(expected))
    assert torch.equal(logits(got, token_ids()), logits(expected, token_ids()))
    assert caught[1] == caught[0]
    assert fastadapter.patch_report().routed[CALL_FROM] == 1
