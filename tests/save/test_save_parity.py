"""``fastadapter.save`` against ``PeftModel.save_pretrained``: the same files, byte for byte.

Every case builds a tiny model with non-trivial LoRA weights (perturbed after creation), saves it with PEFT
and with fastadapter, and compares the two directories (see ``helpers.assert_same_as_peft``). Each case
also checks that PEFT's output holds what the case is about (the tensors it expects), so a comparison of
two empty or irrelevant files cannot pass.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors import safe_open
from torch import nn
from transformers import LlamaForSequenceClassification

import fastadapter
from helpers import (
    BIN,
    CONFIG,
    LLAMA_LINEARS,
    SAFETENSORS,
    VOCAB,
    add_perturbed_adapter,
    assert_card,
    assert_reloads_like_peft,
    assert_same_as_peft,
    assert_same_files,
    assert_weights_written,
    leftovers,
    llama_config,
    logits,
    lora_config,
    make_peft,
    perturb_trainable,
    save_with_fastadapter,
    save_with_peft,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    token_ids,
    tree,
)

# --- the matrix: (builder of a fresh base, LoRA config, get_peft_model options) -----------------------


def gpt2_config(**overrides: Any) -> LoraConfig:
    settings: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["c_attn", "c_proj"],
        "fan_in_fan_out": True,
    }
    settings.update(overrides)
    return LoraConfig(**settings)


def mlp_config(**overrides: Any) -> LoraConfig:
    settings: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["inp", "hidden.0", "hidden.1", "out"],
    }
    settings.update(overrides)
    return LoraConfig(**settings)


def bf16_llama() -> nn.Module:
    return tiny_llama().to(torch.bfloat16)


def seq_cls_llama() -> nn.Module:
    return tiny_llama(cls=LlamaForSequenceClassification, num_labels=3)


# name -> (base builder, LoRA config factory, get_peft_model kwargs)
MATRIX: dict[str, tuple[Callable[[], nn.Module], Callable[[], LoraConfig], dict[str, Any]]] = {
    "gpt2_conv1d": (tiny_gpt2, gpt2_config, {}),
    "llama_all_linear": (tiny_llama, lambda: lora_config(target_modules=LLAMA_LINEARS), {}),
    "llama_causal_lm_task": (tiny_llama, lambda: lora_config(task_type="CAUSAL_LM"), {}),
    "llama_random_init": (tiny_llama, lambda: lora_config(init_lora_weights=False), {}),
    "bf16_autocast": (bf16_llama, lambda: lora_config(target_modules=LLAMA_LINEARS), {}),
    "bf16_no_autocast": (
        bf16_llama,
        lambda: lora_config(target_modules=LLAMA_LINEARS),
        {"autocast_adapter_dtype": False},
    ),
    "rank_alpha_pattern": (
        tiny_llama,
        lambda: lora_config(
            target_modules=LLAMA_LINEARS,
            rank_pattern={"q_proj": 8, "model.layers.1.self_attn.v_proj": 2},
            alpha_pattern={"k_proj": 32, "down_proj": 3},
        ),
        {},
    ),
    "rslora": (tiny_llama, lambda: lora_config(use_rslora=True, target_modules=LLAMA_LINEARS), {}),
    "dora": (tiny_llama, lambda: lora_config(use_dora=True, target_modules=LLAMA_LINEARS), {}),
    "dora_gpt2": (tiny_gpt2, lambda: gpt2_config(use_dora=True), {}),
    "seq_cls_modules_to_save": (seq_cls_llama, lambda: lora_config(task_type="SEQ_CLS"), {}),
    "lm_head_modules_to_save": (tiny_llama, lambda: lora_config(modules_to_save=["lm_head"]), {}),
    "gpt2_bias_all": (tiny_gpt2, lambda: gpt2_config(bias="all"), {}),
    "gpt2_bias_lora_only": (tiny_gpt2, lambda: gpt2_config(bias="lora_only"), {}),
    "mlp_plain_module": (tiny_mlp, mlp_config, {}),
    "mlp_bias_all": (tiny_mlp, lambda: mlp_config(bias="all"), {}),
    "mlp_bias_lora_only": (tiny_mlp, lambda: mlp_config(bias="lora_only", init_lora_weights=False), {}),
    "mlp_regex_targets": (tiny_mlp, lambda: mlp_config(target_modules=r".*hidden\.\d"), {}),
    "mlp_lora_bias": (tiny_mlp, lambda: mlp_config(lora_bias=True), {}),
    "llama_all_linear_shorthand": (tiny_llama, lambda: lora_config(target_modules="all-linear"), {}),
    "llama_trainable_tokens": (tiny_llama, lambda: lora_config(trainable_token_indices=[1, 5]), {}),
}


def build(case: str) -> PeftModel:
    make_base, make_config, options = MATRIX[case]
    return make_peft(make_base(), make_config(), **options)


def file_dtypes(path: Path) -> set[str]:
    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def file_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(path, "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def assert_case_feature_saved(case: str, peft_file: Path) -> None:
    """What each case must have put into PEFT's file, so that the comparison is about the feature."""
    shapes = file_shapes(peft_file)

    def has(suffix: str) -> bool:
        return any(n.endswith(suffix) for n in shapes)

    if case.startswith("dora"):
        assert has("lora_magnitude_vector")
    if case == "seq_cls_modules_to_save":
        assert "base_model.model.score.weight" in shapes
    if case == "lm_head_modules_to_save":
        assert "base_model.model.lm_head.weight" in shapes
    if case == "gpt2_bias_all":
        assert has("c_fc.bias")  # every bias of the model, targeted or not
    if case == "mlp_bias_all":
        assert has("out.base_layer.bias")
    if case.endswith("bias_lora_only"):
        assert has("base_layer.bias")
        assert not has("c_fc.bias")
    if case == "mlp_lora_bias":
        assert has("lora_B.bias")
    if case == "llama_trainable_tokens":
        assert has("token_adapter.trainable_tokens_delta")
        assert not has("embed_tokens.weight")
    if case == "rank_alpha_pattern":
        layer = "base_model.model.model.layers.{}.self_attn.{}.lora_A.weight"
        assert shapes[layer.format(0, "q_proj")][0] == 8
        assert shapes[layer.format(1, "v_proj")][0] == 2
        assert shapes[layer.format(0, "v_proj")][0] == 4


