"""Handing torch tensors to the Rust writer and back, without copying bytes that need not be copied."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ._core import SafetensorsFile
from ._dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS
from .errors import TensorError

# (name, safetensors dtype, shape, C-contiguous byte buffer): what _core.write_safetensors takes.
WriteRecord = tuple[str, str, list[int], memoryview]


def write_record(name: str, tensor: torch.Tensor) -> WriteRecord:
    """A zero-copy byte view of `tensor` for the writer.

    CPU tensors that are already contiguous are not copied. Others are copied once, the same copy PEFT
    and safetensors make (`.contiguous()`, `.to("cpu")`).
    """
    dtype = TORCH_TO_SAFETENSORS.get(tensor.dtype)
    if dtype is None:
        raise TensorError(f"tensor `{name}`: dtype {tensor.dtype} cannot be stored in safetensors")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    # numpy has no bfloat16/float8: a uint8 view of the same memory carries every dtype.
    return (name, dtype, list(t.shape), t.reshape(-1).view(torch.uint8).numpy().data)


def write_records(state_dict: Mapping[str, torch.Tensor]) -> list[WriteRecord]:
    return [write_record(name, t) for name, t in state_dict.items()]


def mapped_tensors(
    file: SafetensorsFile, records: Iterable[tuple[str, str, list[int], int, int]]
) -> dict[str, torch.Tensor]:
    """Tensors that are views of `file`'s private mapping: no bytes are read until they are touched,
    and writing to them never reaches the file."""
    whole = torch.frombuffer(file, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, start, end in records:
        torch_dtype = SAFETENSORS_TO_TORCH.get(dtype)
        if torch_dtype is None:
            raise TensorError(f"{file.path}: tensor `{name}` has dtype {dtype}, which torch cannot represent")
        out[name] = whole[start:end].view(torch_dtype).reshape(shape)
    return out


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, as zero-copy views of one mapping."""
    file = SafetensorsFile(path)
    return mapped_tensors(file, file.entries())
