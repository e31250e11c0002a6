"""The patched PEFT functions: `PeftModel.save_pretrained`, `from_pretrained`, `load_adapter`, and
`hotswap_adapter`.

Each one decides, before anything is changed, whether fastadapter does exactly what PEFT would for this
call; if not, PEFT's original runs. A refusal by fastadapter itself (a `FastAdapterError` raised by its
checks, which all run before the model or any file is touched) also hands the call to PEFT.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from ..errors import FastAdapterError
from ..names import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN
from ._patch_report import fell_back, routed

if TYPE_CHECKING:
    from torch import nn

    from ._patch_peft_load import NewLora

# What `fastadapter.load` and PEFT agree on for a new adapter loaded from a local directory.
_TASK_TYPES_WITHOUT_EXTRA_MODULES = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
_LOW_PRECISION_OR_FP32 = ("float32", "float16", "bfloat16")


def _why(e: BaseException) -> str:
    """A refusal as a reason: the error's class and its message without the file it names (so that the
    report counts one reason, not one per directory)."""
    return f"{type(e).__name__}: {str(e).split(': ', 1)[-1][:120]}"


def _cpu(torch_device: Any) -> bool:
    """PEFT reads the file onto `torch_device`, then puts each weight on its base layer's device: the
    result is the same for any device, but only the CPU is sure to exist (another can raise)."""
    return torch_device is None or str(torch_device) == "cpu"


def _local_adapter_refusal(model_id: Any, kwargs: dict[str, Any], key_mapping: Any) -> str | None:
    if not _cpu(kwargs.get("torch_device")):
        return "torch_device other than the CPU"
    kwargs = {k: v for k, v in kwargs.items() if k != "torch_device"}
    if kwargs:
        return f"keyword arguments {sorted(kwargs)}"
    if key_mapping:
        return "key_mapping"
    if not isinstance(model_id, (str, os.PathLike)) or not os.path.isdir(model_id):
        return "not a local directory (Hub id)"
    if not any(os.path.isfile(os.path.join(model_id, n)) for n in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)):
        return "no adapter weights file in the directory"
    return None


def _quantized(model: Any) -> bool:
    return any(getattr(model, a, None) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "hf_quantizer"))


# --- save_pretrained ------------------------------------------------------------------------------------


def save_pretrained(original: Any, call: str) -> Any:
    @functools.wraps(original)
    def save_pretrained(
        self: Any,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        reason = _save_refusal(
            self, save_directory, selected_adapters, path_initial_model_for_weight_conversion
        )
        if reason is None:
            from ..save import save

            try:
                # Nothing is published unless every file is written: a refusal leaves the directory as it was.
                save(
                    self,
                    save_directory,
                    selected_adapters=selected_adapters,
                    safe_serialization=safe_serialization,
                    save_embedding_layers=save_embedding_layers,
                    is_main_process=is_main_process,
                    **({"state_dict": kwargs["state_dict"]} if "state_dict" in kwargs else {}),
                )
            except FastAdapterError as e:
                reason = _why(e)
            else:
                routed(call)
                return None
        fell_back(call, reason)
        original(
            self,
            save_directory,
            safe_serialization,
            selected_adapters,
            save_embedding_layers,
            is_main_process,
            path_initial_model_for_weight_conversion,
            **kwargs,
        )

    return save_pretrained


def _save_refusal(model: Any, directory: Any, selected: Any, initial: Any) -> str | None:
    if os.path.isfile(directory):
        return "save_directory is a file (PEFT's own error)"
    if selected is not None and (
        isinstance(selected, str) or any(n not in model.peft_config for n in selected)
    ):
        return "selected_adapters names an unknown adapter (PEFT's own error)"
    if initial is not None:
        return "path_initial_model_for_weight_conversion (PEFT also rewrites that directory's config)"
    if _quantized(model.get_base_model()):
        return "quantized model"
    return None


# --- from_pretrained ------------------------------------------------------------------------------------


def from_pretrained(original: classmethod[Any, Any, Any], call: str) -> Any:
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(
        cls: Any,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Any = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        decided = _from_pretrained_decision(
            model,
            model_id,
            adapter_name,
            config,
            autocast_adapter_dtype,
            ephemeral_gpu_offload,
            low_cpu_mem_usage,
            key_mapping,
            kwargs,
        )
        if isinstance(decided, str):
            fell_back(call, decided)
            return func(
                cls,
                model,
                model_id,
                adapter_name,
                is_trainable,
                config,
                autocast_adapter_dtype,
                ephemeral_gpu_offload,
                low_cpu_mem_usage,
                key_mapping,
                **kwargs,
            )
        routed(call)
        from ._patch_peft_load import from_pretrained_fast

        return from_pretrained_fast(
            cls,
            model,
            decided.config,
            decided.incoming,
            adapter_name,
            is_trainable,
            autocast_adapter_dtype,
            checked=decided,
        )

    return classmethod(from_pretrained)  # type: ignore[arg-type]


def _from_pretrained_decision(
    model: Any,
    model_id: Any,
    adapter_name: str,
    config: Any,
    autocast_adapter_dtype: bool,
    ephemeral_gpu_offload: bool,
    low_cpu_mem_usage: bool,
    key_mapping: Any,
    kwargs: dict[str, Any],
) -> str | NewLora:
    """Why PEFT's own `from_pretrained` must run, or what the check made (the LoRA config, the file's
    tensors, the plan) when fastadapter builds exactly what it would. Reads the config and the file's
    header; changes nothing."""
    from peft import LoraConfig, PeftConfig, PeftModel

    reason = _local_adapter_refusal(model_id, kwargs, key_mapping)
    if reason is not None:
        return reason
    if ephemeral_gpu_offload:
        return "ephemeral_gpu_offload"
    if getattr(model, "_checkpoint_conversion_mapping", None):
        return "the model's _checkpoint_conversion_mapping (PEFT renames the file's keys)"
    if hasattr(model, "hf_device_map"):
        return "hf_device_map (accelerate dispatch)"
    if hasattr(model, "peft_config") or isinstance(model, PeftModel):
        return "the model already holds adapters"
    if _quantized(model):
        return "quantized model"
    if config is None:
        hub = {"subfolder": None, "revision": None, "cache_dir": None, "token": None}
        peft_type = PeftConfig._get_peft_type(model_id, **hub)
        if peft_type != "LORA":
            return f"peft_type {peft_type}"
        config = LoraConfig.from_pretrained(model_id)
    elif type(config) is not LoraConfig:
        return f"config is a {type(config).__name__}"
    if config.task_type not in _TASK_TYPES_WITHOUT_EXTRA_MODULES:
        return f"task_type {config.task_type} (PEFT adds modules_to_save)"
    prefix = "lora_"
    if adapter_name in prefix:
        return "adapter name inside PEFT's key prefix (PEFT warns)"
    from ._patch_peft_load import check_new_lora

    try:
        return check_new_lora(
            model,
            model_id,
            adapter_name,
            config,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast=autocast_adapter_dtype,
        )
    except FastAdapterError as e:
        return _why(e)


# --- load_adapter ---------------------------------------------------------------------------------------


def load_adapter(original: Any, call: str) -> Any:
    @functools.wraps(original)
    def load_adapter(
        self: Any,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        reason = _load_adapter_refusal(
            self, model_id, adapter_name, torch_device, ephemeral_gpu_offload, key_mapping, kwargs
        )
        if reason is None:
            from ._patch_peft_load import load_adapter_fast

            try:
                result = load_adapter_fast(
                    self,
                    os.fspath(model_id),
                    adapter_name,
                    is_trainable,
                    autocast_adapter_dtype,
                    low_cpu_mem_usage,
                )
            except FastAdapterError as e:  # raised by the checks, before the model was touched
                reason = _why(e)
            else:
                routed(call)
                return result
        fell_back(call, reason)
        return original(
            self,
            model_id,
            adapter_name,
            is_trainable,
            torch_device,
            autocast_adapter_dtype,
            ephemeral_gpu_offload,
            low_cpu_mem_usage,
            key_mapping,
            **kwargs,
        )

    return load_adapter


def _load_adapter_refusal(
    model: Any,
    model_id: Any,
    adapter_name: str,
    torch_device: Any,
    ephemeral_gpu_offload: bool,
    key_mapping: Any,
    kwargs: dict[str, Any],
) -> str | None:
    reason = _local_adapter_refusal(model_id, kwargs, key_mapping)
    if reason is not None:
        return reason
    if adapter_name in model.peft_config:
        return "existing adapter name (PEFT keeps its config; fastadapter.load takes the file's)"
    if model.peft_type != "LORA":  # a str enum
        return f"peft_type {getattr(model.peft_type, 'value', model.peft_type)}"
    if not _cpu(torch_device):
        return "torch_device other than the CPU"
    if ephemeral_gpu_offload:
        return "ephemeral_gpu_offload"
    if getattr(model, "hf_device_map", None) is not None:
        return "hf_device_map (accelerate dispatch)"
    if _quantized(model.get_base_model()):
        return "quantized model"
    if adapter_name in "lora_":
        return "adapter name inside PEFT's key prefix (PEFT warns)"
    return None


# --- hotswap_adapter ------------------------------------------------------------------------------------


def hotswap_adapter(original: Any, call: str) -> Any:
    @functools.wraps(original)
    def hotswap_adapter(
        model: Any, model_name_or_path: str, adapter_name: str, torch_device: str | None = None, **kwargs: Any
    ) -> None:
        reason, directory = _hotswap_refusal(model, model_name_or_path, adapter_name, torch_device, kwargs)
        if reason is None:
            from .._hotswap import swap_as_peft

            try:
                swap_as_peft(model, directory, adapter_name)
            except FastAdapterError as e:  # raised by the checks, before the model was touched
                reason = _why(e)
            else:
                routed(call)
                return None
        fell_back(call, reason)
        original(model, model_name_or_path, adapter_name, torch_device, **kwargs)

    return hotswap_adapter


def _hotswap_refusal(
    model: Any, model_id: Any, adapter_name: str, torch_device: Any, kwargs: dict[str, Any]
) -> tuple[str | None, str]:
    """(why PEFT's own `hotswap_adapter` must run, or None; the adapter directory). The configs are
    checked here, as PEFT checks them (against the active adapter's config) and as fastadapter does
    (against the swapped adapter's); what depends on the layers, `swap_as_peft` checks."""
    from peft import LoraConfig, PeftConfig, PeftModel
    from peft.utils.hotswap import check_hotswap_configs_compatible

    from .._hotswap import _uncompiled, check_compatible

    if kwargs.keys() - {"subfolder"}:
        return f"keyword arguments {sorted(kwargs.keys() - {'subfolder'})}", ""
    directory = os.fspath(model_id) if isinstance(model_id, (str, os.PathLike)) else ""
    if kwargs.get("subfolder"):
        directory = os.path.join(directory, kwargs["subfolder"])
    reason = _local_adapter_refusal(directory, {}, None)
    if reason is not None:
        return reason, directory
    if not _device_exists(torch_device):
        return f"torch_device {torch_device!r} (PEFT reads the file there)", directory
    root = _uncompiled(model)
    if not isinstance(root, PeftModel):
        return f"a {type(root).__name__}, not a PeftModel (PEFT's own error)", directory
    old: Any = root.peft_config.get(adapter_name)
    if old is None:
        return "unknown adapter name (PEFT's own error)", directory
    if old.peft_type != "LORA":
        return f"peft_type {getattr(old.peft_type, 'value', old.peft_type)}", directory
    if PeftConfig._get_peft_type(directory) != "LORA":
        return "the file's adapter is not LoRA (PEFT's own error)", directory
    new = LoraConfig.from_pretrained(directory)
    try:
        check_hotswap_configs_compatible(model.active_peft_config, new)
        check_compatible(old, new, directory)
    except ValueError as e:
        return f"incompatible configs ({_why(e)})", directory
    for config in (old, new):
        if config.use_dora or config.lora_bias:
            return "DoRA or lora_bias (PEFT's hotswap_adapter cannot name their tensors)", directory
        if config.rank_pattern or config.alpha_pattern:
            return "rank_pattern / alpha_pattern (PEFT's hotswap_adapter matches them to no layer)", directory
    return None, directory


def _device_exists(torch_device: Any) -> bool:
    """None, the CPU or a CUDA device this process has: where PEFT's read of the file cannot fail (the
    weights then go where the adapter's are, the same result wherever the file was read to)."""
    import torch

    if torch_device is None:
        return True
    try:
        device = torch.device(torch_device)
    except (RuntimeError, TypeError):
        return False
    if device.type == "cpu":
        return True
    cuda = torch.cuda
    return device.type == "cuda" and cuda.is_available() and (device.index or 0) < cuda.device_count()
