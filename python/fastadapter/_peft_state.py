"""Which tensors `PeftModel.save_pretrained` writes for one adapter, computed the way PEFT does, fast.

PEFT's `get_peft_model_state_dict` builds the whole model's state_dict and filters it with several
passes over every module and key (~95 ms for 2048 LoRA tensors on our CI machine, more than writing
them). This module selects the same entries structurally: one pass over `named_modules()`, reading
each tuner layer's own parameters. The rules mirror peft 0.21 (`BaseTuner._get_adapter_state_dict`,
`LoraModel._get_adapter_state_dict`, `_get_learnable_bias_state_dict`, the auxiliary-wrapper and
embedding sections of `get_peft_model_state_dict`); the tests compare against PEFT's own function.

The same selection serves models injected by fastadapter itself (its layers mirror PEFT's module tree),
and then needs no peft: PEFT's classes are consulted only when peft has been imported.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .names import ALL_LINEAR

_SKIPPED_ATTRS = ("base_layer", "model")


class _Customised(Exception):
    """A strict selection met a module whose `state_dict` is replaced, overridden or hooked."""


_STATE_DICT = nn.Module.state_dict
_GET_EXTRA_STATE = nn.Module.get_extra_state


def _customised(module: nn.Module) -> bool:
    """Whether `module.state_dict()` may differ from its own tensors: `state_dict` replaced on the instance
    or overridden by its class, or a state-dict hook."""
    d = module.__dict__
    return bool(
        d["_state_dict_hooks"]
        or d["_state_dict_pre_hooks"]
        or "state_dict" in d
        or type(module).state_dict is not _STATE_DICT
    )


def _module_entries(
    module: nn.Module, prefix: str, out: dict[str, torch.Tensor], strict: bool = False
) -> None:
    """What `module.state_dict(prefix=prefix, keep_vars=True)` would add to `out`, without its per-call
    overhead. Modules with state-dict hooks or extra state take torch's own path so nothing differs;
    `strict`: a customised module (see `_customised`) raises `_Customised` instead. (Reads the module's
    `__dict__` directly: this runs for every module inside every LoRA layer, ~9k per 1024 layers.)"""
    d = module.__dict__
    hooked = d["_state_dict_hooks"] or d["_state_dict_pre_hooks"]
    if strict and (hooked or "state_dict" in d or type(module).state_dict is not _STATE_DICT):
        raise _Customised
    if hooked or type(module).get_extra_state is not _GET_EXTRA_STATE:
        out.update(module.state_dict(prefix=prefix, keep_vars=True))
        return
    for name, param in d["_parameters"].items():
        if param is not None:
            out[prefix + name] = param
    buffers = d["_buffers"]
    if buffers:
        skipped = d["_non_persistent_buffers_set"]
        for name, buf in buffers.items():
            if buf is not None and name not in skipped:
                out[prefix + name] = buf
    for name, child in d["_modules"].items():
        if child is not None:
            _module_entries(child, f"{prefix}{name}.", out, strict)


def _is_other_adapters_key(key: str, unwanted: list[str]) -> bool:
    # peft's _filter_state_dict_for_adapter_name, applied key by key.
    return any(f".{name}." in key or key.endswith(f".{name}") for name in unwanted)


def _tuner_layer_entries(layer: nn.Module, path: str, out: dict[str, torch.Tensor], strict: bool) -> None:
    """All of a tuner layer but its wrapped base layer (peft's `_get_tuner_state_dict_key_prefixes`)."""
    for name, child in layer._modules.items():
        if name not in _SKIPPED_ATTRS and child is not None:
            _module_entries(child, f"{path}.{name}." if path else f"{name}.", out, strict)
    for name, param in layer._parameters.items():
        if name not in _SKIPPED_ATTRS and param is not None:
            out[f"{path}.{name}" if path else name] = param
    for name, buf in layer._buffers.items():
        if name not in _SKIPPED_ATTRS and buf is not None and name not in layer._non_persistent_buffers_set:
            out[f"{path}.{name}" if path else name] = buf


def _is_under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# Module kinds, decided once per class: isinstance against peft's ABCs is slow enough to matter when a
# model has thousands of modules.
_OTHER, _AUX, _TUNER, _TUNER_LAYER = range(4)
_KIND_CACHE: dict[type, int] = {}


def _kind(cls: type) -> int:
    kind = _KIND_CACHE.get(cls)
    if kind is None:
        from .layers import LoraLayer, ModulesToSave

        if issubclass(cls, LoraLayer):
            return _KIND_CACHE.setdefault(cls, _TUNER_LAYER)
        if issubclass(cls, ModulesToSave):
            return _KIND_CACHE.setdefault(cls, _AUX)
        if sys.modules.get("peft") is None:  # no PeftModel can exist: nothing else is a tuner (not cached)
            return _OTHER
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        if issubclass(cls, AuxiliaryTrainingWrapper):
            kind = _AUX
        elif issubclass(cls, BaseTuner):
            kind = _TUNER
        elif issubclass(cls, BaseTunerLayer):
            kind = _TUNER_LAYER
        else:
            kind = _OTHER
        _KIND_CACHE[cls] = kind
    return kind


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
    """`named_modules()` order and de-duplication, but inside a tuner layer only its `base_layer` is
    entered: the adapter containers (lora_A, lora_B, ...) hold no tuner layers or wrappers and are read
    by `_tuner_layer_entries` directly."""
    seen = {id(model)}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        kind = _kind(type(module))
        yield path, module, kind
        children = module._modules.items()
        if kind == _TUNER_LAYER:
            children = [(n, c) for n, c in children if n == "base_layer"]  # type: ignore[assignment]
        pending = []
        for name, child in children:
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            pending.append((f"{path}.{name}" if path else name, child))
        stack.extend(reversed(pending))


# peft.utils.constants
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]


