"""``fastadapter.load`` / ``inject`` / ``save`` against PEFT: same logits, same bytes.

PEFT is the oracle: an adapter saved by PEFT and loaded by fastadapter onto a fresh base gives exactly the
logits of ``PeftModel.from_pretrained`` (fp32: ``torch.equal``); fastadapter re-saves it byte for byte;
an adapter injected and saved by fastadapter loads into PEFT with exactly fastadapter's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaForSequenceClassification

import fastadapter
from fastadapter.layers import LoraEmbedding, LoraLinear
from helpers import (
    CONFIG,
    LLAMA_LINEARS,
    SAFETENSORS,
    add_perturbed_adapter,
    assert_same_config,
    logits,
    lora_config,
    make_peft,
    perturb_trainable,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    token_ids,
)

INPUTS = token_ids()
# PEFT says this too, for the same adapters (embedding targets are saved with their base weights).
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")


def seq_cls() -> nn.Module:
    return tiny_llama(cls=LlamaForSequenceClassification, num_labels=3)


CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {}),
    "gpt2_conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "embedding": (tiny_llama, {"target_modules": ["embed_tokens", "q_proj"]}),
    "dora": (tiny_llama, {"use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "dora_conv1d": (tiny_gpt2, {"use_dora": True, "target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "rslora_patterns": (
        tiny_llama,
        {
            "use_rslora": True,
            "target_modules": LLAMA_LINEARS,
            "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            "alpha_pattern": {"o_proj": 3},
        },
    ),
    "modules_to_save": (seq_cls, {"task_type": "SEQ_CLS"}),
    "bias_all": (tiny_llama, {"bias": "all", "target_modules": ["q_proj", "v_proj"]}),
    "bias_lora_only": (
        tiny_gpt2,
        {"bias": "lora_only", "target_modules": ["c_attn"], "fan_in_fan_out": True},
    ),
    "lora_bias": (tiny_mlp, {"lora_bias": True, "target_modules": ["inp", "out"]}),
    "exclude_modules": (
        tiny_llama,
        {"target_modules": LLAMA_LINEARS, "exclude_modules": ["o_proj", "up_proj"]},
    ),
    "layers_to_transform": (
        tiny_llama,
        {"target_modules": LLAMA_LINEARS, "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    "regex": (tiny_llama, {"target_modules": r".*\.(q|k)_proj"}),
    "all_linear": (tiny_llama, {"target_modules": "all-linear"}),
    "all_linear_gpt2": (tiny_gpt2, {"target_modules": "all-linear", "fan_in_fan_out": True}),
}


# On a transformers model fastadapter.load leaves the model as transformers' own load_adapter does
# (tests/test_transformers_host.py holds that oracle); for these, load_adapter's result is not PEFT's.
TRANSFORMERS_DIFFERS_FROM_PEFT = {
    "dora": "transformers 5.23 load_adapter leaves DoRA magnitude vectors unloaded (key not renamed)",
    "dora_conv1d": "transformers 5.23 load_adapter leaves DoRA magnitude vectors unloaded (key not renamed)",
    "modules_to_save": "transformers' load_adapter(is_trainable=False) leaves the modules_to_save copy "
    "trainable",
}


def _inputs(build: Callable[[], nn.Module]) -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) if build is tiny_mlp else INPUTS


def _peft_dir(tmp_path: Path, build: Callable[[], nn.Module], overrides: dict[str, Any]) -> Path:
    directory = tmp_path / "peft"
    make_peft(build(), lora_config(**overrides)).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("layers", ["auto", "fastadapter"])
@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_peft_and_resaves_same_bytes(tmp_path: Path, case: str, layers: str) -> None:
    if layers == "auto" and case in TRANSFORMERS_DIFFERS_FROM_PEFT:
        pytest.skip(TRANSFORMERS_DIFFERS_FROM_PEFT[case])
    build, overrides = CASES[case]
    directory = _peft_dir(tmp_path, build, overrides)
    inputs = _inputs(build)
    expected = logits(PeftModel.from_pretrained(build(), str(directory)).eval(), inputs)
    # "auto": PEFT's layers through transformers' integration on transformers models; "fastadapter": its own.
    ours = fastadapter.load(build(), directory, layers=layers).eval()  # type: ignore[arg-type]
    assert torch.equal(logits(ours, inputs), expected)
    assert fastadapter.active_adapters(ours) == ["default"]
    assert not any(p.requires_grad for p in ours.parameters())  # is_trainable=False, as PEFT

    # Saved again: PEFT's exact bytes and config.
    fastadapter.save(ours, tmp_path / "ours")
    assert (tmp_path / "ours" / SAFETENSORS).read_bytes() == (directory / SAFETENSORS).read_bytes()
    assert_same_config(tmp_path / "ours" / CONFIG, directory / CONFIG)


@pytest.mark.parametrize(
    "case", ["llama", "gpt2_conv1d", "embedding", "dora", "modules_to_save", "lora_bias"]
)
def test_inject_save_loads_in_peft(tmp_path: Path, case: str) -> None:
    build, overrides = CASES[case]
    inputs = _inputs(build)
    config = lora_config(**overrides)
    torch.manual_seed(7)
    theirs = get_peft_model(build(), config)
    torch.manual_seed(7)
    ours = fastadapter.inject(build(), lora_config(**overrides))
    # PEFT's initialisation, random stream included: the same tensors, dtypes and trainable set.
    peft_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    our_state = ours.state_dict()
    assert sorted(peft_state) == sorted(our_state)
    for key, value in peft_state.items():
        assert torch.equal(our_state[key], value), key
        assert our_state[key].dtype == value.dtype, key
    trainable = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable

    perturb_trainable(ours, seed=3)
    ours.eval()
    fastadapter.save(ours, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(build(), str(tmp_path / "ours")).eval()
    assert torch.equal(logits(reloaded, inputs), logits(ours, inputs))


def test_two_adapters_and_set_adapter(tmp_path: Path) -> None:
    peft_model = make_peft(tiny_llama(), lora_config())
    add_perturbed_adapter(peft_model, "other", lora_config(target_modules=["q_proj", "k_proj"], r=2), seed=5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    # fastadapter's own layers: every adapter saved, the last one deleted unloads (PEFT's PeftModel rules).
    ours = fastadapter.load(tiny_llama(), tmp_path / "peft", layers="fastadapter")
    fastadapter.load(ours, tmp_path / "peft" / "other", "other")
    assert fastadapter.active_adapters(ours) == ["other"]
    ours.eval()
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        fastadapter.set_adapter(ours, name)
        assert torch.equal(logits(ours, INPUTS), logits(peft_model, INPUTS)), name
    # Several active adapters add up, in PEFT's order.
    peft_model.base_model.set_adapter(["default", "other"])
    fastadapter.set_adapter(ours, ["default", "other"])
    assert torch.equal(logits(ours, INPUTS), logits(peft_model, INPUTS))

    fastadapter.save(ours, tmp_path / "ours")
    for rel in (SAFETENSORS, f"other/{SAFETENSORS}"):
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "peft" / rel).read_bytes()

    fastadapter.delete_adapter(ours, "other")
    assert fastadapter.active_adapters(ours) == ["default"]
    peft_model.set_adapter("default")
    assert torch.equal(logits(ours, INPUTS), logits(peft_model, INPUTS))
    fastadapter.delete_adapter(ours, "default")  # the last one: the model is the base again
    assert not any(isinstance(m, (LoraLinear, LoraEmbedding)) for m in ours.modules())
    assert torch.equal(logits(ours, INPUTS), logits(tiny_llama(), INPUTS))


@pytest.mark.parametrize(
    "case", ["llama", "gpt2_conv1d", "embedding", "dora", "modules_to_save", "lora_bias"]
)
def test_merge_and_unload_matches_peft(tmp_path: Path, case: str) -> None:
    build, overrides = CASES[case]
    directory = _peft_dir(tmp_path, build, overrides)
    inputs = _inputs(build)
    theirs = PeftModel.from_pretrained(build(), str(directory)).merge_and_unload().eval()
    ours = fastadapter.merge_and_unload(fastadapter.load(build(), directory, layers="fastadapter")).eval()
    assert type(ours) is type(theirs)
    theirs_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(theirs_state)
    for key in theirs_state:
        assert torch.equal(our_state[key], theirs_state[key]), key
    assert torch.equal(logits(ours, inputs), logits(theirs, inputs))


def test_unload_restores_the_base(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama, {})
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = fastadapter.unload(fastadapter.load(base, directory))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_bf16_base_dtype_policy_matches_peft(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama, {})

    def build() -> nn.Module:
        return tiny_llama().to(torch.bfloat16)

    theirs = PeftModel.from_pretrained(build(), str(directory)).eval()
    ours = fastadapter.load(build(), directory).eval()
    peft_lora = {
        k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k
    }
    our_lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert sorted(our_lora) == sorted(peft_lora)
    assert all(our_lora[k].dtype == v.dtype == torch.float32 for k, v in peft_lora.items())
    assert torch.equal(logits(ours, INPUTS), logits(theirs, INPUTS))
    # An explicit dtype overrides the policy.
    kept = fastadapter.load(build(), directory, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for k, v in kept.state_dict().items() if "lora_" in k)


def test_loaded_weights_are_views_of_the_private_mapping(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama, {})
    path = directory / SAFETENSORS
    original = path.read_bytes()
    model = fastadapter.load(tiny_llama(), directory)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora
    # All of them views of one buffer: their storage is the mapping, which is as large as the file.
    storages = {p.untyped_storage().data_ptr() for p in lora}
    assert len(storages) == 1
    storage = lora[0].untyped_storage()
    assert storage.nbytes() == len(original)
    base = storage.data_ptr()
    for p in lora:
        assert base <= p.data_ptr() < base + len(original)
    with torch.no_grad():
        for p in lora:
            p.fill_(1.0)  # copy-on-write: the file on disk is untouched
    assert path.read_bytes() == original


def test_trainable_load_and_dropout_only_in_training(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama, {"lora_dropout": 0.5})
    theirs = PeftModel.from_pretrained(tiny_llama(), str(directory), is_trainable=True)
    ours = fastadapter.load(tiny_llama(), directory, is_trainable=True)
    trainable = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    theirs.train()
    ours.train()
    torch.manual_seed(0)
    a = logits(theirs, INPUTS)
    torch.manual_seed(0)
    b = logits(ours, INPUTS)
    assert torch.equal(a, b)  # same dropout calls, same random stream
    theirs.eval()
    ours.eval()
    assert torch.equal(logits(ours, INPUTS), logits(theirs, INPUTS))
    assert not torch.equal(logits(ours, INPUTS), b)


def test_bin_adapter_loads(tmp_path: Path) -> None:
    model = make_peft(tiny_llama(), lora_config())
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    ours = fastadapter.load(tiny_llama(), tmp_path / "bin").eval()
    expected = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "bin")).eval()
    assert torch.equal(logits(ours, INPUTS), logits(expected, INPUTS))


def test_peft_model_fast_path(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama, {})
    other = tmp_path / "other"
    make_peft(tiny_llama(), lora_config(target_modules=["k_proj", "o_proj"], r=2), seed=9).save_pretrained(
        str(other)
    )
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(directory))
    same_object = fastadapter.load(peft_model, other, "other")
    assert same_object is peft_model
    assert peft_model.active_adapters == ["other"]
    reference = PeftModel.from_pretrained(tiny_llama(), str(directory))
    reference.load_adapter(str(other), "other")
    reference.set_adapter("other")
    peft_model.eval()
    reference.eval()
    assert torch.equal(logits(peft_model, INPUTS), logits(reference, INPUTS))
    theirs = {k: v for k, v in reference.state_dict().items() if ".other." in k}
    ours = {k: v for k, v in peft_model.state_dict().items() if ".other." in k}
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in theirs.items())
    # Loading into the name again replaces its weights in place, as PEFT's load_adapter does.
    held = {k: (id(v), v.data_ptr()) for k, v in peft_model.state_dict(keep_vars=True).items()}
    fastadapter.load(peft_model, other, "other")
    assert {k: (id(v), v.data_ptr()) for k, v in peft_model.state_dict(keep_vars=True).items()} == held


@pytest.mark.cuda
def test_each_weight_lands_on_its_base_layers_device(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    directory = _peft_dir(tmp_path, tiny_llama, {"target_modules": LLAMA_LINEARS})
    model = tiny_llama()
    model.model.layers[1].to("cuda")  # a model split across devices
    fastadapter.load(model, directory)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            device = module.base_layer.weight.device
            for p in module.adapter_parameters("default"):
                assert p.device == device


def test_device_placement_cpu(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama, {})
    model = fastadapter.load(tiny_llama(), directory, device="cpu")
    for module in model.modules():
        if isinstance(module, LoraLinear):
            for p in module.adapter_parameters("default"):
                assert p.device == module.base_layer.weight.device


def test_inject_accepts_a_plain_dict() -> None:
    model = fastadapter.inject(
        tiny_mlp(), {"r": 2, "target_modules": ["inp"], "init_lora_weights": "gaussian"}
    )
    layer = model.inp
    assert isinstance(layer, LoraLinear)
    assert layer.lora_A["default"].weight.requires_grad
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_peft_lora_config_object_to_inject() -> None:
    model = fastadapter.inject(tiny_mlp(), LoraConfig(r=2, target_modules=["inp", "out"]))
    assert isinstance(model.out, LoraLinear)