def test_perturbation_leaves_no_adapter_weight_at_its_initial_value() -> None:
    # The parity tests rely on it: LoRA B starts at zero, which would hide a writer that zeroes data.
    model = build("dora")
    fresh = get_peft_model(tiny_llama(), MATRIX["dora"][1]())
    initial = dict(fresh.named_parameters())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert not torch.equal(p, initial[name]), name
        assert p.abs().sum() > 0, name


@pytest.mark.parametrize("case", list(MATRIX))
def test_matrix_is_byte_identical_to_peft(tmp_path: Path, case: str) -> None:
    model = build(case)
    keys = assert_same_as_peft(model, tmp_path)
    assert_weights_written(keys, [SAFETENSORS])
    assert_case_feature_saved(case, tmp_path / "peft" / SAFETENSORS)


@pytest.mark.parametrize(
    ("case", "dtype"),
    [("bf16_autocast", "F32"), ("bf16_no_autocast", "BF16"), ("llama_all_linear", "F32")],
)
def test_adapter_dtype_follows_autocast(tmp_path: Path, case: str, dtype: str) -> None:
    # The bf16 cases are only meaningful if PEFT really wrote the dtype each is named for.
    model = build(case)
    assert_same_as_peft(model, tmp_path)
    assert file_dtypes(tmp_path / "peft" / SAFETENSORS) == {dtype}
    assert file_dtypes(tmp_path / "ours" / SAFETENSORS) == {dtype}