def embedding_is_targeted(model: Any, config: Any) -> bool:
    target_modules = getattr(config, "target_modules", None)
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # PEFT tests `re.match(rf"(.*\.)?{e}$", k)` for every module; the names hold no regex syntax, so a
        # suffix test says the same at a fraction of the cost (~20 ms on 11k modules otherwise).
        return any(re.fullmatch(target_modules, k) for k in names_ending_in(base, EMBEDDING_LAYER_NAMES))
    if target_modules:
        return any(k in target_modules for k in EMBEDDING_LAYER_NAMES)
    return False


_NAMED_MODULES = nn.Module.named_modules


class _OwnNamedModules(Exception):
    """A module class overrides `named_modules`."""


def names_ending_in(model: nn.Module, last: list[str]) -> list[str]:
    """The names `model.named_modules()` gives that are one of `last` or end in "." + one of them, with its
    de-duplication (a module reached twice is named once, by the path its preorder meets first). A walk of
    `_modules` instead of named_modules' generators, which hand every name up through one generator per
    level: on 11k modules that cost more than the adapter's selection. A class that overrides
    `named_modules` gets its own."""
    suffixes = tuple("." + e for e in last)
    memo: set[nn.Module] = {model}
    found: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if type(module).named_modules is not _NAMED_MODULES:
            raise _OwnNamedModules
        for key, child in module._modules.items():
            if child is None or child in memo:
                continue
            memo.add(child)
            name = prefix + key
            if key in last or key.endswith(suffixes):
                found.append(name)
            visit(name + ".", child)

    try:
        visit("", model)
    except _OwnNamedModules:
        return [k for k, _ in model.named_modules() if k in last or k.endswith(suffixes)]
    return found


def resolve_save_embedding_layers(model: Any, config: Any, save_embedding_layers: bool | str) -> bool:
    """PEFT's `save_embedding_layers="auto"` decision, made offline.

    PEFT asks the Hub whether the base model's config exists when `base_model_name_or_path` is not a
    local directory; fastadapter never touches the network, so it compares vocab sizes only against a
    local `config.json` and otherwise assumes the vocabulary was not resized (PEFT's own answer in
    offline mode).
    """
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    using_trainable_tokens = (
        str(getattr(config, "peft_type", "")) == "TRAINABLE_TOKENS"
        or getattr(config, "trainable_token_indices", None) is not None
    )
    if embedding_is_targeted(model, config) and not using_trainable_tokens:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
            stacklevel=3,
        )
        return True
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not (vocab_size and model_id and os.path.exists(os.path.join(model_id, "config.json"))):
        return False
    base_vocab = model.config.__class__.from_pretrained(model_id).vocab_size
    if vocab_size != base_vocab:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
            "finetuning.",
            stacklevel=3,
        )
        return True
    return False


def _has_valid_embedding_base_layer(layer: Any) -> bool:
    # peft.utils.save_and_load.has_valid_embedding_base_layer
    return hasattr(layer, "base_layer") and isinstance(layer.base_layer, (nn.Linear, nn.Embedding))


def _embedding_layer_name(model: Any, layer: Any, is_embedding_in_target_modules: bool) -> str | None:
    # peft.utils.save_and_load.get_embedding_layer_name
    for name, module in model.named_modules():
        if (not is_embedding_in_target_modules and module == layer) or module == getattr(
            layer, "base_layer", None
        ):
            return str(name)
    return None


