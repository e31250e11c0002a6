"""A further adapter loaded into a `PeftModel` leaves it exactly as PEFT's own calls would.

The fast way builds PEFT's layers from a template and activates the adapter without walking the model
(it knows every LoRA layer and module from the plan), so these tests compare the whole model state
(`helpers.model_state`: module types, train/eval flags, each layer's active adapters, every tensor's
requires_grad and values, PEFT's bookkeeping) with `load_adapter` + `set_adapter`, PEFT's own way,
from models in different states: the first adapter frozen or trainable, the model in train or eval mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import fastadapter
from helpers import assert_same_state, logits, lora_config, make_peft, model_state, tiny_llama, token_ids

INPUTS = token_ids()


def _adapter(tmp_path: Path, name: str, seed: int, **overrides: object) -> Path:
    directory = tmp_path / name
    make_peft(tiny_llama(), lora_config(**overrides), seed=seed).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("first_trainable", [False, True], ids=["first-frozen", "first-trainable"])
@pytest.mark.parametrize("is_trainable", [False, True], ids=["inference", "trainable"])
def test_a_further_adapter_leaves_the_model_as_load_adapter_and_set_adapter(
    tmp_path: Path, is_trainable: bool, first_trainable: bool
) -> None:
    first = _adapter(tmp_path, "first", seed=1, target_modules=["q_proj", "v_proj"])
    # Overlapping targets: q_proj layers gain a second adapter, k_proj / o_proj become new layers.
    second = _adapter(tmp_path, "second", seed=2, target_modules=["q_proj", "k_proj", "o_proj"], r=2)

    def build() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(), str(first), is_trainable=first_trainable)
        return model.train() if first_trainable else model

    theirs = build()
    theirs.load_adapter(str(second), "other", is_trainable=is_trainable)
    theirs.set_adapter("other", inference_mode=not is_trainable)
    ours = build()
    assert fastadapter.load(ours, second, "other", is_trainable=is_trainable) is ours

    assert_same_state(model_state(ours), model_state(theirs))
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert torch.equal(logits(ours, INPUTS), logits(theirs, INPUTS)), name


def test_a_merged_model_is_unmerged_as_peft_set_adapter_does(tmp_path: Path) -> None:
    first = _adapter(tmp_path, "first", seed=1)
    second = _adapter(tmp_path, "second", seed=2, target_modules=["k_proj"])
    theirs = PeftModel.from_pretrained(tiny_llama(), str(first))
    ours = PeftModel.from_pretrained(tiny_llama(), str(first))
    for model in (theirs, ours):
        model.merge_adapter()
    with warnings.catch_warnings(record=True) as theirs_warned:
        warnings.simplefilter("always")
        theirs.load_adapter(str(second), "other")
        theirs.set_adapter("other", inference_mode=True)
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        fastadapter.load(ours, second, "other")
    assert any("Unmerging" in str(w.message) for w in theirs_warned)
    assert [str(w.message) for w in ours_warned if "merge" in str(w.message).lower()] == [
        str(w.message) for w in theirs_warned if "merge" in str(w.message).lower()
    ]
    assert_same_state(model_state(ours), model_state(theirs))