@pytest.mark.parametrize(
    "case", ["llama_all_linear", "gpt2_conv1d", "dora", "seq_cls_modules_to_save", "rslora"]
)
def test_pickle_format_matches_peft(tmp_path: Path, case: str) -> None:
    keys = assert_same_as_peft(build(case), tmp_path, safe_serialization=False)
    assert_weights_written(keys, [BIN])
    assert not (tmp_path / "ours" / SAFETENSORS).exists()


# --- other PEFT methods (fastadapter takes PEFT's selection, writes the bytes itself) --------------------

OTHER_METHODS: dict[str, tuple[Callable[[], PeftConfig], tuple[str, ...], str]] = {
    "ia3": (
        lambda: IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        ("k_proj.ia3_l", "down_proj.ia3_l"),
        "base_model.model.",
    ),
    "loha": (
        lambda: LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
        ("hada_w1_a", "hada_w2_b"),
        "base_model.model.",
    ),
    "lokr": (
        lambda: LoKrConfig(r=2, target_modules=["q_proj", "v_proj"]),
        ("lokr_w1", "lokr_w2_a"),
        "base_model.model.",
    ),
    "prompt_tuning": (
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        ("prompt_embeddings",),
        "prompt_embeddings",
    ),
}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_other_peft_methods_are_byte_identical(tmp_path: Path, method: str) -> None:
    make_config, suffixes, prefix = OTHER_METHODS[method]
    keys = assert_same_as_peft(make_peft(tiny_llama(), make_config()), tmp_path)
    assert_weights_written(keys, [SAFETENSORS], required_suffixes=suffixes, prefix=prefix)


# float8 "fnuz" variants: safetensors stores them (F8_E4M3FNUZ, F8_E5M2FNUZ), so PEFT saves them.
LORA_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e8m0fnu,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
]


@pytest.mark.parametrize("dtype", LORA_DTYPES, ids=str)
def test_lora_weights_of_every_safetensors_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    model = build("llama_random_init")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    keys = assert_same_as_peft(model, tmp_path)
    assert_weights_written(keys, [SAFETENSORS])
    with safe_open(tmp_path / "peft" / SAFETENSORS, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}  # noqa: SIM118


def test_adapter_named_like_a_module(tmp_path: Path) -> None:
    # PEFT drops every key containing ".<other adapter name>." from an adapter's state dict, even a module's
    # own path: with a second adapter named "out", the default adapter's "out" layer is not saved.
    model = make_peft(tiny_mlp(), mlp_config(target_modules=["inp", "out"]))
    add_perturbed_adapter(model, "out", mlp_config(r=2, target_modules=["hidden.0", "out"]), seed=3)
    keys = assert_same_as_peft(model, tmp_path)
    assert_weights_written(keys, [SAFETENSORS, f"out/{SAFETENSORS}"])
    assert not any(".out." in n for n in keys[SAFETENSORS])


def test_explicit_state_dict_is_honoured(tmp_path: Path) -> None:
    model = build("dora")
    full = model.state_dict()
    # A post-processed export: PEFT selects from what it is given, not from the model.
    layer = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    full[layer] = full[layer] * 2
    keys = assert_same_as_peft(model, tmp_path, state_dict=full)
    assert_weights_written(keys, [SAFETENSORS])
    with safe_open(tmp_path / "ours" / SAFETENSORS, "pt") as f:
        saved = f.get_tensor(layer.replace(".default", ""))
    assert torch.equal(saved, full[layer])


@pytest.mark.parametrize("relative", ["rel", "rel/", "nested/deeper"])
def test_relative_and_path_object_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str
) -> None:
    model = build("llama_all_linear")
    monkeypatch.chdir(tmp_path)
    save_with_peft(model, Path("peft") / relative)
    fastadapter.save(model, os.path.join("ours", relative))
    fastadapter.save(model, Path("ours_path") / relative)
    keys = assert_same_files(tmp_path / "ours" / relative, tmp_path / "peft" / relative)
    assert_weights_written(keys, [SAFETENSORS])
    assert_same_files(tmp_path / "ours_path" / relative, tmp_path / "peft" / relative)


