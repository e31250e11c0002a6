"""Loading into an adapter the model already has (PEFT's meaning: `load_adapter(dir, adapter_name="default")`
on a model that has "default" replaces that adapter's weights).

Three hosts: a `peft.PeftModel` (get_peft_model), a transformers model with `model.add_adapter(config)`,
and models whose layers are fastadapter's own (`fastadapter.inject` on a plain torch module, and
`fastadapter.load(..., layers="fastadapter")` on a transformers model). On each, `fastadapter.load` into
the existing name gives the logits of the file's adapter loaded by PEFT, keeps every module and parameter
object (an optimizer made before the load steps the loaded values), and refuses a file that does not fit
the adapter (another rank, other targets, a corrupt file) with the model left exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

import fastadapter
from fastadapter._config import adapter_state
from helpers import (
    SAFETENSORS,
    logits,
    lora_config,
    make_peft,
    perturb_trainable,
    tiny_llama,
    tiny_mlp,
    token_ids,
)

INPUTS = token_ids()
MLP_INPUTS = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
HOST_SEED, FILE_SEED = 11, 2
LR = 0.1
MLP_TARGETS: dict[str, Any] = {"target_modules": ["hidden.0", "hidden.1"]}


def build_peft(tmp_path: Path, trainable: bool) -> nn.Module:
    return make_peft(tiny_llama(), lora_config(), seed=HOST_SEED)


def build_transformers(tmp_path: Path, trainable: bool) -> nn.Module:
    model = tiny_llama()
    torch.manual_seed(HOST_SEED)
    model.add_adapter(lora_config())
    perturb_trainable(model, HOST_SEED)
    return model.eval()


def build_injected_mlp(tmp_path: Path, trainable: bool) -> nn.Module:
    torch.manual_seed(HOST_SEED)
    model = fastadapter.inject(tiny_mlp(), lora_config(**MLP_TARGETS))
    perturb_trainable(model, HOST_SEED)
    return model.eval()


def build_fastadapter_layers(tmp_path: Path, trainable: bool) -> nn.Module:
    initial = tmp_path / "initial"
    make_peft(tiny_llama(), lora_config(), seed=HOST_SEED).save_pretrained(str(initial))
    return fastadapter.load(tiny_llama(), initial, is_trainable=trainable, layers="fastadapter").eval()


# host -> (builder, base builder, the host adapter's config overrides, inputs)
HOSTS: dict[
    str, tuple[Callable[[Path, bool], nn.Module], Callable[[], nn.Module], dict[str, Any], torch.Tensor]
] = {
    "peft_model": (build_peft, tiny_llama, {}, INPUTS),
    "transformers_add_adapter": (build_transformers, tiny_llama, {}, INPUTS),
    "fastadapter_inject_mlp": (build_injected_mlp, tiny_mlp, MLP_TARGETS, MLP_INPUTS),
    "fastadapter_layers_on_llama": (build_fastadapter_layers, tiny_llama, {}, INPUTS),
}


def adapter_file(
    tmp_path: Path, base: Callable[[], nn.Module], overrides: dict[str, Any], **changes: Any
) -> Path:
    """An adapter saved by PEFT, for the same base, with its own weights (another seed)."""
    directory = tmp_path / "file"
    make_peft(base(), lora_config(**{**overrides, **changes}), seed=FILE_SEED).save_pretrained(str(directory))
    return directory


def from_pretrained_logits(
    base: Callable[[], nn.Module], directory: Path, inputs: torch.Tensor
) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(base(), str(directory)).eval(), inputs)


def identities(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, tuple[int, int]]]:
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()},
    )


def adapter_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The config kept for each adapter: PEFT's / transformers' `peft_config`, or fastadapter's own."""
    held = getattr(model, "peft_config", None)
    if not isinstance(held, dict):
        state = adapter_state(model)
        assert state is not None, f"{type(model).__name__} holds no adapter config"
        held = state.configs
    return {name: config.to_dict() for name, config in held.items()}


def active(model: nn.Module) -> list[str]:
    if getattr(model, "_hf_peft_config_loaded", False):  # a transformers host: its own method
        return list(model.active_adapters())  # type: ignore[operator]
    return fastadapter.active_adapters(model)


