"""`fastadapter.patch()` on transformers' own adapter calls (`PeftAdapterMixin.load_adapter`, adapter-only
`save_pretrained`): same model, same return value, same files as transformers unpatched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastadapter
from helpers import (
    assert_same_config,
    assert_same_state,
    lora_config,
    make_peft,
    model_state,
    snapshot,
    tiny_llama,
)

CALL_LOAD = "PeftAdapterMixin.load_adapter"
CALL_SAVE = "PreTrainedModel.save_pretrained"


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "adapter"
    make_peft(tiny_llama(), lora_config(target_modules=["q_proj", "down_proj"])).save_pretrained(
        str(directory)
    )
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_leaves_the_model_as_transformers_does(
    adapter_dir: Path, dtype: torch.dtype, is_trainable: bool
) -> None:
    expected_model = tiny_llama().to(dtype)
    expected = expected_model.load_adapter(str(adapter_dir), adapter_name="a", is_trainable=is_trainable)
    with fastadapter.patched():
        model = tiny_llama().to(dtype)
        got = model.load_adapter(str(adapter_dir), adapter_name="a", is_trainable=is_trainable)
    assert got == expected
    assert_same_state(model_state(model), model_state(expected_model))
    assert fastadapter.patch_report().routed[CALL_LOAD] == 1


def test_save_pretrained_of_adapters_writes_transformers_files(adapter_dir: Path, tmp_path: Path) -> None:
    model = tiny_llama()
    model.load_adapter(str(adapter_dir))
    model.save_pretrained(str(tmp_path / "plain"))
    expected_config = model.config.to_dict()
    model.config.architectures = None
    with fastadapter.patched():
        model.save_pretrained(str(tmp_path / "patched"))
    ours, theirs = snapshot(tmp_path / "patched"), snapshot(tmp_path / "plain")
    assert (
        sorted(ours)
        == sorted(theirs)
        == ["adapter_config.json", "adapter_model.safetensors", "generation_config.json"]
    )
    assert_same_config(
        tmp_path / "patched" / "adapter_config.json", tmp_path / "plain" / "adapter_config.json"
    )
    assert ours["adapter_model.safetensors"] == theirs["adapter_model.safetensors"]
    assert ours["generation_config.json"] == theirs["generation_config.json"]
    assert model.config.to_dict() == expected_config  # transformers' side effects: dtype, architectures
    assert fastadapter.patch_report().routed[CALL_SAVE] == 1


def test_whole_model_save_and_hub_ids_run_transformers_own_code(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="adapter model file not found") as expected:
        model.load_adapter("nobody/no-such-adapter")
    with fastadapter.patched():
        model.save_pretrained(str(tmp_path / "patched"))
        with pytest.raises(ValueError, match="adapter model file not found") as got:
            model.load_adapter("nobody/no-such-adapter")
    assert str(got.value) == str(expected.value)
    assert snapshot(tmp_path / "patched") == snapshot(tmp_path / "plain")
    report = fastadapter.patch_report()
    assert report.total_routed == 0
    assert report.fallbacks[(CALL_SAVE, "no adapters: a whole-model save")] == 1
    assert report.fallbacks[(CALL_LOAD, "not a local directory (Hub id)")] == 1
