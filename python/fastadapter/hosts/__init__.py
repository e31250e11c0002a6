"""Who owns a model's adapters, decided in one place.

- a `peft.PeftModel`: PEFT (`PeftHost`);
- a model fastadapter injected itself: fastadapter (`NativeHost`);
- a transformers `PreTrainedModel` with adapters through transformers' integration, or one getting its
  first adapter while peft is installed: transformers (`TransformersHost`, PEFT's layers);
- any other model: fastadapter.

`layers="fastadapter"` asks for fastadapter's own layers on a transformers model that has no adapter
yet; `layers="peft"` insists on PEFT's layers (an error where there are none to have).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING, Any, Literal

from .._config import adapter_state
from .base import AdapterHost

if TYPE_CHECKING:
    from torch import nn

Layers = Literal["auto", "peft", "fastadapter"]

__all__ = ["AdapterHost", "Layers", "host_for"]


def host_for(model: nn.Module, layers: Layers = "auto") -> AdapterHost:
    if layers not in ("auto", "peft", "fastadapter"):
        raise ValueError(f"layers must be 'auto', 'peft' or 'fastadapter', not {layers!r}")
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    if peft is not None and isinstance(model, peft.PeftModel):
        _refuse_native(layers, "a peft.PeftModel")
        from .peft_model import PeftHost

        return PeftHost(model)
    if adapter_state(model) is not None:
        if layers == "peft":
            raise ValueError("layers='peft': the model already holds fastadapter's own adapter layers")
        from .native import NativeHost

        return NativeHost(model)
    if _is_pretrained_model(model):
        if getattr(model, "_hf_peft_config_loaded", False):
            _refuse_native(layers, "a transformers model with adapters")
            return _transformers_host(model)
        if layers != "fastadapter" and _peft_installed():
            return _transformers_host(model)
    if layers == "peft":
        raise ValueError("layers='peft' needs peft installed and a PeftModel or a transformers model")
    from .native import NativeHost

    return NativeHost(model)


def _transformers_host(model: Any) -> AdapterHost:
    from .transformers_model import TransformersHost

    return TransformersHost(model)


def _refuse_native(layers: Layers, what: str) -> None:
    if layers == "fastadapter":
        raise ValueError(f"layers='fastadapter': {what} holds PEFT's layers; use layers='auto'")


def _is_pretrained_model(model: Any) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _peft_installed() -> bool:
    if "peft" in sys.modules:
        return sys.modules["peft"] is not None
    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):
        return False
