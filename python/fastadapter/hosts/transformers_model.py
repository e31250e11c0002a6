"""A transformers `PreTrainedModel` with adapters through transformers' own integration (`PeftAdapterMixin`:
`add_adapter`, `load_adapter`, `set_adapter`, `save_pretrained`): PEFT's layers inside the model itself,
the configs in `model.peft_config`, `model._hf_peft_config_loaded` set.

Its `save_pretrained` writes the active adapter only, at the top level, with `generation_config.json`
for a generative model and no model card; `adapter_config.json` is `PeftConfig.save_pretrained`'s (the
config as it is: no `inference_mode` override, no `auto_mapping`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from .._inject import plan
from ..names import GENERATION_CONFIG
from .base import AdapterHost, rendered
from .peft_hosted import (
    PeftLayersHost,
    activate_layer,
    activate_layers,
    lora_layer_types,
    set_training,
    wrapper_types,
)

if TYPE_CHECKING:
    from .._read import Incoming


class TransformersHost(PeftLayersHost):
    kind: ClassVar[str] = "transformers"
    writes_model_card: ClassVar[bool] = False

    @property
    def loaded(self) -> bool:
        return bool(getattr(self.model, "_hf_peft_config_loaded", False))

    def configs(self) -> dict[str, Any]:
        if not self.loaded:
            return {}
        model: Any = self.model
        configs: dict[str, Any] = model.peft_config
        return configs

    def active_adapters(self) -> list[str]:
        if not self.loaded:
            return []
        active: list[str] = self.model.active_adapters()  # type: ignore[operator]
        return list(active)

    # --- saving -----------------------------------------------------------------------------------------

    def save_layout(self, selected: Sequence[str] | None) -> list[tuple[str, str]]:
        if selected is not None:
            return AdapterHost.save_layout(self, selected)
        if not self.loaded:
            return AdapterHost.save_layout(self, selected)  # raises: no adapter
        active = self.active_adapters()
        if len(active) > 1:
            raise ValueError(
                "Multiple active adapters detected, saving multiple active adapters is not supported yet. "
                "You can save adapters separately one by one by iteratively calling "
                "`model.set_adapter(adapter_name)` then `model.save_pretrained(...)`"
            )
        return [(active[0], "")]

    def config_json(self, config: Any, *, converted_from_initial: bool = False) -> bytes:
        if converted_from_initial:
            from .. import _peft_files

            return _peft_files.config_json(self.model, config, converted_from_initial=True)
        out: dict[str, Any] = config.to_dict()
        for key, value in out.items():
            if isinstance(value, (set, frozenset)):
                out[key] = _sorted(value)
        return json.dumps(out, indent=2, sort_keys=True).encode()

    def base_model_name_or_path(self, config: Any) -> str | None:
        return config.base_model_name_or_path  # type: ignore[no-any-return]  # transformers fills nothing

    def side_files(self, save_directory: str) -> list[tuple[str, bytes]]:
        model: Any = self.model
        if not model.can_generate():
            return []
        return [(GENERATION_CONFIG, rendered(model.generation_config.save_pretrained, GENERATION_CONFIG))]

    # --- loading ----------------------------------------------------------------------------------------

    def register_config(self, name: str, config: Any) -> None:
        model: Any = self.model
        if not self.loaded or "peft_config" not in model.__dict__:
            model.peft_config = {}
        model._hf_peft_config_loaded = True
        model.peft_config[name] = config

    def _add_through_peft(
        self,
        name: str,
        config: Any,
        incoming: Incoming,
        *,
        is_trainable: bool,
        device: Any,
        dtype: Any,
    ) -> None:
        """transformers' own `load_adapter`, checked first by fastadapter's planner: what the fast way does
        not cover is loaded exactly as transformers loads it (`device` and `dtype` are its own then)."""
        from .base import restore_trainability, trainability

        plan(self.model, config, name, layer_types=lora_layer_types(), wrapper_types=wrapper_types())
        model: Any = self.model
        before = trainability(model)
        had_adapters = self.loaded
        try:
            model.load_adapter(os.path.dirname(incoming.where), adapter_name=name, is_trainable=is_trainable)
        except BaseException:
            if name in self.configs():
                self.remove_adapter(name)
            model._hf_peft_config_loaded = had_adapters
            restore_trainability(before)
            raise

    def add_loaded(self, name: str, config: Any, incoming: Incoming, **kwargs: Any) -> None:
        if self.fast_path_refusal(config) is not None:
            self._add_through_peft(name, config, incoming, **kwargs)  # activation is transformers' own
            return
        super().add_loaded(name, config, incoming, **kwargs)

    def inject_empty(self, name: str, config: Any) -> None:
        from peft import inject_adapter_in_model

        model: Any = self.model
        inject_adapter_in_model(config, model, name, low_cpu_mem_usage=True)
        model._hf_peft_config_loaded = True

    def remove_adapter(self, name: str) -> None:
        model: Any = self.model
        if len(self.configs()) > 1:
            model.delete_adapter(name)
        else:
            self.unload()

    def activate_loaded(self, name: str, *, is_trainable: bool) -> None:
        # transformers' `load_adapter`: the new adapter is active on every LoRA layer (its new LoraModel
        # activates it); loaded for inference, the model goes to eval() and every LoRA layer is frozen.
        built = self.built
        if built is not None:
            layers, modules = built.layers, built.modules
        else:
            modules = list(self.model.modules())
            layers = [m for m in modules if isinstance(m, lora_layer_types())]
        if is_trainable:
            for layer in layers:
                layer.__dict__["_active_adapter"] = [name]
            return
        set_training(self.model, modules, False)
        # A first injection built its layers frozen, around a base it froze: nothing left to freeze.
        if built is None or not built.first_injection:
            for layer in layers:
                # Every LoRA weight frozen: the adapters active before and the new one (the others are
                # frozen: every activation freezes the inactive ones), and the base layer's.
                activate_layer(layer, name, trainable=False)
                layer.get_base_layer().requires_grad_(False)  # type: ignore[operator]

    # --- managing ---------------------------------------------------------------------------------------

    def set_adapter(self, names: str | Sequence[str]) -> None:
        model: Any = self.model
        wanted = [names] if isinstance(names, str) else list(names)
        configs = self.configs()
        # transformers' set_adapter (its checks and errors), without its walk into every layer's every
        # adapter where the LoRA layers are all it has to set.
        if (
            not configs
            or any(n not in configs for n in wanted)
            or not activate_layers(model, wanted, trainable=True)
        ):
            model.set_adapter(names if isinstance(names, str) else list(names))

    def delete_adapter(self, name: str) -> None:
        model: Any = self.model
        model.delete_adapter(name)

    def unload(self) -> nn.Module:
        return self._unload(merge=False, adapter_names=None)

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        return self._unload(merge=True, adapter_names=adapter_names)

    def _unload(self, merge: bool, adapter_names: Sequence[str] | None) -> nn.Module:
        """Every PEFT layer replaced by its base layer (merged first if asked), the bookkeeping removed."""
        model: Any = self.model
        lora, wrappers = lora_layer_types(), wrapper_types()
        names = list(adapter_names) if adapter_names is not None else None
        module: Any
        for path, module in list(model.named_modules()):
            if not isinstance(module, (*lora, *wrappers)):
                continue
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if not isinstance(parent._modules.get(child), type(module)):
                continue  # inside a layer replaced already
            if isinstance(module, lora):
                if merge:
                    module.merge(adapter_names=names)
                replacement = module.get_base_layer()
            else:
                wrapper: Any = module
                active = wrapper.active_adapters
                replacement = (
                    wrapper.modules_to_save[active[0]]
                    if active and active[0] in wrapper.modules_to_save
                    else wrapper.original_module
                )
            parent._modules[child] = replacement
        model.__dict__.pop("peft_config", None)
        model._hf_peft_config_loaded = False
        return model  # type: ignore[no-any-return]


def _sorted(values: Any) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=repr)


__all__ = ["TransformersHost"]
