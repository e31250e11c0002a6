"""Putting loaded adapter weights on a GPU with a few large copies instead of one small copy per tensor.

PEFT and safetensors move each tensor on its own (`tensor.to("cuda")`) from pageable memory: the driver
bounces every one through its own pinned buffer, synchronously, so thousands of small copies cost far more
than their bytes. Here, for each target device:

1. a layout gives every tensor an aligned offset in one byte allocation, tensors that need the same dtype
   conversion side by side;
2. the Rust core copies the tensors' bytes (views of the file's mapping) into a reusable page-locked host
   buffer, in parallel with the GIL released, one chunk at a time;
3. each chunk goes to the device with one asynchronous copy, which overlaps the packing of the next chunk;
4. every weight is a view of the device allocation; where PEFT's dtype policy needs a conversion, it runs on
   the device, one kernel per run of tensors with the same (source dtype, target dtype).

Nothing here depends on the destination being a GPU: with a CPU destination (tests, or `FASTADAPTER_STAGE`
set to include cpu) the same layout, packing and views run over plain host memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from ._core import copy_ranges

# Offsets in the device allocation: a multiple of every dtype's size (a view of a uint8 buffer must be
# aligned for its dtype) and of the 16-byte vector loads CUDA kernels use. safetensors offsets are not
# aligned at all, so tensors cannot keep the file's layout.
ALIGN = 256
# One host-to-device copy per chunk: large enough that launch costs vanish, small enough that the copy of
# one chunk overlaps the packing of the next.
CHUNK = 32 << 20
# The staging buffer never grows past this: bigger loads cycle through it. Page-locked memory is taken from
# the whole machine and pinning is slow, so it is allocated once, kept, and bounded.
MAX_STAGING = 256 << 20


def _staged_types() -> frozenset[str]:
    # FASTADAPTER_STAGE=none turns staging off (per-tensor copies, as before); "cuda,cpu" also stages
    # CPU destinations, which exercises this whole path on machines without a GPU.
    value = os.environ.get("FASTADAPTER_STAGE", "cuda").strip().lower()
    return frozenset() if value in ("", "0", "none", "off") else frozenset(value.split(","))


STAGED_DEVICE_TYPES = _staged_types()

Request = tuple[torch.Tensor, torch.device, torch.dtype]  # (source, target device, target dtype)
Range = tuple[int, int, int, int]  # (source buffer, source offset, destination offset, length), bytes


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes come from and where they go in its device's allocation."""

    index: int  # position in the request list
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    target_dtype: torch.dtype
    nbytes: int
    source: int  # index of the source buffer
    source_offset: int
    offset: int = -1  # in the device allocation; set by `plan_layout`


@dataclass(frozen=True)
class Run:
    """Consecutive placements sharing (source dtype, target dtype): converted, if at all, by one kernel."""

    start: int
    end: int
    source_dtype: torch.dtype
    target_dtype: torch.dtype
    placements: tuple[Placement, ...]


@dataclass(frozen=True)
class DeviceLayout:
    device: torch.device
    runs: tuple[Run, ...]
    nbytes: int  # size of the device allocation

    def placements(self) -> list[Placement]:
        return [p for run in self.runs for p in run.placements]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_layout(device: torch.device, items: Sequence[Placement]) -> DeviceLayout:
    """Offsets for `items` (their `offset` is ignored) in one allocation on `device`: runs by dtype
    conversion, every tensor and run on an ALIGN boundary, in source order within a run (sequential reads
    of the file)."""

    def conversion(p: Placement) -> tuple[str, str]:
        return str(p.source_dtype), str(p.target_dtype)

    ordered = sorted(items, key=lambda p: (conversion(p), p.source, p.source_offset))
    runs: list[Run] = []
    offset = 0
    i = 0
    while i < len(ordered):
        key = conversion(ordered[i])
        start = offset
        placed: list[Placement] = []
        while i < len(ordered) and conversion(ordered[i]) == key:
            p = ordered[i]
            placed.append(replace(p, offset=offset))
            offset = _align(offset + p.nbytes)
            i += 1
        first = placed[0]
        runs.append(Run(start, offset, first.source_dtype, first.target_dtype, tuple(placed)))
    return DeviceLayout(device, tuple(runs), offset)


