"""Adapters fastadapter injected itself: its own LoRA layers (`fastadapter.layers`), no peft needed.

The model keeps an `AdapterState` (each adapter's config, which are active) in its `__dict__`; the layers
mirror PEFT's module tree, so the files are PEFT's and PEFT loads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .. import _config
from .._assign import assign
from .._config import STATE_ATTR, AdapterConfig, AdapterState, adapter_state, read_config
from .._inject import Plan, add_fresh, add_loaded, install, plan, wrap, wrap_modules_to_save
from .._peft_state import lora_state_dict
from ..layers import LoraLayer, ModulesToSave
from ..names import MODEL_CARD, PEFT_PREFIX
from .base import AdapterHost

if TYPE_CHECKING:
    from .._read import Incoming


class NativeHost(AdapterHost):
    kind: ClassVar[str] = "fastadapter"

    @property
    def state(self) -> AdapterState:
        state = adapter_state(self.model)
        if state is None:
            state = AdapterState()
            self.model.__dict__[STATE_ATTR] = state
        return state

    def configs(self) -> dict[str, Any]:
        state = adapter_state(self.model)
        return {} if state is None else state.configs

    def active_adapters(self) -> list[str]:
        state = adapter_state(self.model)
        return [] if state is None else list(state.active)

    # --- saving -----------------------------------------------------------------------------------------

    def adapter_state_dict(
        self, name: str, save_embeddings: bool, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        if state_dict is not None:
            raise TypeError("state_dict=... is only supported when saving a peft.PeftModel")
        return lora_state_dict(self.model, name, save_embeddings, configs=self.configs(), prefix=PEFT_PREFIX)

    def config_json(self, config: Any, *, converted_from_initial: bool = False) -> bytes:
        return _config.config_json(self.model, config, converted_from_initial=converted_from_initial)

    def base_model_name_or_path(self, config: Any) -> str | None:
        return _config.base_model_name_or_path(self.model, config)

    def side_files(self, save_directory: str) -> list[tuple[str, bytes]]:
        return [(MODEL_CARD, _config.model_card(self.model, save_directory))]

    # --- loading ----------------------------------------------------------------------------------------

    def new_config(self, adapter_dir: str, *, is_trainable: bool) -> AdapterConfig:
        config = read_config(adapter_dir)
        config.inference_mode = not is_trainable
        return config

    def add_loaded(
        self,
        name: str,
        config: Any,
        incoming: Incoming,
        *,
        is_trainable: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        model = self.model
        p = plan(model, config, name, containers=False)  # Plan.modules: only for _freeze_base
        a = assign(
            model,
            p,
            name,
            incoming.where,
            incoming.tensors,
            trainable=is_trainable,
            device=device,
            dtype=dtype,
        )
        # Nothing above changed the model; from here on, nothing can fail for a reason the checks did not see.
        _freeze_base(p)
        layers = []
        for t in p.targets:
            layer = wrap(t)
            add_loaded(layer, t, name, config, a.lora[t.path])  # type: ignore[arg-type]
            install(t, layer)
            layers.append(layer)
        with torch.no_grad():
            for existing, value in a.others:
                existing.copy_(value)
        wrap_modules_to_save(p.save_targets, name, a.copies)
        self._register(name, config, layers if p.first_injection and not p.save_targets else None)

    def inject(
        self, config: AdapterConfig, name: str, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        """A new adapter with PEFT's initialisation (`fastadapter.inject`)."""
        model = self.model
        _add_task_heads(config)
        p = plan(model, config, name, containers=False)  # Plan.modules: only for _freeze_base
        trainable = not config.inference_mode
        layers = [(t, wrap(t)) for t in p.targets]
        for t, layer in layers:  # creates the tensors (PEFT's random stream); the model is not touched yet
            add_fresh(layer, t, name, config, device, dtype)
        copies = {path: _fresh_copy(module, trainable) for path, _, _, module in p.save_targets}
        _freeze_base(p)
        for t, layer in layers:
            for param in layer.adapter_parameters(name):
                param.requires_grad_(trainable)
            install(t, layer)
        wrap_modules_to_save(p.save_targets, name, copies)
        self._register(name, config)

    def _register(self, name: str, config: AdapterConfig, only_layers: list[LoraLayer] | None = None) -> None:
        """Record adapter `name` on the model and activate it. `only_layers`: the caller just built these and
        they are all the adapter layers the model has (first injection, no modules_to_save), with the
        trainability `set_adapter` would give them; activating the adapter is then setting each one's
        active list, without `set_adapter`'s walk over every layer and parameter."""
        state = self.state
        state.configs[name] = config
        if only_layers is None or len(state.configs) != 1:
            self.set_adapter(name)
            return
        for layer in only_layers:
            layer.__dict__["active_adapters"] = [name]
        state.active = [name]
        _set_bias_trainability(self.model, state)

    # --- managing ---------------------------------------------------------------------------------------

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Active adapters are trainable unless loaded for inference; inactive ones are frozen (PEFT)."""
        state = self.state
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in state.configs]
        if unknown:
            from ..errors import AdapterNotFoundError

            raise AdapterNotFoundError(f"unknown adapter(s) {unknown}; the model has {list(state.configs)}")
        trainable_by_adapter = {a: not state.configs[a].inference_mode for a in names}
        for path, module in _walk_layers(self.model):
            if isinstance(module, LoraLayer):
                # Every activation leaves the inactive adapters frozen, so only those active before or
                # after this one can have a flag to change: the cost does not grow with the adapters held.
                previous = module.active_adapters
                # A plain attribute: straight into __dict__, past nn.Module.__setattr__ (thousands of layers).
                module.__dict__["active_adapters"] = list(names)
                for adapter in dict.fromkeys([*previous, *names]):
                    if adapter not in module.r:
                        continue
                    trainable = trainable_by_adapter.get(adapter, False)
                    for param in module.adapter_parameters(adapter):
                        if param.requires_grad != trainable:
                            param.requires_grad_(trainable)
            else:
                assert isinstance(module, ModulesToSave)
                present = [n for n in names if n in module.modules_to_save._modules]
                if len(present) > 1:
                    raise ValueError(
                        f"only one adapter with modules_to_save can be active at `{path}`, got {present}"
                    )
                module.active_adapter = present[0] if present else None
                for adapter, copy in module.modules_to_save.items():
                    copy.requires_grad_(adapter in present and not state.configs[adapter].inference_mode)
        state.active = names
        _set_bias_trainability(self.model, state)

    def delete_adapter(self, name: str) -> None:
        """When `name` was active, the remaining active ones stay (or the first remaining adapter becomes
        active, as in PEFT); when it was the last adapter, the model is unloaded."""
        state = self.state
        self.require(name)
        del state.configs[name]
        if not state.configs:
            self.unload()
            return
        for _, module in _walk_layers(self.model):
            if isinstance(module, LoraLayer):
                module.delete_adapter(name)
            elif isinstance(module, ModulesToSave) and name in module.modules_to_save._modules:
                del module.modules_to_save[name]
        remaining = [a for a in state.active if a != name] or [sorted(state.configs)[0]]
        self.set_adapter(remaining)

    def unload(self) -> nn.Module:
        return _unload(self.model, self.state, merge=False, adapter_names=None)

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        return _unload(self.model, self.state, merge=True, adapter_names=adapter_names)


def _fresh_copy(module: nn.Module, trainable: bool) -> nn.Module:
    import copy

    source = module.original_module if isinstance(module, ModulesToSave) else module
    out = copy.deepcopy(source)
    out.requires_grad_(trainable)
    return out


def _add_task_heads(config: AdapterConfig) -> None:
    # PeftModelForSequenceClassification / ForTokenClassification add the classifier heads.
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        heads = ["classifier", "score"]
        config.modules_to_save = (
            heads if config.modules_to_save is None else [*config.modules_to_save, *heads]
        )


def _freeze_base(p: Plan) -> None:
    # PEFT freezes the base model on the first injection; later ones keep existing trainability.
    if p.first_injection:
        # The modules planning listed: the model has not changed since (nothing is installed before this).
        for module in p.modules:
            for param in module._parameters.values():
                if param is not None and param.requires_grad:
                    param.requires_grad_(False)


def _walk_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """LoRA layers and modules_to_save wrappers, not descending into them."""
    out: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, (LoraLayer, ModulesToSave)):
            out.append((path, module))
            continue
        for child_name, child in reversed(list(module._modules.items())):
            if child is not None:
                stack.append((f"{path}.{child_name}" if path else child_name, child))
    return out


def _set_bias_trainability(model: nn.Module, state: AdapterState) -> None:
    for adapter in state.active:
        config = state.configs[adapter]
        if config.inference_mode or config.bias == "none":
            continue
        if config.bias == "all":
            for pname, param in model.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    param.requires_grad_(True)
        else:
            for module in model.modules():
                if isinstance(module, LoraLayer) and module.bias is not None:
                    module.bias.requires_grad_(True)


def _unload(
    model: nn.Module, state: AdapterState, merge: bool, adapter_names: Sequence[str] | None
) -> nn.Module:
    names = list(state.active if adapter_names is None else adapter_names)
    for path, module in _walk_layers(model):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(module, LoraLayer):
            if merge:
                module.merge([n for n in names if n in module.r])
            replacement = module.base_layer
        else:
            assert isinstance(module, ModulesToSave)
            active = module.active_adapter
            replacement = module.modules_to_save[active] if active is not None else module.original_module
        parent._modules[child] = replacement
    del model.__dict__[STATE_ATTR]
    return model
