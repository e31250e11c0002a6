"""PiSSA / CorDA / OLoRA (and LoRA-GA) adapters converted to plain LoRA on save.

Those methods move part of the base weight into the adapter at initialisation. Knowing the initial
adapter (A0, B0) and the trained one (A, B), the change is a LoRA of twice the rank:
dW = A B - A0 B0 = [A | A0] x [B | -B0]^T. Same computation, keys and dtypes as peft 0.21's
`LoraModel._convert_state_dict_for_initial_model` / `subtract_mutated_init`; the initial adapter is read
straight from its file instead of being loaded into the model as a temporary adapter.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ._tensors import load_safetensors
from .errors import MissingTensorError
from .names import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

_CONVERTIBLE = ("pissa", "corda", "olora", "lora_ga", "true")


def check_convertible(config: Any) -> None:
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    if not any(str(config.init_lora_weights).lower().startswith(p) for p in _CONVERTIBLE):
        warnings.warn(
            "`path_initial_model_for_weight_conversion` only works for converting a "
            "PiSSA/CorDA/OLoRA/LoRA-GA adapter to a LoRA adapter",
            stacklevel=3,
        )


def _read_initial(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(st):
        return load_safetensors(st)
    bin_path = os.path.join(path, ADAPTER_WEIGHTS_BIN)
    if os.path.isfile(bin_path):
        loaded: dict[str, torch.Tensor] = torch.load(bin_path, map_location="cpu", weights_only=True)
        return loaded
    raise FileNotFoundError(
        2, f"no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN} in the initial adapter directory", path
    )


def _as_loaded(t: torch.Tensor) -> torch.Tensor:
    # PEFT loads the initial adapter into fresh LoRA layers, which autocast half-precision to fp32.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def subtract_initial(state_dict: dict[str, torch.Tensor], initial_path: str) -> dict[str, torch.Tensor]:
    """The converted state dict: only lora_A / lora_B entries, as PEFT returns it."""
    initial = _read_initial(initial_path)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if "lora_A" in name:
            out[name] = torch.cat([tensor, _as_loaded(_initial(initial, name, initial_path))], dim=0)
        elif "lora_B" in name:
            out[name] = torch.cat([tensor, -_as_loaded(_initial(initial, name, initial_path))], dim=1)
    return out


def _initial(initial: dict[str, torch.Tensor], name: str, path: str) -> torch.Tensor:
    try:
        return initial[name]
    except KeyError:
        raise MissingTensorError(f"tensor `{name}` is missing from the initial adapter in {path}") from None
