"""The patched transformers functions: `PreTrainedModel.load_adapter` (from `PeftAdapterMixin`) and the
adapter-only branch of `PreTrainedModel.save_pretrained`.

As for PEFT's, each call is decided before anything changes; whole-model saves, Hub ids, hotswaps,
state dicts passed in and the other options fastadapter does not reproduce run transformers' own code.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from ..errors import FastAdapterError
from ..names import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN
from ._patch_report import fell_back, routed

_DEFAULT_SHARD_SIZE = "50GB"
_SHARD_FILE = re.compile(r"adapter_model-\d{5}-of-\d{5}\.safetensors")


def _why(e: BaseException) -> str:
    from ._patch_peft import _why as why

    return why(e)


# --- load_adapter ---------------------------------------------------------------------------------------


def load_adapter(original: Any, call: str) -> Any:
    @functools.wraps(original)
    def load_adapter(
        self: Any,
        peft_model_id: str | None = None,
        adapter_name: str | None = None,
        peft_config: dict[str, Any] | None = None,
        adapter_state_dict: dict[str, Any] | None = None,
        low_cpu_mem_usage: bool = False,
        is_trainable: bool = False,
        hotswap: bool | str = "auto",
        local_files_only: bool = False,
        adapter_kwargs: dict[str, Any] | None = None,
        load_config: Any = None,
        **kwargs: Any,
    ) -> Any:
        args = (
            peft_model_id,
            adapter_name,
            peft_config,
            adapter_state_dict,
            low_cpu_mem_usage,
            is_trainable,
            hotswap,
            local_files_only,
            adapter_kwargs,
            load_config,
        )
        name = adapter_name if adapter_name is not None else "default"
        reason = _load_refusal(self, peft_model_id, name, peft_config, adapter_state_dict, hotswap, kwargs)
        if reason is None and (adapter_kwargs or load_config is not None):
            reason = "adapter_kwargs / load_config"
        if reason is None:
            try:
                result = _load_fast(self, str(peft_model_id), name, is_trainable)
            except FastAdapterError as e:  # fastadapter's checks run before the model is touched
                reason = _why(e)
            else:
                routed(call)
                return result
        fell_back(call, reason)
        return original(self, *args, **kwargs)

    return load_adapter


def _load_refusal(
    model: Any,
    model_id: Any,
    name: str,
    peft_config: Any,
    adapter_state_dict: Any,
    hotswap: Any,
    kwargs: dict[str, Any],
) -> str | None:
    loaded = getattr(model, "_hf_peft_config_loaded", False)
    if peft_config is not None or adapter_state_dict is not None:
        return "peft_config / adapter_state_dict passed in"
    if kwargs:
        return f"keyword arguments {sorted(kwargs)}"
    if hotswap is True or (hotswap == "auto" and getattr(model, "_hotswap_enabled", False)):
        return "hotswap"
    if loaded and name in model.peft_config:
        return "existing adapter name (transformers' own error)"
    if model_id is None or not os.path.isdir(model_id):
        return "not a local directory (Hub id)"
    if not any(os.path.isfile(os.path.join(model_id, n)) for n in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)):
        return "no adapter weights file in the directory"
    if getattr(model, "hf_device_map", None) is not None:
        return "hf_device_map"
    if (getattr(model, "_tp_size", None) or 1) > 1:
        return "tensor-parallel model"
    return None


def _load_fast(model: Any, model_id: str, name: str, is_trainable: bool) -> Any:
    from transformers.integrations import peft as integration
    from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

    from ..adapters import load

    # transformers' loader leaves LoRA weights in their base layer's dtype (no fp32 upcast).
    load(model, model_id, name, is_trainable=is_trainable, layers="peft", autocast_adapter_dtype=False)
    # transformers' result: its "expected" keys are the parameters whose name contains the adapter name or
    # "lora" (substrings, as it matches them); all but the adapter's own, loaded from the file, are "missing".
    markers = (name, "lora")
    expected = [n for n, _ in model.named_parameters() if any(m in n for m in markers)]
    loaded = {n for n in expected if ".lora_" in n and (f".{name}." in n or n.endswith(f".{name}"))}
    info = LoadStateDictInfo(
        missing_keys={n for n in expected if n not in loaded},
        unexpected_keys=set(),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    log_state_dict_report(
        model=model,
        pretrained_model_name_or_path=model_id,
        ignore_mismatched_sizes=False,
        loading_info=info,
        logger=integration.logger,  # type: ignore[arg-type]  # transformers' logger is a logging.Logger
    )
    return info


# --- save_pretrained ------------------------------------------------------------------------------------


def save_pretrained(original: Any, call: str) -> Any:
    @functools.wraps(original)
    def save_pretrained(
        self: Any,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict[str, Any] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = _DEFAULT_SHARD_SIZE,
        variant: str | None = None,
        token: str | bool | None = None,
        save_peft_format: bool = True,
        save_original_format: bool = True,
        distributed_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        args = (
            save_directory,
            is_main_process,
            state_dict,
            push_to_hub,
            max_shard_size,
            variant,
            token,
            save_peft_format,
            save_original_format,
            distributed_checkpoint,
        )
        reason = _save_refusal(
            self,
            save_directory,
            is_main_process,
            state_dict,
            push_to_hub,
            max_shard_size,
            token,
            save_peft_format,
            distributed_checkpoint,
            kwargs,
        )
        if reason is None:
            try:
                _save_fast(self, os.fspath(save_directory))
            except FastAdapterError as e:  # nothing is published unless every file was written
                reason = _why(e)
            else:
                routed(call)
                return None
        fell_back(call, reason)
        return original(self, *args, **kwargs)  # type: ignore[no-any-return]

    return save_pretrained


def _save_refusal(
    model: Any,
    directory: Any,
    is_main_process: bool,
    state_dict: Any,
    push_to_hub: bool,
    max_shard_size: Any,
    token: Any,
    save_peft_format: bool,
    distributed_checkpoint: bool,
    kwargs: dict[str, Any],
) -> str | None:
    import torch

    if not getattr(model, "_hf_peft_config_loaded", False):
        return "no adapters: a whole-model save"
    if state_dict is not None or push_to_hub or token is not None or kwargs or distributed_checkpoint:
        return "state_dict / push_to_hub / token / distributed_checkpoint / keyword arguments"
    if not is_main_process or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return "not the only process"
    if max_shard_size != _DEFAULT_SHARD_SIZE or not save_peft_format:
        return "max_shard_size / save_peft_format"
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "_tp_size", None) is not None:
        return "quantized or tensor-parallel model"
    if getattr(model, "hf_device_map", None) is not None or model._keys_to_ignore_on_save:
        return "hf_device_map / _keys_to_ignore_on_save"
    if model.is_remote_code():
        return "remote code"
    if os.path.isfile(directory):
        return "save_directory is a file (transformers logs an error)"
    if len(model.active_adapters()) != 1:
        return "several active adapters (transformers' own error)"
    if os.path.isdir(directory) and any(_SHARD_FILE.fullmatch(f) for f in os.listdir(directory)):
        return "old adapter shards to clean up"
    return None


def _save_fast(model: Any, directory: str) -> None:
    from ..save import save

    os.makedirs(directory, exist_ok=True)
    # What transformers' save_pretrained sets on the config of every model it saves, adapters included.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__.removeprefix("FSDP")]
    save(model, directory)
