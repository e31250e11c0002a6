"""What a save takes its tensors from, as PEFT does: `model.state_dict()` when it is overridden or hooked,
and plain tensors (not `nn.Parameter`s) in `.bin` files. PEFT's `save_pretrained` is the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fastadapter
from helpers import BIN, SAFETENSORS, assert_same_files, lora_config, make_peft, tiny_llama


def test_bin_files_hold_plain_tensors_as_peft_writes_them(tmp_path: Path) -> None:
    model = make_peft(tiny_llama(), lora_config())
    model.save_pretrained(str(tmp_path / "peft"), safe_serialization=False)
    fastadapter.save(model, tmp_path / "ours", safe_serialization=False)
    ours = torch.load(tmp_path / "ours" / BIN, weights_only=True)
    assert ours
    assert all(type(t) is torch.Tensor for t in ours.values())
    assert_same_files(tmp_path / "ours", tmp_path / "peft")


def test_an_overridden_state_dict_is_what_is_saved(tmp_path: Path) -> None:
    # PEFT's own TestHotSwapping::test_hotswap_missing_key_works saves a model whose state_dict drops a key.
    model = make_peft(tiny_llama(), lora_config())
    state = model.state_dict()
    dropped = next(k for k in state if "lora_A" in k)
    del state[dropped]
    model.state_dict = lambda *args, **kwargs: state  # type: ignore[method-assign]
    model.save_pretrained(str(tmp_path / "peft"))
    fastadapter.save(model, tmp_path / "ours")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(tmp_path / "ours" / SAFETENSORS, "pt") as f:
        assert dropped.replace(".default", "") not in f.keys()  # noqa: SIM118


@pytest.mark.parametrize("where", ["root", "layer", "lora_B", "base_layer", "last_layer"])
def test_a_state_dict_hook_is_honoured(tmp_path: Path, where: str) -> None:
    # Wherever the hook sits: the selection tests each module as it visits it (the walk, the insides of
    # LoRA layers, the wrapped base layers), so every place must send the save to PEFT's path.
    model = make_peft(tiny_llama(), lora_config())
    layers = model.base_model.model.model.layers
    module = {
        "root": model,
        "layer": layers[0].self_attn.q_proj,
        "lora_B": layers[0].self_attn.q_proj.lora_B["default"],
        "base_layer": layers[0].self_attn.q_proj.base_layer,
        "last_layer": layers[-1].self_attn.v_proj.lora_B,
    }[where]

    def scale(module: Any, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
        for key in state_dict:
            if "lora_B" in key:
                state_dict[key] = state_dict[key] * 2

    module.register_state_dict_post_hook(scale)
    model.save_pretrained(str(tmp_path / "peft"))
    fastadapter.save(model, tmp_path / "ours")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
