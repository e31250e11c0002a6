"""Snapshots: the tensors of one or more safetensors files copied into a reusable host buffer, laid out
exactly as the files' bytes (header, then data at the planned offsets), so that a background writer
can write each file as one contiguous range while the caller goes on changing the tensors.

The copy is the only work done while the caller waits. CPU tensors are copied by the Rust core on
every core with the GIL released; CUDA tensors are copied asynchronously on a side stream into a
pinned buffer (pinned memory is what makes device-to-host copies both fast and asynchronous) with one
synchronisation per device at the end, not one per tensor. Buffers are allocated once and reused:
pinning and first-touch page faults cost far more than the copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from typing_extensions import Buffer

from . import _core
from ._dtypes import TORCH_TO_SAFETENSORS
from .errors import TensorError

# Files in a snapshot start at multiples of this, so every copy starts cache-line aligned.
_FILE_ALIGN = 4096
# Buffers grow to the next multiple of this, so slowly growing checkpoints do not reallocate each time.
_GROW_ALIGN = 16 << 20


@dataclass(frozen=True)
class FileImage:
    """One file of a snapshot: its bytes are `buffer[start:end]`."""

    name: str
    start: int
    end: int


class SnapshotBuffer:
    """A host buffer reused across snapshots; pinned once a snapshot has CUDA tensors in it."""

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    @property
    def pinned(self) -> bool:
        return self._storage is not None and self._storage.is_pinned()

    @property
    def capacity(self) -> int:
        return 0 if self._storage is None else self._storage.numel()

    def reserve(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A uint8 view of the first `nbytes` bytes, reallocating only if too small or not pinned
        when pinning is needed (a pinned buffer also serves CPU-only snapshots)."""
        if self._storage is None or self.capacity < nbytes or (pinned and not self.pinned):
            size = max(_GROW_ALIGN, -(-nbytes // _GROW_ALIGN) * _GROW_ALIGN)
            self._storage = None  # free the old one before allocating the new one
            self._storage = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        return self._storage[:nbytes]


def take(
    buffer: SnapshotBuffer,
    files: Sequence[tuple[str, Mapping[str, torch.Tensor], Mapping[str, str] | None]],
) -> tuple[torch.Tensor, list[FileImage]]:
    """Copy `files` — (name, tensors, safetensors metadata) — into `buffer` as complete safetensors file
    images, byte-identical to what `safetensors.torch.save_file` writes for them. Returns the buffer
    view (valid until the next `take` on this buffer) and where each file lies in it."""
    plans = []
    offset = 0
    cuda = False
    for name, tensors, metadata in files:
        records = []
        for key, t in tensors.items():
            dtype = TORCH_TO_SAFETENSORS.get(t.dtype)
            if dtype is None:
                raise TensorError(f"tensor `{key}`: dtype {t.dtype} cannot be stored in safetensors")
            cuda = cuda or t.device.type == "cuda"
            records.append((key, dtype, list(t.shape), t.numel() * t.element_size()))
        header, offsets, total = _core.plan_header(records, dict(metadata) if metadata else None)
        plans.append((name, tensors, header, offsets, offset, total))
        offset += -(-total // _FILE_ALIGN) * _FILE_ALIGN
    view = buffer.reserve(offset, pinned=cuda)
    images: list[FileImage] = []
    sources: list[Buffer] = []
    ranges: list[tuple[int, int, int, int]] = []
    device: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, tensors, header, offsets, base, total in plans:
        sources.append(header)
        ranges.append((len(sources) - 1, 0, base, len(header)))
        for t, at in zip(tensors.values(), offsets, strict=True):
            nbytes = t.numel() * t.element_size()
            if nbytes == 0:
                continue
            start = base + at
            src = t.detach()
            if src.device.type == "cpu" and src.is_contiguous():
                # numpy has no bfloat16/float8: a uint8 view of the same memory carries every dtype.
                sources.append(src.reshape(-1).view(torch.uint8).numpy().data)
                ranges.append((len(sources) - 1, 0, start, nbytes))
            else:
                # CUDA, or strided CPU tensors: torch copies them straight into place, no temporary.
                dst = view[start : start + nbytes].view(src.dtype).view(src.shape)
                device.append((dst, src))
        images.append(FileImage(name, base, base + total))
    copy_device(device)
    _core.copy_ranges(view.numpy().data, sources, ranges)
    return view, images


def copy_device(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy (dst, src) pairs; CUDA sources go on one side stream per device, waited on once each."""
    streams: dict[torch.device, torch.cuda.Stream] = {}
    for dst, src in pairs:
        if src.device.type != "cuda":
            dst.copy_(src)
            continue
        stream = streams.get(src.device)
        if stream is None:
            stream = _side_stream(src.device)
            # The side stream must see every write the training step queued on the current stream.
            stream.wait_stream(torch.cuda.current_stream(src.device))
            streams[src.device] = stream
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
    for stream in streams.values():
        stream.synchronize()


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(dev)
    if stream is None:
        stream = _SIDE_STREAMS[dev] = torch.cuda.Stream(device=dev)  # type: ignore[no-untyped-call]
    return stream