def chunk_ranges(layout: DeviceLayout, chunk: int) -> list[list[Range]]:
    """The copies that fill each `chunk`-byte piece of the allocation, destination offsets relative to the
    piece: a tensor that straddles a boundary is split between two pieces."""
    pieces: list[list[Range]] = [[] for _ in range(-(-layout.nbytes // chunk))]
    for p in layout.placements():
        done = 0
        while done < p.nbytes:
            at = p.offset + done
            k, within = divmod(at, chunk)
            n = min(p.nbytes - done, chunk - within)
            pieces[k].append((p.source, p.source_offset + done, within, n))
            done += n
    return pieces


class Sources:
    """The source tensors' memory as byte buffers for `copy_ranges`: one buffer per storage, so every
    tensor of a mapped file is a range of the same buffer (the mapping itself, never a copy)."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self._by_storage: dict[tuple[int, int], int] = {}
        self._kept: list[torch.Tensor] = []  # contiguous copies made here must outlive the packing

    def locate(self, tensor: torch.Tensor) -> tuple[int, int]:
        """(buffer index, byte offset) of a CPU tensor's bytes."""
        t = tensor.detach()
        if not t.is_contiguous():
            t = t.contiguous()  # the one copy a strided source needs (only .bin files can hold those)
            self._kept.append(t)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        index = self._by_storage.get(key)
        if index is None:
            index = self._by_storage[key] = len(self.buffers)
            self.buffers.append(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
        return index, t.data_ptr() - storage.data_ptr()


class StagingBuffer:
    """The process's one host staging buffer, page-locked when CUDA is there. Loads take it in turn."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tensor: torch.Tensor | None = None
        self.buffer: Any = None  # numpy view of `tensor`, the destination `copy_ranges` writes
        self.pinned = False
        self._pin_failed = False

    def reserve(self, nbytes: int, pin: bool) -> torch.Tensor:
        """At least min(nbytes, MAX_STAGING) bytes (a power of two: torch's pinned allocator rounds to one
        anyway), reusing the current buffer when it is large enough and pinned if asked. Caller holds lock."""
        size = min(1 << max(nbytes - 1, 1).bit_length(), MAX_STAGING)
        pin = pin and not self._pin_failed
        current = self.tensor
        if current is not None and current.numel() >= size and (self.pinned or not pin):
            return current
        self.tensor = self.buffer = None
        self.pinned = False
        tensor = None
        if pin:
            try:
                tensor = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError:
                # Page-locked memory is limited (ulimit -l, containers): pageable staging still gives
                # one large copy per chunk instead of one per tensor.
                self._pin_failed = True
        if tensor is None:
            tensor = torch.empty(size, dtype=torch.uint8)
        self.tensor, self.buffer = tensor, tensor.numpy()
        return tensor

    def release(self) -> None:
        """Give the memory back (the next staged load allocates, and pins, again)."""
        with self.lock:
            self.tensor = self.buffer = None
            self.pinned = False


STAGING = StagingBuffer()


def _target_device(device: torch.device) -> torch.device:
    if str(device) == "cuda":  # no index: the current device, as `Tensor.to("cuda")` reads it
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _is_staged(source: torch.Tensor, device: torch.device) -> bool:
    return device.type in STAGED_DEVICE_TYPES and source.device.type == "cpu"


def to_devices(requests: Sequence[Request]) -> list[torch.Tensor]:
    """Each source tensor on its target device with its target dtype, in request order.

    Targets whose device type is staged (CUDA by default) are packed and copied per device as the module
    docstring says; the result tensors are views of one allocation per device (per dtype run when
    converted) and are ready on return. Others take the direct route: no copy when device and dtype
    already match (a view of the mapping stays one), else `Tensor.to`.
    """
    out: list[torch.Tensor | None] = [None] * len(requests)
    groups: dict[torch.device, list[int]] = {}
    for i, (source, device, dtype) in enumerate(requests):
        if _is_staged(source, device):
            groups.setdefault(_target_device(device), []).append(i)
        elif source.device == device and source.dtype == dtype:
            out[i] = source
        else:
            out[i] = source.to(device=device, dtype=dtype)
    if groups:
        sources = Sources()
        layouts = []
        for device, indices in groups.items():
            items = []
            for i in indices:
                source, _, dtype = requests[i]
                buffer, offset = sources.locate(source)
                nbytes = source.numel() * source.element_size()
                items.append(Placement(i, tuple(source.shape), source.dtype, dtype, nbytes, buffer, offset))
            layouts.append(plan_layout(device, items))
        for i, tensor in stage(layouts, sources).items():
            out[i] = tensor
    return cast(list[torch.Tensor], out)  # every slot was filled by one branch or by `stage`


def stage(layouts: Sequence[DeviceLayout], sources: Sources) -> dict[int, torch.Tensor]:
    """Allocate, fill and convert each layout's device memory; {request index: tensor}."""
    cuda = [layout.device for layout in layouts if layout.device.type == "cuda"]
    total = sum(layout.nbytes for layout in layouts)
    out: dict[int, torch.Tensor] = {}
    with STAGING.lock:
        host = STAGING.reserve(total, pin=bool(cuda))
        chunk = min(CHUNK, host.numel())
        ring = _Ring(host.numel() // chunk)
        try:
            for layout in layouts:
                memory = _fill(layout, sources, host, STAGING.buffer, chunk, ring)
                out.update(views(layout, memory))
            # Wait for every copy and conversion: the weights can be used from any stream, as after
            # PEFT's synchronous copies.
            for device in dict.fromkeys(cuda):
                torch.cuda.current_stream(device).synchronize()
        finally:
            # Also after a failure (e.g. out of memory on the second device): copies still reading the
            # host buffer must finish before the next load may refill it.
            ring.drain()
    return out


class _Ring:
    """Cycles loads through the staging buffer's chunk-sized slots; a slot is refilled only once the
    device copy that read it has finished."""

    def __init__(self, slots: int) -> None:
        self.next = 0
        self.pending: list[torch.cuda.Event | None] = [None] * slots

    def take(self) -> int:
        slot, self.next = self.next, (self.next + 1) % len(self.pending)
        event = self.pending[slot]
        if event is not None:
            event.synchronize()
            self.pending[slot] = None
        return slot

    def drain(self) -> None:
        for event in self.pending:
            if event is not None:
                event.synchronize()
        self.pending = [None] * len(self.pending)


def _fill(
    layout: DeviceLayout, sources: Sources, host: torch.Tensor, host_buffer: Any, chunk: int, ring: _Ring
) -> torch.Tensor:
    """The layout's device allocation, filled chunk by chunk through the host buffer."""
    memory = torch.empty(layout.nbytes, dtype=torch.uint8, device=layout.device)
    is_cuda = layout.device.type == "cuda"
    for k, ranges in enumerate(chunk_ranges(layout, chunk)):
        start = k * chunk
        n = min(chunk, layout.nbytes - start)
        slot = ring.take()
        at = slot * chunk
        copy_ranges(host_buffer, sources.buffers, [(s, so, at + d, m) for s, so, d, m in ranges])
        if is_cuda:
            with torch.cuda.device(layout.device):
                # From page-locked memory this only queues the DMA: the next chunk is packed meanwhile.
                memory[start : start + n].copy_(host[at : at + n], non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
                ring.pending[slot] = event
        else:
            memory[start : start + n].copy_(host[at : at + n])
    return memory


def views(layout: DeviceLayout, memory: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every placement as a tensor over `memory` (the layout's allocation), converted where asked."""
    out: dict[int, torch.Tensor] = {}
    for run in layout.runs:
        raw = memory[run.start : run.end].view(run.source_dtype)
        # One conversion for the whole run; its padding converts too (a few bytes of garbage, never read).
        converted = raw if run.source_dtype == run.target_dtype else raw.to(run.target_dtype)
        size = run.source_dtype.itemsize
        for p in run.placements:
            first = (p.offset - run.start) // size
            out[p.index] = converted[first : first + p.nbytes // size].view(p.shape)
    return out
