"""A `peft.PeftModel`: PEFT's own layers under `model.base_model` (a LoraModel), PEFT's files and card."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .. import _peft_files
from .._peft_state import lora_state_dict_unless_customised
from ..names import MODEL_CARD
from .peft_hosted import PeftLayersHost, activate_layer, activate_layers, set_training


class PeftHost(PeftLayersHost):
    kind: ClassVar[str] = "peft"

    @property
    def peft_model(self) -> Any:
        return self.model

    def tuned_model(self) -> nn.Module:
        tuned: nn.Module = self.peft_model.base_model.model
        return tuned

    def configs(self) -> dict[str, Any]:
        configs: dict[str, Any] = self.peft_model.peft_config
        return configs

    def active_adapters(self) -> list[str]:
        return list(self.peft_model.active_adapters)

    # --- saving -----------------------------------------------------------------------------------------

    def adapter_state_dict(
        self, name: str, save_embeddings: bool, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        config = self.configs()[name]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        fast = None
        if state_dict is None and not distributed and config.peft_type == "LORA":
            fast = lora_state_dict_unless_customised(self.model, name, save_embeddings)
        if fast is None:
            # Caller-provided state dicts, sharded models (their state_dict is a collective), non-LoRA
            # methods and models whose `state_dict` is overridden or hooked take PEFT's own selection (it
            # starts from `model.state_dict()`); the bytes are still written by fastadapter.
            from peft.utils.save_and_load import get_peft_model_state_dict

            selected: dict[str, torch.Tensor] = get_peft_model_state_dict(
                self.model, state_dict=state_dict, adapter_name=name, save_embedding_layers=save_embeddings
            )
            return selected
        return fast

    def config_json(self, config: Any, *, converted_from_initial: bool = False) -> bytes:
        return _peft_files.config_json(self.model, config, converted_from_initial=converted_from_initial)

    def base_model_name_or_path(self, config: Any) -> str | None:
        return _peft_files.base_model_name_or_path(self.model, config)

    def side_files(self, save_directory: str) -> list[tuple[str, bytes]]:
        return [(MODEL_CARD, _peft_files.model_card(self.model, save_directory))]

    # --- loading ----------------------------------------------------------------------------------------

    def after_injection(self, name: str, config: Any, targets: list[str], *, is_trainable: bool) -> None:
        tuner = self.peft_model.base_model
        known = set(tuner.targeted_module_names)
        tuner.targeted_module_names.extend(t for t in targets if t not in known)

    def inject_empty(self, name: str, config: Any) -> None:
        self.peft_model.add_adapter(name, config, low_cpu_mem_usage=True)

    def activate_loaded(self, name: str, *, is_trainable: bool) -> None:
        # fastadapter.load activates what it loaded: `PeftModel.set_adapter(name, inference_mode=...)`;
        # `PeftModel.load_adapter` ends in eval() unless trainable.
        peft_model = self.peft_model
        built = self.built
        if built is None or any(layer.merged for layer in built.layers):
            peft_model.set_adapter(name, inference_mode=not is_trainable)  # it warns and unmerges
            if not is_trainable:
                peft_model.eval()
            return
        # PEFT's set_adapter on the known layers (the fast way leaves no modules_to_save wrappers, whose
        # activation PEFT's walk would also do): the adapter active everywhere, only it trainable.
        for layer in built.layers:
            activate_layer(layer, name, trainable=is_trainable)
        peft_model.base_model.active_adapter = name
        peft_model.active_adapter = name
        if not is_trainable:
            set_training(peft_model, [peft_model, peft_model.base_model, *built.modules], False)

    # --- managing ---------------------------------------------------------------------------------------

    def set_adapter(self, names: str | Sequence[str]) -> None:
        if not isinstance(names, str):
            raise TypeError("a PeftModel activates one adapter at a time: pass its name")
        peft_model = self.peft_model
        config = peft_model.peft_config.get(names)
        # PeftModel.set_adapter(names) (inference_mode=False: the adapter becomes trainable), without its
        # walk into every layer's every adapter where the layers are all it has to set.
        if config is None or config.is_prompt_learning:
            peft_model.set_adapter(names)
        elif activate_layers(self.tuned_model(), [names], trainable=True):
            peft_model.base_model.active_adapter = names
            peft_model.active_adapter = names
        else:
            peft_model.set_adapter(names)

    def delete_adapter(self, name: str) -> None:
        self.peft_model.delete_adapter(name)

    def unload(self) -> nn.Module:
        base: nn.Module = self.peft_model.unload()
        return base

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        merged: nn.Module = self.peft_model.merge_and_unload(adapter_names=adapter_names)
        return merged