# --- several adapters ----------------------------------------------------------------------------------


def two_adapter_model() -> PeftModel:
    model = make_peft(tiny_llama(), lora_config(target_modules=["q_proj", "v_proj"]))
    add_perturbed_adapter(
        model, "other", lora_config(r=2, target_modules=["k_proj", "o_proj"], use_dora=True), 7
    )
    return model


@pytest.mark.parametrize(
    ("selected", "expected_files"),
    [
        (None, [SAFETENSORS, f"other/{SAFETENSORS}"]),
        (["other"], [f"other/{SAFETENSORS}"]),
        (["default"], [SAFETENSORS]),
        (["other", "default"], [SAFETENSORS, f"other/{SAFETENSORS}"]),
        ([], []),
    ],
    ids=["all", "other", "default", "both_named", "none"],
)
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_several_adapters_go_to_subdirectories(
    tmp_path: Path, selected: list[str] | None, expected_files: list[str], safe: bool
) -> None:
    model = two_adapter_model()
    keys = assert_same_as_peft(model, tmp_path, selected_adapters=selected, safe_serialization=safe)
    if not safe:
        expected_files = [f.replace(SAFETENSORS, BIN) for f in expected_files]
    assert_weights_written(keys, expected_files)
    # The card is written once, at the top, even when only a sub-directory adapter is saved.
    assert_card(tmp_path / "ours" / "README.md")
    assert not (tmp_path / "ours" / "other" / "README.md").exists()
    for rel, names in keys.items():
        # Each file holds its own adapter: "other" targets k/o and has DoRA magnitudes, "default" q/v.
        is_other = rel.startswith("other/")
        assert any(".k_proj." in n for n in names) == is_other
        assert any(n.endswith("lora_magnitude_vector") for n in names) == is_other


def test_not_main_process_writes_no_files_but_the_same_directories(tmp_path: Path) -> None:
    model = two_adapter_model()
    for save, name in [(save_with_peft, "peft"), (save_with_fastadapter, "ours")]:
        save(model, tmp_path / name, is_main_process=False)
    assert (tmp_path / "peft").is_dir()
    assert (tmp_path / "ours").is_dir() == (tmp_path / "peft").is_dir()
    assert tree(tmp_path / "ours") == tree(tmp_path / "peft")
    assert not [p for p in (tmp_path / "ours").rglob("*") if p.is_file()]


def test_not_main_process_with_only_a_subdirectory_adapter(tmp_path: Path) -> None:
    model = two_adapter_model()
    for save, name in [(save_with_peft, "peft"), (save_with_fastadapter, "ours")]:
        save(model, tmp_path / name, is_main_process=False, selected_adapters=["other"])
    assert tree(tmp_path / "ours") == tree(tmp_path / "peft")


# --- embeddings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
@pytest.mark.parametrize(
    "targets",
    [["embed_tokens", "q_proj"], ["q_proj", "v_proj"]],
    ids=["embed_targeted", "embed_not_targeted"],
)
def test_embedding_layers_follow_peft(
    tmp_path: Path, save_embedding_layers: object, targets: list[str]
) -> None:
    model = make_peft(tiny_llama(), lora_config(target_modules=targets))
    keys = assert_same_as_peft(model, tmp_path, save_embedding_layers=save_embedding_layers)
    assert_weights_written(keys, [SAFETENSORS])
    names = keys[SAFETENSORS]
    targeted = "embed_tokens" in targets
    saves_embeddings = save_embedding_layers is True or (save_embedding_layers == "auto" and targeted)
    embed_key = (
        "base_model.model.model.embed_tokens.base_layer.weight"
        if targeted
        else "base_model.model.model.embed_tokens.weight"
    )
    assert (embed_key in names) == saves_embeddings
    if targeted:
        assert any("lora_embedding_A" in n for n in names)


def tied_llama() -> nn.Module:
    return tiny_llama(tie_word_embeddings=True)


