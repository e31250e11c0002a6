"""`fastadapter.hotswap` against PEFT's `hotswap_adapter` (the oracle: a PeftModel swapped by PEFT).

On each host (a PeftModel, a transformers model with adapters, fastadapter's own layers) the swapped
model gives the oracle's logits, on Linear, Conv1D and embedding targets, with another alpha and another
rank (smaller, zero-padded; larger, after `prepare_for_hotswap`); every parameter keeps its storage; a
compiled model does not recompile; a save after the swap reloads to the same logits; and every file that
does not fit is refused with the model exactly as it was.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from safetensors.torch import load_file, save_file
from torch import nn

import fastadapter
from fastadapter.hosts import host_for
from helpers import (
    CONFIG,
    SAFETENSORS,
    assert_same_state,
    logits,
    lora_config,
    make_peft,
    model_state,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

INPUTS = token_ids()
Base = Callable[[], nn.Module]

# (base model, LoRA targets): Linear, Conv1D (GPT-2's fused attention), an embedding.
SHAPES: dict[str, tuple[Base, dict[str, Any]]] = {
    "linear": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "embedding": (tiny_llama, {"target_modules": ["embed_tokens", "q_proj"]}),
}


def saved_adapter(tmp_path: Path, name: str, shape: str, seed: int, **overrides: Any) -> Path:
    base, targets = SHAPES[shape]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices
        model = make_peft(base(), lora_config(**{**targets, **overrides}), seed=seed)
    directory = tmp_path / name
    # Without the base embedding weights PEFT's "auto" adds for embedding targets: PEFT's hotswap_adapter
    # (the oracle) fails on them (a KeyError).
    model.save_pretrained(str(directory), save_embedding_layers=False)
    return directory


def on_host(host: str, base: Base, directory: Path) -> nn.Module:
    if host == "peft":
        return PeftModel.from_pretrained(base(), str(directory)).eval()
    if host == "transformers":
        return fastadapter.load(base(), directory).eval()
    return fastadapter.load(base(), directory, layers="fastadapter").eval()


def oracle(base: Base, first: Path, second: Path, target_rank: int | None = None) -> torch.Tensor:
    """PEFT's hotswap_adapter of `second` into a PeftModel holding `first`. Its swap fails on embedding
    targets (it takes `lora_embedding_A.<name>`'s grandparent for the layer): for those the oracle is
    PEFT loading `second` itself, which is what a swap must give."""
    if "lora_embedding_A" in json.dumps(list(load_file(str(second / SAFETENSORS)))):
        return logits(PeftModel.from_pretrained(base(), str(second)).eval(), INPUTS)
    model = PeftModel.from_pretrained(base(), str(first)).eval()
    if target_rank is not None:
        prepare_model_for_compiled_hotswap(model, target_rank=target_rank)
    hotswap_adapter(model, str(second), adapter_name="default", torch_device="cpu")
    return logits(model, INPUTS)


HOSTS = ["peft", "transformers", "fastadapter"]
# (first adapter's settings, second's, target_rank for prepare): alpha only; a smaller rank (PEFT
# zero-pads); a larger rank after preparing; both, with rsLoRA.
CHANGES = {
    "alpha": ({"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 32}, None),
    "smaller_rank": ({"r": 8, "lora_alpha": 8}, {"r": 4, "lora_alpha": 16}, None),
    "larger_rank_prepared": ({"r": 4, "lora_alpha": 8}, {"r": 8, "lora_alpha": 4}, 8),
    "rslora": (
        {"r": 4, "lora_alpha": 8, "use_rslora": True},
        {"r": 2, "lora_alpha": 3, "use_rslora": True},
        6,
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("host", HOSTS)
def test_hotswap_gives_peft_hotswap_logits_in_place(
    tmp_path: Path, host: str, shape: str, change: str
) -> None:
    first_settings, second_settings, target_rank = CHANGES[change]
    first = saved_adapter(tmp_path, "first", shape, seed=1, **first_settings)
    second = saved_adapter(tmp_path, "second", shape, seed=2, **second_settings)
    base = SHAPES[shape][0]
    expected = oracle(base, first, second, target_rank)
    model = on_host(host, base, first)
    if target_rank is not None:
        fastadapter.prepare_for_hotswap(model, target_rank=target_rank)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    before = logits(model, INPUTS)

    fastadapter.hotswap(model, second)

    torch.testing.assert_close(logits(model, INPUTS), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(before, expected)  # the swap changed the outputs
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers


@pytest.mark.parametrize("host", HOSTS)
def test_hotswap_then_save_reloads_the_swapped_adapter(tmp_path: Path, host: str) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, r=2, lora_alpha=5)
    model = on_host(host, tiny_llama, first)
    fastadapter.prepare_for_hotswap(model, target_rank=6)
    fastadapter.hotswap(model, second)
    fastadapter.save(model, tmp_path / "after")

    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "after")).eval()
    torch.testing.assert_close(logits(reloaded, INPUTS), logits(model, INPUTS), rtol=1e-5, atol=1e-6)
    ours = fastadapter.load(tiny_llama(), tmp_path / "after", layers="fastadapter")
    torch.testing.assert_close(logits(ours, INPUTS), logits(model, INPUTS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("host", HOSTS)
def test_swaps_back_and_forth_take_each_config_file_as_it_reads_now(tmp_path: Path, host: str) -> None:
    # Configs are built once per content of adapter_config.json: an edited file is read anew, and the
    # config a swap installed is the adapter's own (changing it changes nothing the next swap reads).
    first = saved_adapter(tmp_path, "first", "linear", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, r=4, lora_alpha=16)
    model = on_host(host, tiny_llama, first)
    fastadapter.hotswap(model, second)
    fastadapter.hotswap(model, first)
    config = host_for(model).configs()["default"]
    assert config.lora_alpha == 8
    config.rank_pattern["q_proj"] = 2

    _edit_config(second, lora_alpha=32)
    fastadapter.hotswap(model, second)
    expected = PeftModel.from_pretrained(tiny_llama(), str(second)).eval()
    torch.testing.assert_close(logits(model, INPUTS), logits(expected, INPUTS), rtol=1e-5, atol=1e-6)
    fastadapter.hotswap(model, first)
    config = host_for(model).configs()["default"]
    assert (config.lora_alpha, config.rank_pattern) == (8, {})


@pytest.mark.parametrize("host", HOSTS)
def test_hotswap_of_a_file_targeting_fewer_modules_zeroes_the_others_as_peft(
    tmp_path: Path, host: str
) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, target_modules=["q_proj"])
    expected = oracle(tiny_llama, first, second)
    model = on_host(host, tiny_llama, first)
    fastadapter.hotswap(model, second)
    torch.testing.assert_close(logits(model, INPUTS), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("host", HOSTS)
def test_compiled_model_does_not_recompile_on_a_swap(tmp_path: Path, host: str) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "linear", seed=2, r=8, lora_alpha=4)
    third = saved_adapter(tmp_path, "third", "linear", seed=3, r=2, lora_alpha=16)
    model = on_host(host, tiny_llama, first)
    fastadapter.prepare_for_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits(compiled, INPUTS)
        for adapter in (second, third):
            fastadapter.hotswap(compiled, adapter)
            got = logits(compiled, INPUTS)
            torch.testing.assert_close(got, oracle(tiny_llama, first, adapter, 8), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# --- refused files: the model is left exactly as it was ---------------------------------------------------


def _edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(str(directory / SAFETENSORS))
    edit(tensors)
    save_file(tensors, str(directory / SAFETENSORS), metadata={"format": "pt"})
    return directory


def _edit_config(directory: Path, **fields: Any) -> Path:
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return directory


def _first_key(tensors: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _other_targets(tmp_path: Path) -> Path:
    return saved_adapter(tmp_path, "bad", "linear", seed=2, target_modules=["q_proj", "k_proj"])


def _rank_above_held(tmp_path: Path) -> Path:
    return saved_adapter(tmp_path, "bad", "linear", seed=2, r=8)


def _wrong_in_features(tmp_path: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        key = _first_key(t, "lora_A")
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)

    return _edit_tensors(saved_adapter(tmp_path, "bad", "linear", seed=2), edit)


def _int_dtype(tmp_path: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        key = _first_key(t, "lora_B")
        t[key] = t[key].to(torch.int32)

    return _edit_tensors(saved_adapter(tmp_path, "bad", "linear", seed=2), edit)


def _missing_b(tmp_path: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[_first_key(t, "lora_B")]

    return _edit_tensors(saved_adapter(tmp_path, "bad", "linear", seed=2), edit)


def _corrupt(tmp_path: Path) -> Path:
    directory = saved_adapter(tmp_path, "bad", "linear", seed=2)
    path = directory / SAFETENSORS
    path.write_bytes(path.read_bytes()[:-16])
    return directory


def _rslora_differs(tmp_path: Path) -> Path:
    return _edit_config(saved_adapter(tmp_path, "bad", "linear", seed=2), use_rslora=True)


def _config_rank_differs(tmp_path: Path) -> Path:
    return _edit_config(saved_adapter(tmp_path, "bad", "linear", seed=2, r=2), r=3)


REFUSED: dict[str, tuple[Callable[[Path], Path], type[Exception]]] = {
    "other_targets": (_other_targets, fastadapter.TargetModuleError),
    "rank_above_held": (_rank_above_held, fastadapter.TensorError),
    "wrong_in_features": (_wrong_in_features, fastadapter.TensorError),
    "int_dtype": (_int_dtype, fastadapter.TensorError),
    "missing_b": (_missing_b, fastadapter.MissingTensorError),
    "corrupt": (_corrupt, fastadapter.HeaderError),
    "rslora_differs": (_rslora_differs, ValueError),
    "config_rank_differs": (_config_rank_differs, fastadapter.TensorError),
}


def _whole(model: nn.Module) -> dict[str, Any]:
    state = model_state(model)
    from fastadapter.hosts import host_for

    state["peft"]["__configs__"] = {k: repr(vars(c)) for k, c in host_for(model).configs().items()}
    return state


@pytest.mark.parametrize("swapped_before", [False, True], ids=["first_swap", "after_a_swap"])
@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("host", HOSTS)
def test_refused_file_leaves_the_model_unchanged(
    tmp_path: Path, host: str, case: str, swapped_before: bool
) -> None:
    """Also after a good swap, whose plan the next swap may reuse: not for this file."""
    make_bad, error = REFUSED[case]
    first = saved_adapter(tmp_path, "first", "linear", seed=1)
    model = on_host(host, tiny_llama, first)
    if swapped_before:
        fastadapter.hotswap(model, saved_adapter(tmp_path, "good", "linear", seed=3))
    bad = make_bad(tmp_path)
    before = _whole(model)
    with pytest.raises(error):
        fastadapter.hotswap(model, bad)
    assert_same_state(_whole(model), before)


def test_hotswap_of_an_unknown_adapter_name_is_refused(tmp_path: Path) -> None:
    first = saved_adapter(tmp_path, "first", "linear", seed=1)
    model = on_host("peft", tiny_llama, first)
    with pytest.raises(fastadapter.AdapterNotFoundError):
        fastadapter.hotswap(model, first, adapter_name="other")


def test_prepare_for_hotswap_refuses_a_compiled_model_as_peft(tmp_path: Path) -> None:
    model = on_host("peft", tiny_llama, saved_adapter(tmp_path, "first", "linear", seed=1))
    with pytest.raises(ValueError, match="before"):
        fastadapter.prepare_for_hotswap(torch.compile(model, backend="eager"), target_rank=8)


def test_hotswap_into_a_trainable_adapter_and_from_a_bin_file_gives_peft_hotswap_logits(
    tmp_path: Path,
) -> None:
    """Weights that require grad are read into in place too; a `.bin` file (no direct reads) swaps alike."""
    first = saved_adapter(tmp_path, "first", "embedding", seed=1, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "second", "embedding", seed=2, r=4, lora_alpha=16)
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    torch.save(load_file(str(second / SAFETENSORS)), as_bin / "adapter_model.bin")
    (as_bin / CONFIG).write_text((second / CONFIG).read_text())
    expected = oracle(tiny_llama, first, second)
    for source in (second, as_bin):
        model = PeftModel.from_pretrained(tiny_llama(), str(first), is_trainable=True)
        pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
        fastadapter.hotswap(model, source)
        model.eval()
        torch.testing.assert_close(logits(model, INPUTS), expected, rtol=1e-5, atol=1e-6)
        assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
        assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)
