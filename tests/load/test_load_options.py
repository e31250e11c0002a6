"""`fastadapter.load` options PEFT has: `autocast_adapter_dtype`; and targets fastadapter does not adapt,
refused with `UnsupportedAdapterError` before anything changes. PEFT is the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fastadapter
from helpers import assert_same_state, lora_config, make_peft, model_state, tiny_llama


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_gives_peft_dtypes(tmp_path: Path, dtype: torch.dtype, autocast: bool) -> None:
    make_peft(tiny_llama(), lora_config(), seed=1).save_pretrained(str(tmp_path / "a"))
    make_peft(tiny_llama(), lora_config(target_modules=["k_proj"]), seed=2).save_pretrained(
        str(tmp_path / "b")
    )

    def first() -> PeftModel:
        return PeftModel.from_pretrained(tiny_llama().to(dtype), str(tmp_path / "a"))

    expected = first()
    expected.load_adapter(str(tmp_path / "b"), "other", autocast_adapter_dtype=autocast)
    model = fastadapter.load(first(), tmp_path / "b", "other", autocast_adapter_dtype=autocast)
    theirs = {n: p for n, p in expected.named_parameters() if ".other." in n}
    ours = {n: p for n, p in model.named_parameters() if ".other." in n}
    assert sorted(ours) == sorted(theirs)
    assert theirs
    for name, p in theirs.items():
        assert ours[name].dtype == p.dtype == (torch.float32 if autocast else dtype), name
        assert torch.equal(ours[name], p), name


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x)[0])


@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]])
@pytest.mark.parametrize("onto", ["plain", "peft"])
def test_multihead_attention_is_refused_before_the_model_changes(
    tmp_path: Path, targets: list[str], onto: str
) -> None:
    torch.manual_seed(0)
    get_peft_model(Attention(), LoraConfig(target_modules=targets, r=2)).save_pretrained(str(tmp_path))
    torch.manual_seed(1)
    model = (
        Attention() if onto == "plain" else get_peft_model(Attention(), LoraConfig(target_modules=["lin0"]))
    )
    before = model_state(model)
    with pytest.raises(fastadapter.UnsupportedAdapterError, match="MultiheadAttention"):
        fastadapter.load(model, tmp_path, "other")
    assert_same_state(model_state(model), before)