EMBED = "base_model.model.model.embed_tokens.weight"
EMBED_BASE = "base_model.model.model.embed_tokens.base_layer.weight"
LM_HEAD = "base_model.model.lm_head.weight"

# name -> (base builder, LoRA config, whether "auto" saves the embeddings, the non-LoRA tensors PEFT adds
# when it saves them). "auto" only recognises the names embed_tokens and lm_head as embeddings (not GPT-2's
# wte). Tied embeddings make lm_head and the embedding share one storage.
EMBEDDING_VARIANTS: dict[str, tuple[Callable[[], nn.Module], Callable[[], LoraConfig], bool, list[str]]] = {
    "tied_targeted": (
        tied_llama,
        lambda: lora_config(target_modules=["embed_tokens", "q_proj"]),
        True,
        [EMBED_BASE],
    ),
    "tied_not_targeted": (
        tied_llama,
        lambda: lora_config(target_modules=["q_proj"]),
        False,
        [LM_HEAD, EMBED],
    ),
    "regex_targeted": (
        tiny_llama,
        lambda: lora_config(target_modules=r".*(embed_tokens|q_proj)"),
        True,
        [EMBED_BASE],
    ),
    "regex_not_targeted": (
        tiny_llama,
        lambda: lora_config(target_modules=r".*\.(q_proj|v_proj)"),
        False,
        [LM_HEAD, EMBED],
    ),
    "gpt2_wte_targeted": (
        tiny_gpt2,
        lambda: gpt2_config(target_modules=["wte", "c_attn"]),
        False,
        [LM_HEAD, "base_model.model.transformer.wte.base_layer.weight"],
    ),
}


@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
@pytest.mark.parametrize("variant", list(EMBEDDING_VARIANTS))
def test_embedding_layer_variants_follow_peft(
    tmp_path: Path, save_embedding_layers: object, variant: str
) -> None:
    make_base, make_config, auto_saves, embedding_keys = EMBEDDING_VARIANTS[variant]
    model = make_peft(make_base(), make_config())
    keys = assert_same_as_peft(model, tmp_path, save_embedding_layers=save_embedding_layers)
    assert_weights_written(keys, [SAFETENSORS])
    saves_embeddings = save_embedding_layers is True or (save_embedding_layers == "auto" and auto_saves)
    non_lora = [n for n in keys[SAFETENSORS] if "lora_" not in n]
    assert non_lora == (embedding_keys if saves_embeddings else [])


@pytest.mark.parametrize("save_embedding_layers", ["auto", True])
def test_embedding_request_on_a_plain_module_follows_peft(
    tmp_path: Path, save_embedding_layers: object
) -> None:
    # Not a transformers model: PEFT warns that it cannot find the embeddings and saves the adapter alone.
    keys = assert_same_as_peft(
        build("mlp_plain_module"), tmp_path, save_embedding_layers=save_embedding_layers
    )
    assert_weights_written(keys, [SAFETENSORS])


def resized_vocab_model(tmp_path: Path, extra_tokens: int) -> PeftModel:
    """A base whose local config.json (its name_or_path) has VOCAB tokens, resized by extra_tokens."""
    base_dir = tmp_path / "base"
    llama_config().save_pretrained(base_dir)
    base = tiny_llama()
    base.name_or_path = str(base_dir)
    if extra_tokens:
        base.resize_token_embeddings(VOCAB + extra_tokens)
    return make_peft(base, lora_config())


