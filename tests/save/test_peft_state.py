"""fastadapter's structural tensor selection against PEFT's `get_peft_model_state_dict`.

The file-level parity tests prove the bytes match; these pin down the selection itself: for every
configuration, the same keys, and each value the very same memory PEFT would hand to its writer (no copy
made on the way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.save_and_load import get_peft_model_state_dict
from torch import nn
from transformers import LlamaForSequenceClassification

from fastadapter._peft_state import lora_state_dict
from helpers import tiny_gpt2, tiny_llama, tiny_mlp

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {"target_modules": LINEARS}),
    "llama-regex": (tiny_llama, {"target_modules": r".*\.(q_proj|v_proj)"}),
    "llama-all-linear": (tiny_llama, {"target_modules": "all-linear"}),
    "dora": (tiny_llama, {"target_modules": ["q_proj", "down_proj"], "use_dora": True}),
    "rank-pattern": (
        tiny_llama,
        {"target_modules": LINEARS, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 3}},
    ),
    "gpt2-bias-all": (tiny_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}),
    "gpt2-bias-lora-only": (
        tiny_gpt2,
        {"target_modules": ["c_fc"], "fan_in_fan_out": True, "bias": "lora_only"},
    ),
    "modules-to-save": (tiny_llama, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "embedding-targeted": (tiny_llama, {"target_modules": ["embed_tokens", "q_proj"]}),
    "trainable-tokens": (tiny_llama, {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5]}),
    "lora-bias": (tiny_mlp, {"target_modules": ["hidden.0", "out"], "lora_bias": True}),
}


def _peft_model(case: str) -> nn.Module:
    build, options = CASES[case]
    model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))
    # The second adapter shares the options, bias aside (PEFT allows one adapter with a bias mode): PEFT
    # itself cannot save a mix of trainable-token and plain adapters (KeyError in TrainableTokensWrapper).
    shared = {k: v for k, v in options.items() if k != "bias"}
    model.add_adapter("second", LoraConfig(r=2, **shared))
    return model


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.filterwarnings("ignore:Could not identify embedding layer")
@pytest.mark.parametrize("adapter", ["default", "second"])
@pytest.mark.parametrize("embeddings", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_selection_matches_peft(case: str, adapter: str, embeddings: bool) -> None:
    model = _peft_model(case)
    ours = lora_state_dict(model, adapter, embeddings)
    theirs = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=embeddings)
    assert ours.keys() == theirs.keys()
    assert any(".lora_A." in k or k.endswith(".lora_A.weight") for k in ours)
    for key, tensor in theirs.items():
        assert ours[key].data_ptr() == tensor.data_ptr(), key
        assert ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key].detach(), tensor), key


def test_sequence_classification_score_head() -> None:
    base = tiny_llama(cls=LlamaForSequenceClassification, num_labels=3)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    ours = lora_state_dict(model, "default", False)
    theirs = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert ours.keys() == theirs.keys()
    assert "base_model.model.score.weight" in ours


def _named_like_embeddings() -> nn.Module:
    """A tree where named_modules' naming rules matter: a module reached twice (named by the first path
    its preorder meets, and its children under that name only), a None child, a key holding a dot."""
    shared = nn.Sequential()
    shared.add_module("lm_head", nn.Linear(2, 2))
    root = nn.Module()
    root.add_module("first", nn.Sequential())
    root.first.add_module("inner", shared)  # met first: `first.inner.lm_head`
    root.add_module("embed_tokens", shared)  # the same module again: no name of its own, nor its child
    root.add_module("gone", None)
    root._modules["x.lm_head"] = nn.Linear(2, 2)  # add_module refuses dots; the dict does not
    root.add_module("tail", nn.ModuleDict({"embed_tokens": nn.Embedding(3, 2)}))
    return root


class _RenamingModules(nn.Sequential):
    def named_modules(self, *args: Any, **kwargs: Any) -> Any:
        for name, module in super().named_modules(*args, **kwargs):
            yield name.replace("hidden", "lm_head"), module


@pytest.mark.parametrize("tree", ["tricky", "override", "llama"])
def test_embedding_names_are_named_modules_names(tree: str) -> None:
    from fastadapter._peft_state import EMBEDDING_LAYER_NAMES, names_ending_in

    if tree == "tricky":
        model = _named_like_embeddings()
    elif tree == "override":  # a class's own named_modules is what PEFT's check sees
        model = nn.Sequential()
        model.add_module("wrapped", _RenamingModules())
        model.wrapped.add_module("hidden", nn.Linear(2, 2))
    else:
        model = _peft_model("embedding-targeted")
    suffixes = tuple("." + e for e in EMBEDDING_LAYER_NAMES)
    expected = [k for k, _ in model.named_modules() if k in EMBEDDING_LAYER_NAMES or k.endswith(suffixes)]
    assert expected, "nothing to find: the comparison would be vacuous"
    assert names_ending_in(model, EMBEDDING_LAYER_NAMES) == expected
