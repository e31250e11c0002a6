"""`fastadapter.load` and adapter management, on every kind of model that holds adapters.

A load runs in stages, each in one place:
1. read the files: the config (`host.new_config`), the weights (`_read`: one private mapping, keys renamed
   by the Rust core from the header alone);
2. ask who owns the model's adapters (`hosts.host_for`): PEFT, transformers' integration, or fastadapter;
3. plan the targets (`_inject.plan`: PEFT's matching rules) and check every tensor against the plan,
   placing each on its base layer's device and dtype (`_assign`);
4. build the layers and register the adapter with the host (`host.add_loaded`).

Everything is checked before the model is touched, so a failed load leaves the model exactly as it was.
A tensor is copied only when it must change device or dtype (PEFT's policy: the base layer's device,
fp16/bf16 adapters upcast to fp32); otherwise the LoRA weight is a view of the file's mapping.
"""

from __future__ import annotations

import functools
import gc
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._config import config_from_object
from ._inject import AUTOCAST_ADAPTER_DTYPE
from ._read import read_file_tensors, read_weights
from .errors import AdapterExistsError
from .hosts import AdapterHost, Layers, host_for
from .hosts.base import restore_trainability, trainability
from .names import DEFAULT_ADAPTER

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["active_adapters", "delete_adapter", "inject", "load", "merge_and_unload", "set_adapter", "unload"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _gc_paused(fn: _F) -> _F:
    """Run `fn` with Python's cyclic garbage collector paused, and hand what it built to the collector's
    oldest generation (README, "What makes it fast").

    Building thousands of modules (each with a dozen hook containers) triggers collections that walk the
    whole model, at random. Paused, the new containers would still sit in the youngest generation, for
    the first allocation after the load to scan; they are the model's layers, alive as long as it, so a
    young scan could only promote them: `gc.freeze()` + `gc.unfreeze()` promotes them directly (frozen
    objects return to the oldest generation). The young generations are collected first, so the caller's
    young garbage is not promoted with ours; a process with frozen objects of its own (a pre-fork
    server) is left alone, as unfreeze would release them. Reference counting frees as usual."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        promote = was_enabled and gc.get_freeze_count() == 0
        if promote:
            gc.collect(1)
        gc.disable()
        try:
            result = fn(*args, **kwargs)
            if promote:
                gc.freeze()
                gc.unfreeze()
            return result
        finally:
            if was_enabled:
                gc.enable()

    return cast(_F, wrapper)


@_gc_paused
def load(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    is_trainable: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    layers: Layers = "auto",
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Load the LoRA adapter saved in `adapter_dir` (by PEFT, transformers or fastadapter) into `model`,
    activate it, and return the model.

    - a `peft.PeftModel`: the adapter is added with PEFT's own layers, as `load_adapter` would;
    - a transformers `PreTrainedModel` (peft installed): as `model.load_adapter(adapter_dir, adapter_name)`
      would, through transformers' integration, so its adapter API and `save_pretrained` see it;
    - any other model (or `layers="fastadapter"`): fastadapter's own LoRA layers, no peft needed.

    If the model already has an adapter called `adapter_name`, the file's weights replace its weights in
    place (PEFT's meaning of loading into an existing name): same parameters, same storage; the adapter
    keeps the file's config. Each new LoRA weight goes to its base layer's device (or `device`) with
    PEFT's dtype policy (the base layer's dtype, fp16/bf16 upcast to fp32; or `dtype`).
    `is_trainable=False` freezes the adapter, as PEFT. `autocast_adapter_dtype=False` keeps new fp16/bf16
    weights in their base layer's dtype (PEFT's option of that name; True upcasts them to fp32).
    """
    token = AUTOCAST_ADAPTER_DTYPE.set(autocast_adapter_dtype)
    try:
        return _load(model, os.fspath(adapter_dir), adapter_name, is_trainable, device, dtype, layers)
    finally:
        AUTOCAST_ADAPTER_DTYPE.reset(token)


def _load(
    model: nn.Module,
    adapter_dir: str,
    adapter_name: str,
    is_trainable: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    layers: Layers,
) -> nn.Module:
    host = host_for(model, layers)
    config = host.new_config(adapter_dir, is_trainable=is_trainable)
    if adapter_name in host.configs():
        file = read_file_tensors(adapter_dir)
        host.load_into(adapter_name, config, file)
        file.done()
        return model
    _refuse_new_adapter_if_sharded(model, adapter_name)
    incoming = read_weights(adapter_dir, adapter_name)
    # A cold file is read from disk beside the building of the layers, so a read that fails is only
    # known once the adapter is in: what the load changes besides adding it (activation, freezing,
    # train/eval flags) is kept first, while the disk reads (that cost is hidden there, and a warm
    # load does not pay it).
    before = (host.active_adapters(), trainability(model)) if incoming.cold else None
    host.add_loaded(adapter_name, config, incoming, is_trainable=is_trainable, device=device, dtype=dtype)
    try:
        incoming.ready()
    except OSError:
        with warnings.catch_warnings():  # PEFT's "adapter was active, now deleted": an undo, not news
            warnings.simplefilter("ignore")
            host.delete_adapter(adapter_name)  # its weights are views of pages that cannot be read
        if before is not None:
            active, flags = before
            if active:
                host.set_adapter(active[0] if len(active) == 1 else active)
            restore_trainability(flags)
        raise
    return model


def _refuse_new_adapter_if_sharded(model: nn.Module, adapter_name: str) -> None:
    """A sharded model (FSDP2's fully_shard, tensor parallel) takes loads into adapters it already has,
    not new ones: fully_shard has grouped its parameters already, so new LoRA weights would be neither
    sharded nor have their gradients reduced across ranks."""
    from ._sharded import sharded_parameter
    from .errors import UnsupportedAdapterError

    sharded = sharded_parameter(model)
    if sharded is not None:
        raise UnsupportedAdapterError(
            f"cannot add a new adapter {adapter_name!r} to a sharded model (parameter `{sharded}` is a "
            "DTensor: FSDP2 or tensor parallel): add the adapter before sharding (get_peft_model, "
            "add_adapter or fastadapter.inject, then fully_shard), then fastadapter.load into its name; "
            "or load before sharding"
        )


@_gc_paused
def inject(
    model: nn.Module,
    config: Any,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add a new LoRA adapter described by `config` (a peft `LoraConfig` or a dict of its fields) with
    fastadapter's own layers and PEFT's initialisation (`init_lora_weights` True: kaiming-uniform A and
    zero B; "gaussian"; False: random A and B), trainable unless `config.inference_mode`; activate it and
    return the model. (For PEFT's layers, use `get_peft_model` or transformers' `add_adapter`.)"""
    from .hosts.native import NativeHost

    host = host_for(model, "fastadapter")
    assert isinstance(host, NativeHost)
    if adapter_name in host.configs():
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}")
    host.inject(config_from_object(config), adapter_name, device, dtype)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (PEFT: `model.active_adapters`)."""
    return host_for(model).active_adapters()


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make `name` (or several names: their outputs add up, as in PEFT) the active adapter(s)."""
    _with_adapters(model).set_adapter(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`, as the host's own `delete_adapter` does."""
    _with_adapters(model).delete_adapter(name)


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Merge the active adapters (or `adapter_names`) into the base weights and remove every LoRA layer, as
    PEFT's `merge_and_unload`; returns the base model (the same object for a plain model)."""
    return _with_adapters(model).merge_and_unload(adapter_names)


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer without merging; returns the base model."""
    return _with_adapters(model).unload()


def _with_adapters(model: nn.Module) -> AdapterHost:
    from .errors import AdapterNotFoundError

    host = host_for(model)
    if not host.configs():
        raise AdapterNotFoundError(f"{type(model).__name__} has no adapter")
    return host