def lora_state_dict(
    model: Any,
    adapter_name: str,
    save_embeddings: bool,
    configs: dict[str, Any] | None = None,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for LoRA adapter `adapter_name` of PeftModel `model`, keys as in the file."""
    return _lora_state_dict(model, adapter_name, save_embeddings, configs, prefix, strict=False)


def lora_state_dict_unless_customised(
    model: Any,
    adapter_name: str,
    save_embeddings: bool,
    configs: dict[str, Any] | None = None,
    prefix: str = "",
) -> dict[str, torch.Tensor] | None:
    """`lora_state_dict`, or None when `model.state_dict()` may say something other than the modules' own
    tensors (a module with `state_dict` replaced or overridden, or a state-dict hook, anywhere in the
    tree): PEFT's selection starts from `model.state_dict()`, so the caller then takes PEFT's own path.
    The test is made on the modules as the selection visits them, every module once: a separate pass
    over 11k modules cost as much as the selection itself."""
    try:
        return _lora_state_dict(model, adapter_name, save_embeddings, configs, prefix, strict=True)
    except _Customised:
        return None


def _lora_state_dict(
    model: Any,
    adapter_name: str,
    save_embeddings: bool,
    configs: dict[str, Any] | None,
    prefix: str,
    strict: bool,
) -> dict[str, torch.Tensor]:
    peft_config: dict[str, Any] = model.peft_config if configs is None else configs
    config = peft_config[adapter_name]
    unwanted = [name for name in peft_config if name != adapter_name]

    selected: dict[str, torch.Tensor] = {}
    bias: dict[str, torch.Tensor] = {}
    aux_modules: list[tuple[str, Any]] = []
    aux_names: list[str] = []
    bias_mode = getattr(config, "bias", "none")
    # `_walk` reaches every module once except the insides of tuner layers (selected or inside a
    # wrapper, both read with `_module_entries`), so with `strict` every module is tested once.
    for path, module, kind in _walk(model):
        if strict and _customised(module):
            raise _Customised
        if strict and kind == _TUNER_LAYER:
            inner = module._modules.get("model")  # neither walked nor selected, yet in `model.state_dict()`
            if inner is not None and any(map(_customised, inner.modules())):
                raise _Customised
        path = path.removeprefix("_fsdp_wrapped_module.")
        if kind == _AUX:
            aux_modules.append((path, module))
            aux_names.append(path)
        elif kind == _TUNER or (kind == _TUNER_LAYER and not _is_under(path, aux_names)):
            _tuner_layer_entries(module, path, selected, strict)
        if kind == _TUNER_LAYER and bias_mode.endswith("_only"):
            base_bias = getattr(getattr(module, "base_layer", None), "bias", None)
            bias_name = f"{path}.base_layer.bias" if path else "base_layer.bias"
            if isinstance(base_bias, torch.Tensor) and not _is_other_adapters_key(bias_name, unwanted):
                bias[bias_name] = base_bias

    to_return = {k: v for k, v in selected.items() if not _is_other_adapters_key(k, unwanted)}

    full_state: dict[str, torch.Tensor] | None = None

    def model_state() -> dict[str, torch.Tensor]:
        # The whole state_dict is only needed by the rare modes (bias="all", embeddings).
        nonlocal full_state
        if full_state is None:
            full_state = {
                k: v
                for k, v in model.state_dict(keep_vars=True).items()
                if not _is_other_adapters_key(k, unwanted)
            }
        return full_state

    if bias_mode == "all":
        to_return.update({k: v for k, v in model_state().items() if k == "bias" or k.endswith(".bias")})
    else:
        to_return.update(bias)

    if getattr(config, "use_dora", False):
        suffix = f"lora_magnitude_vector.{adapter_name}.weight"
        to_return = {(k[:-7] if k.endswith(suffix) else k): v for k, v in to_return.items()}

    for path, module in aux_modules:
        module_state: dict[str, torch.Tensor] = {}
        _module_entries(module, "", module_state, strict)
        module_state = {
            k: v for k, v in module_state.items() if not _is_other_adapters_key(f"{path}.{k}", unwanted)
        }
        for k, v in module.adapter_state_dict(adapter_name, module_state).items():
            to_return[f"{path}.{k}"] = v

    if save_embeddings and hasattr(model, "get_input_embeddings"):
        targeted = embedding_is_targeted(model, config)
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if not targeted or _has_valid_embedding_base_layer(layer):
                name = _embedding_layer_name(model, layer, targeted)
                if name:
                    to_return.update({k: v for k, v in model_state().items() if k.startswith(f"{name}.")})
    elif save_embeddings:
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
            stacklevel=3,
        )

    return {prefix + _remove_adapter_name(k, adapter_name): v for k, v in to_return.items()}


def _remove_adapter_name(key: str, adapter_name: str) -> str:
    """peft's `_remove_adapter_name_from_state_dict_key` (what LoRA uses), without a regex per key:
    drop the adapter name where it ends the key or stands just before the last component."""
    if "." not in key:
        return key
    tail = f".{adapter_name}"
    if key.endswith(tail):
        return key[: -len(tail)]
    head, _, suffix = key.rpartition(".")
    return f"{head.removesuffix(tail)}.{suffix}"
