"""Adapters of sharded models (FSDP2's `fully_shard`, tensor parallel): LoRA weights that are DTensors.

A load into such a model copies, on every rank, only that rank's slice of each file tensor (a view of the
file's mapping) into its local shard: no rank materialises a full tensor, and no collective is needed,
since every rank reads the same file.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .errors import TensorError

if TYPE_CHECKING:
    import torch
    from torch import nn


def _dtensor_type() -> type[Any] | None:
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor  # never imported: no DTensor can exist


def is_sharded(t: object) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def sharded_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter of `model` that is a DTensor, or None."""
    dtensor = _dtensor_type()
    if dtensor is None or not sys.modules["torch.distributed"].is_initialized():
        return None  # a DTensor lives on a device mesh, which needs a process group
    return next((n for n, p in model.named_parameters() if isinstance(p, dtensor)), None)


def to_sharded_state(model: nn.Module) -> None:
    """FSDP2 modules back to their sharded parameters (what their `state_dict` hook does): after a forward
    the root keeps unsharded copies registered, which the next all-gather would overwrite from the shards."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    if module_type is None or not sys.modules["torch.distributed"].is_initialized():
        return  # fully_shard needs a process group: without one no module is sharded
    for module in model.modules():
        if isinstance(module, module_type):
            module.reshard()


def check_local_slice(key: str, target: torch.Tensor) -> None:
    """Refuse, before anything is copied, a DTensor whose local tensor is not the block its placements
    describe (the copy could not be done by slicing the file's tensor)."""
    if is_sharded(target):
        _local_block(key, target)


def copy_into(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    """`target.copy_(value)` where `value` is the full tensor; a DTensor `target` receives only its local
    block, sliced (a view) from `value`."""
    if not is_sharded(target):
        target.copy_(value)
        return
    local, block = _local_block(key, target)
    if local.numel():
        local.copy_(value[block])


def _local_block(key: str, target: Any) -> tuple[torch.Tensor, tuple[slice, ...]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = target.to_local()
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    if tuple(local.shape) != tuple(shape):
        raise TensorError(
            f"tensor `{key}`: this rank's shard has shape {list(local.shape)}, but its placements "
            f"{list(target.placements)} give {list(shape)}: cannot load a slice of the file into it"
        )
    return local, tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def full_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with every DTensor replaced by the full tensor: `full_tensor()`, a collective, so every
    rank calls it, with the same keys in the same order. (One `all_gather` of all row shards packed in a
    padded buffer was slower on 2 ranks, README: packing and reassembling copy the adapter twice more.)"""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in weights.values()):
        return weights
    return {k: t.full_tensor() if isinstance(t, dtensor) else t for k, t in weights.items()}