def lora_key(name: str) -> str:
    """A LoRA parameter's name as its file key (without `base_model.model.`)."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in load_file(directory / SAFETENSORS).items()}


@pytest.mark.parametrize("host", list(HOSTS))
def test_loading_into_the_existing_adapter_gives_the_files_logits(tmp_path: Path, host: str) -> None:
    build, base, overrides, inputs = HOSTS[host]
    model = build(tmp_path, False)
    directory = adapter_file(tmp_path, base, overrides)
    expected = from_pretrained_logits(base, directory, inputs)
    assert not torch.equal(logits(model, inputs), expected)
    if host == "peft_model":
        twin = build(tmp_path, False)
        twin.load_adapter(str(directory), adapter_name="default")
        assert torch.equal(logits(twin, inputs), expected)
    elif host == "transformers_add_adapter":
        fresh = base()
        fresh.load_adapter(str(directory))
        assert torch.equal(logits(fresh, inputs), expected)

    assert fastadapter.load(model, directory, adapter_name="default") is model
    assert torch.equal(logits(model, inputs), expected)
    assert active(model) == ["default"]


@pytest.mark.parametrize("host", list(HOSTS))
def test_loading_into_the_existing_adapter_keeps_every_module_and_parameter_object(
    tmp_path: Path, host: str
) -> None:
    build, base, overrides, _ = HOSTS[host]
    model = build(tmp_path, False)
    directory = adapter_file(tmp_path, base, overrides)
    before = identities(model)
    if host == "peft_model":  # as PEFT's own load_adapter into an existing name
        twin = build(tmp_path, False)
        twin_before = identities(twin)
        twin.load_adapter(str(directory), adapter_name="default")
        assert identities(twin) == twin_before
    fastadapter.load(model, directory, adapter_name="default")
    assert identities(model) == before


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("host", list(HOSTS))
def test_an_optimizer_made_before_the_load_steps_the_loaded_weights(
    tmp_path: Path, host: str, optimizer: type[torch.optim.Optimizer]
) -> None:
    build, base, overrides, _ = HOSTS[host]
    model = build(tmp_path, True)
    directory = adapter_file(tmp_path, base, overrides)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = file_tensors(directory)
    assert {lora_key(n) for n in params} == set(saved)
    assert not any(torch.equal(p, saved[lora_key(n)]) for n, p in params.items())
    opt = optimizer(params.values(), lr=LR)

    fastadapter.load(model, directory, adapter_name="default", is_trainable=True)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()

    for name, p in params.items():  # the step started from the file's values
        reference = saved[lora_key(name)].clone().requires_grad_(True)
        reference.grad = torch.ones_like(reference)
        optimizer([reference], lr=LR).step()
        assert torch.equal(p.detach(), reference.detach()), name


def snapshot_model(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "identities": identities(model),
        "configs": adapter_configs(model),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": active(model),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    state = model.state_dict()
    assert list(state) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), key
    assert identities(model) == before["identities"]
    assert adapter_configs(model) == before["configs"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    assert active(model) == before["active"]


def _truncate(directory: Path) -> None:
    path = directory / SAFETENSORS
    path.write_bytes(path.read_bytes()[:-16])


def _mismatch(kind: str, mlp: bool) -> tuple[dict[str, Any], tuple[type[Exception], ...], str | None]:
    """(changes to the host's config for the file, the exceptions allowed, what the message must name)."""
    module = r"hidden\.[01]" if mlp else r"layers\.[01]\.self_attn\.[qv]_proj"
    if kind == "another_rank":
        return {"r": 3}, (fastadapter.TensorError, ValueError), module
    if kind == "other_targets":
        targets = ["inp"] if mlp else ["k_proj", "o_proj"]
        return (
            {"target_modules": targets},
            (fastadapter.TargetModuleError, fastadapter.MissingTensorError),
            None,
        )
    if kind == "a_subset_of_the_targets":
        targets = ["hidden.0"] if mlp else ["q_proj"]
        return (
            {"target_modules": targets},
            (fastadapter.TargetModuleError, fastadapter.MissingTensorError),
            None,
        )
    assert kind == "corrupt_file"
    return {}, (fastadapter.HeaderError,), SAFETENSORS


@pytest.mark.parametrize("kind", ["another_rank", "other_targets", "a_subset_of_the_targets", "corrupt_file"])
@pytest.mark.parametrize("host", list(HOSTS))
def test_a_file_that_does_not_fit_the_existing_adapter_is_refused_and_the_model_is_unchanged(
    tmp_path: Path, host: str, kind: str
) -> None:
    build, base, overrides, inputs = HOSTS[host]
    changes, errors, match = _mismatch(kind, base is tiny_mlp)
    directory = adapter_file(tmp_path, base, overrides, **changes)
    if kind == "corrupt_file":
        _truncate(directory)
        with pytest.raises(fastadapter.HeaderError):  # the file is refused by a fresh load too
            fastadapter.load(base(), directory)
    model = build(tmp_path, False)
    before = snapshot_model(model)
    expected_logits = logits(model, inputs)

    with pytest.raises(errors, match=match) as caught:
        fastadapter.load(model, directory, adapter_name="default")
    assert not isinstance(caught.value, fastadapter.AdapterExistsError)
    if kind == "another_rank":  # both shapes: the file's (rank 3) and the adapter's (rank 4)
        shapes = [tuple(int(d) for d in s.split(",")) for s in _shapes(str(caught.value))]
        assert any(3 in s for s in shapes), str(caught.value)
        assert any(4 in s for s in shapes), str(caught.value)
    assert_unchanged(model, before)
    assert torch.equal(logits(model, inputs), expected_logits)


def _shapes(message: str) -> list[str]:
    return re.findall(r"[\[(](\d+(?:, ?\d+)+)[\])]", message)


@pytest.mark.parametrize("host", list(HOSTS))
def test_after_loading_a_file_with_another_lora_alpha_the_kept_config_describes_the_file(
    tmp_path: Path, host: str
) -> None:
    build, base, overrides, inputs = HOSTS[host]
    model = build(tmp_path, False)
    assert adapter_configs(model)["default"]["lora_alpha"] == 8
    directory = adapter_file(tmp_path, base, overrides, lora_alpha=16)
    fastadapter.load(model, directory, adapter_name="default")
    assert adapter_configs(model)["default"]["lora_alpha"] == 16
    assert torch.equal(logits(model, inputs), from_pretrained_logits(base, directory, inputs))