@pytest.mark.parametrize("extra_tokens", [0, 8], ids=["same_vocab", "resized_vocab"])
def test_auto_saves_embeddings_when_vocab_differs_from_local_base_config(
    tmp_path: Path, extra_tokens: int
) -> None:
    # PEFT reads the base model's config.json (a local directory here, so no network) and saves the
    # embeddings when the vocabulary was resized; fastadapter must decide the same, offline.
    model = resized_vocab_model(tmp_path, extra_tokens)
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    out = tmp_path / "out"
    keys = assert_same_as_peft(model, out)
    names = keys[SAFETENSORS]
    assert ("base_model.model.model.embed_tokens.weight" in names) == bool(extra_tokens)
    assert ("base_model.model.lm_head.weight" in names) == bool(extra_tokens)
    config = json.loads((out / "ours" / CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


# --- storage sharing and layout ------------------------------------------------------------------------


def attention(model: PeftModel, layer: int) -> nn.Module:
    return model.base_model.model.model.layers[layer].self_attn


def shared_and_strided_model() -> PeftModel:
    """LoRA weights that alias one storage and that are not contiguous, as tying or sharing produces."""
    model = make_peft(tiny_llama(), lora_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    a0, a1 = attention(model, 0), attention(model, 1)
    # One Parameter in two places (same storage, same offset).
    a0.k_proj.lora_A.default.weight = a0.q_proj.lora_A.default.weight
    # A transposed view: same values, non-contiguous.
    w = a0.v_proj.lora_B.default.weight
    w.data = w.data.t().contiguous().t()
    assert not w.is_contiguous()
    # Two halves of one storage (same storage, different offsets).
    qa, ka = a1.q_proj.lora_A.default.weight, a1.k_proj.lora_A.default.weight
    joint = torch.cat([qa.data, ka.data])
    qa.data, ka.data = joint[: qa.shape[0]], joint[qa.shape[0] :]
    # A non-contiguous slice of a bigger storage shared with another parameter.
    ob = a1.o_proj.lora_B.default.weight
    wide = torch.cat([ob.data, a1.q_proj.lora_B.default.weight.data], dim=1)
    ob.data = wide[:, : ob.shape[1]]
    a1.q_proj.lora_B.default.weight.data = wide[:, ob.shape[1] :]
    assert not ob.is_contiguous()
    return model


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_shared_and_non_contiguous_tensors(tmp_path: Path, safe: bool) -> None:
    model = shared_and_strided_model()
    keys = assert_same_as_peft(model, tmp_path, safe_serialization=safe)
    assert_weights_written(keys, [SAFETENSORS if safe else BIN])
    if safe:
        with safe_open(tmp_path / "ours" / SAFETENSORS, "pt") as f:
            q = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            k = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight")
        assert torch.equal(q, k)
    # Saving must not have changed the model's tensors.
    assert not attention(model, 0).v_proj.lora_B.default.weight.is_contiguous()


# --- PiSSA / OLoRA conversion into plain LoRA ----------------------------------------------------------


# variant -> (init_lora_weights, extra LoraConfig options, base builder, get_peft_model options,
#             whether the initial adapter is saved as safetensors)
CONVERSIONS: dict[str, tuple[str, dict[str, Any], Callable[[], nn.Module], dict[str, Any], bool]] = {
    "olora": ("olora", {}, tiny_llama, {}, True),
    "pissa": ("pissa", {}, tiny_llama, {}, True),
    "pissa_niter_2": ("pissa_niter_2", {}, tiny_llama, {}, True),
    "olora_patterns": (
        "olora",
        {"rank_pattern": {"q_proj": 6}, "alpha_pattern": {"v_proj": 3}},
        tiny_llama,
        {},
        True,
    ),
    "olora_rslora": ("olora", {"use_rslora": True}, tiny_llama, {}, True),
    "olora_dora": ("olora", {"use_dora": True}, tiny_llama, {}, True),
    # bf16 adapter: PEFT loads the initial adapter upcast to fp32, so the concatenation comes out fp32.
    "olora_bf16_no_autocast": ("olora", {}, bf16_llama, {"autocast_adapter_dtype": False}, True),
    "pissa_initial_as_bin": ("pissa", {}, tiny_llama, {}, False),
}


@pytest.mark.parametrize("variant", list(CONVERSIONS))
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_initial_model_conversion(tmp_path: Path, variant: str, safe: bool) -> None:
    init, options, make_base, peft_options, initial_safe = CONVERSIONS[variant]
    torch.manual_seed(3)
    config = lora_config(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init, **options)
    model = get_peft_model(make_base(), config, **peft_options)
    # PEFT's documented flow: save the initial adapter as a plain LoRA before training.
    model.peft_config["default"].init_lora_weights = True
    initial = tmp_path / "initial_adapter" / "initial"
    save_with_peft(model, initial, safe_serialization=initial_safe)
    model.peft_config["default"].init_lora_weights = init
    perturb_trainable(model, seed=4)
    # PEFT rewrites the initial adapter's config while converting: each saver gets its own copy.
    copies = {}
    for name in ("peft", "ours"):
        copies[name] = tmp_path / f"{name}_initial" / "initial"
        shutil.copytree(initial, copies[name])
    out = tmp_path / "out"
    for save, name in [(save_with_peft, "peft"), (save_with_fastadapter, "ours")]:
        save(
            model,
            out / name,
            path_initial_model_for_weight_conversion=str(copies[name]),
            safe_serialization=safe,
        )
    keys = assert_same_files(out / "ours", out / "peft")
    assert_weights_written(keys, [SAFETENSORS if safe else BIN])
    # Only lora_A / lora_B survive the conversion (DoRA magnitudes are dropped, as PEFT does).
    assert all(".lora_A." in n or ".lora_B." in n for n in keys[SAFETENSORS if safe else BIN])
    saved = json.loads((out / "peft" / CONFIG).read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (8, True)
    if safe:
        with safe_open(out / "ours" / SAFETENSORS, "pt") as f:
            a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        assert a.shape[0] == 2 * (6 if "rank_pattern" in options else 4)  # [A | A0]: twice the rank


# --- repeated saves, name filling -----------------------------------------------------------------------


def test_saving_twice_into_one_directory_gives_identical_files(tmp_path: Path) -> None:
    model = build("dora")
    save_with_fastadapter(model, tmp_path / "ours")
    first = snapshot(tmp_path / "ours")
    save_with_fastadapter(model, tmp_path / "ours")
    assert snapshot(tmp_path / "ours") == first
    assert leftovers(tmp_path / "ours") == []
    # And PEFT, also saving twice, agrees (its model card is updated in place on the second save).
    save_with_peft(model, tmp_path / "peft")
    save_with_peft(model, tmp_path / "peft")
    keys = assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert_weights_written(keys, [SAFETENSORS])


@pytest.mark.parametrize("safe", [True, False])
def test_weights_are_renamed_into_place_after_the_small_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, safe: bool
) -> None:
    # Replacing a large file makes ext4 write it back inside the rename, and the next rename waits for
    # that: every weights file (two adapters) is renamed after every config and the model card.
    from fastadapter import _fileset

    renamed: list[str] = []

    class Recorded:
        def __init__(self, staged: Any) -> None:
            self.staged = staged
            self.name = os.path.basename(str(staged.target))

        def commit(self) -> None:
            self.staged.commit()
            renamed.append(self.name)

        def discard(self) -> None:
            self.staged.discard()

    add = _fileset.FileSet.add
    monkeypatch.setattr(_fileset.FileSet, "add", lambda self, s, **kw: add(self, Recorded(s), **kw))
    model = build("llama_all_linear")
    add_perturbed_adapter(model, "second", lora_config(), seed=3)
    weights = SAFETENSORS if safe else "adapter_model.bin"
    for _ in range(2):  # into a new directory, then over the files
        renamed.clear()
        save_with_fastadapter(model, tmp_path / "ours", safe_serialization=safe)
        assert sorted(renamed) == sorted(["README.md", *[weights, "adapter_config.json"] * 2]), renamed
        assert renamed[-2:] == [weights, weights], renamed
    monkeypatch.undo()
    model.save_pretrained(str(tmp_path / "peft"), safe_serialization=safe)
    assert_same_files(tmp_path / "ours", tmp_path / "peft")


def twin_with_unset_base_name(name_or_path: str) -> PeftModel:
    """PeftModel(...) built directly leaves base_model_name_or_path unset; save fills it from the model."""
    base = tiny_llama()
    base.name_or_path = name_or_path
    torch.manual_seed(1)
    model = PeftModel(base, lora_config())
    assert model.peft_config["default"].base_model_name_or_path is None
    perturb_trainable(model, 1)
    return model.eval()


def test_fastadapter_fills_base_model_name_without_peft_saving_first(tmp_path: Path) -> None:
    # Two identical models: fastadapter saves one before PEFT has touched anything, PEFT the other.
    name = "org/tiny-llama"
    ours, theirs = twin_with_unset_base_name(name), twin_with_unset_base_name(name)
    save_with_fastadapter(ours, tmp_path / "ours")
    save_with_peft(theirs, tmp_path / "peft")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert json.loads((tmp_path / "ours" / CONFIG).read_text())["base_model_name_or_path"] == name


@pytest.mark.parametrize("case", ["gpt2_conv1d", "dora", "seq_cls_modules_to_save", "mlp_plain_module"])
def test_fastadapter_alone_matches_peft_on_a_twin(tmp_path: Path, case: str) -> None:
    # Guards against fastadapter relying on state PEFT's own save leaves behind.
    save_with_fastadapter(build(case), tmp_path / "ours")
    save_with_peft(build(case), tmp_path / "peft")
    keys = assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert_weights_written(keys, [SAFETENSORS])


def test_save_leaves_the_model_config_as_peft_does(tmp_path: Path) -> None:
    # inference_mode is flipped only while writing; the in-memory config must come back unchanged.
    ours, theirs = build("llama_all_linear"), build("llama_all_linear")
    save_with_fastadapter(ours, tmp_path / "ours")
    save_with_peft(theirs, tmp_path / "peft")
    assert ours.peft_config["default"].to_dict() == theirs.peft_config["default"].to_dict()
    assert ours.peft_config["default"].inference_mode is False


# --- reloading with PEFT -------------------------------------------------------------------------------

RELOAD_CASES: dict[str, tuple[Callable[[], nn.Module], torch.Tensor, dict[str, Any]]] = {
    "gpt2_conv1d": (tiny_gpt2, token_ids(), {}),
    "llama_all_linear": (tiny_llama, token_ids(), {}),
    "dora": (tiny_llama, token_ids(), {}),
    "bf16_autocast": (bf16_llama, token_ids(), {}),
    "bf16_no_autocast": (bf16_llama, token_ids(), {"autocast_adapter_dtype": False}),
    "seq_cls_modules_to_save": (seq_cls_llama, token_ids(), {}),
    "gpt2_bias_all": (tiny_gpt2, token_ids(), {}),
    "mlp_plain_module": (tiny_mlp, torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), {}),
}


@pytest.mark.parametrize("case", list(RELOAD_CASES))
def test_reloaded_adapter_gives_the_same_logits(tmp_path: Path, case: str) -> None:
    make_base, inputs, load_kwargs = RELOAD_CASES[case]
    model = build(case)
    assert_same_as_peft(model, tmp_path)
    assert_reloads_like_peft(model, make_base, tmp_path, inputs, **load_kwargs)
    # Not vacuous: the adapter changes the output.
    assert not torch.equal(logits(model, inputs), logits(make_base(), inputs))


def test_reload_of_a_subdirectory_adapter(tmp_path: Path) -> None:
    model = two_adapter_model()
    assert_same_as_peft(model, tmp_path)
    inputs = token_ids()
    loaded = {}
    for name in ("ours", "peft"):
        m = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / name))
        m.load_adapter(str(tmp_path / name / "other"), adapter_name="other")
        m.set_adapter("other")
        loaded[name] = m.eval()
    model.set_adapter("other")
    assert torch.equal(logits(loaded["ours"], inputs), logits(loaded["peft"], inputs))
    assert torch.equal(logits(loaded["ours"], inputs), logits(model, inputs))
