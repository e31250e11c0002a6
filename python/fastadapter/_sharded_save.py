"""`fastadapter.save` of an adapter whose weights are DTensors (FSDP2, tensor parallel), called on every
rank: each rank writes its own slices of `adapter_model.safetensors` straight to their offsets, all ranks
at once, instead of every rank gathering the adapter for one to write it.

Every rank takes part in the same exchanges (`all_gather_object`), whatever fails where:
1. Each rank plans every weights file by itself: the header the unsharded save writes (the Rust layout)
   and the block of each tensor it holds. Each main rank stages the file under a hidden temp name, sized,
   its header written. Exchanged: who is main, their temp names, whether every placement is one this
   path writes, a digest of each header, and any error.
2. The lowest main rank coordinates: it stages the small files (adapter_config.json, the model card);
   every other rank checks that it sees the coordinator's temp files; every rank writes its blocks
   (`_core.write_chunks`, GIL released, fsync'ed by the writer when asked). Exchanged: done, not shared,
   or the error.
3. All done: the coordinator publishes every file together (`FileSet`: renames, fsync when asked).
   Exchanged: whether the publish succeeded, so that a failed rename or fsync raises on every rank. An
   error anywhere: every rank raises (the failing one its own error, the others `RankFailedError`), the
   temp files are removed and the previous files stay as they were.

Storage the ranks do not share (a rank cannot see the temp file), or a placement this path does not write
(`Partial`, strided shards, a local tensor that is not its block): every rank gathers the adapter
(`full_tensor()`) and every main rank writes it, as before. `is_main_process`: only a main process
publishes. When several ranks pass True, on storage they share the lowest of them publishes (the files
would be the same), and on storage they do not share each writes its own copy (transformers'
`save_on_each_node`); when no rank does, nothing is written and nothing is gathered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import _core
from ._dtypes import TORCH_TO_SAFETENSORS
from ._fileset import FileSet, hidden_temp_path, remove_stale_temps, require_shared
from ._sharded import full_tensors, is_sharded
from .errors import RankFailedError, SharedStorageError, TensorError
from .save import PlannedFile, stage_weights

__all__ = ["save_sharded"]

# What `stage_weights` writes: safetensors.torch.save_file(..., metadata={"format": "pt"}), as PEFT.
_METADATA = {"format": "pt"}
_REMEDY = "every rank gathers the adapter and the main process writes it instead"


@dataclasses.dataclass(frozen=True)
class _Block:
    """The part of one tensor this rank writes: `tensor` (its local data) at `offsets` in the whole."""

    name: str
    tensor: torch.Tensor
    offsets: list[int]
    sizes: list[int]


@dataclasses.dataclass
class _Weights:
    """One weights file as this rank planned it."""

    target: str
    weights: dict[str, torch.Tensor]
    header: bytes
    length: int
    offsets: dict[str, int]
    shapes: dict[str, list[int]]
    blocks: list[_Block]  # this rank's blocks of its DTensors
    whole: list[_Block]  # tensors that are not DTensors: the coordinator writes them
    writable: bool  # every DTensor's placements are ones this path writes


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What each rank tells the others before any tensor byte is written."""

    main: bool = False
    writable: bool = False
    digests: tuple[bytes, ...] = ()
    temps: tuple[str, ...] = ()
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What each rank tells the others once its blocks are written."""

    unshared: bool = False
    error: str | None = None


class _NotShared(Exception):
    """Some rank cannot see the coordinator's files: the save falls back to the gather."""


def save_sharded(planned: Iterator[PlannedFile], save_directory: str, is_main: bool, fsync: bool) -> None:
    """Run `planned` (from `adapter_files(gather=False)`) on every rank of the default process group."""
    rank = dist.get_rank()
    entries: list[_Weights | tuple[str, bytes]] = []
    staged: list[Any] = []  # a main rank's temp files (`_core.PendingFile`)
    own: Exception | None = None
    try:
        try:
            for relative, payload in planned:
                target = os.path.join(save_directory, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                entries.append((target, payload) if isinstance(payload, bytes) else _plan(target, payload))
            weights = [e for e in entries if isinstance(e, _Weights)]
            writable = all(w.writable for w in weights)
            if is_main and writable:
                staged = [_stage(w, fsync) for w in weights]
            mine = _Plan(
                main=is_main,
                writable=writable,
                digests=tuple(hashlib.blake2b(w.header, digest_size=16).digest() for w in weights),
                temps=tuple(os.fspath(p.temp_path) for p in staged),
            )
        except Exception as e:
            own, mine = e, _Plan(error=_describe(e))
        plans = _exchange(mine)
        _raise_if_failed(plans, own, save_directory)
        _check_same_adapter(plans, save_directory)
        mains = [r for r, p in enumerate(plans) if p.main]
        if not mains:
            return
        if not all(p.writable for p in plans):
            _save_gathered(entries, is_main, fsync)
            return
        coordinator = mains[0]
        try:
            _write_in_place(
                entries, staged, plans[coordinator].temps, rank == coordinator, fsync, save_directory
            )
        except _NotShared:
            _save_gathered(entries, is_main, fsync)
    finally:
        for pending in staged:
            pending.discard()  # no-op once committed


def _write_in_place(
    entries: list[_Weights | tuple[str, bytes]],
    staged: list[Any],
    temps: Sequence[str],
    coordinator: bool,
    fsync: bool,
    save_directory: str,
) -> None:
    """Every rank writes its blocks into the coordinator's temp files; the coordinator publishes them
    with the small files once every rank reported success, and tells every rank whether it could."""
    rank = dist.get_rank()
    own: Exception | None = None
    files = FileSet()
    try:
        try:
            if coordinator:
                pending = iter(staged)
                for entry in entries:  # in the planned order: the commit renames them in it
                    if isinstance(entry, _Weights):
                        files.add(next(pending))
                    else:
                        files.stage_bytes(*entry, fsync)
            else:
                for temp in temps:
                    require_shared(temp, rank, _REMEDY)
            weights = [e for e in entries if isinstance(e, _Weights)]
            _write(weights, temps, coordinator, fsync)
            mine = _Outcome()
        except SharedStorageError:
            mine = _Outcome(unshared=True)
        except Exception as e:
            own, mine = e, _Outcome(error=_describe(e))
        outcomes = _exchange(mine)
        _raise_if_failed(outcomes, own, save_directory)
        if any(o.unshared for o in outcomes):
            raise _NotShared  # discards what this rank staged
        # The publish (renames, fsyncs) can fail too, on the coordinator only: the others learn it here
        # instead of returning as if the files were saved.
        published = _Outcome()
        if coordinator:
            try:
                files.commit()
            except Exception as e:
                own, published = e, _Outcome(error=_describe(e))
        _raise_if_failed(_exchange(published), own, save_directory, "could not publish the written files")
    finally:
        files.discard()  # what is left after a failure; nothing after the commit


def _plan(target: str, weights: dict[str, torch.Tensor]) -> _Weights:
    specs = []
    for name, t in weights.items():
        dtype = TORCH_TO_SAFETENSORS.get(t.dtype)
        if dtype is None:
            raise TensorError(f"tensor `{name}`: dtype {t.dtype} cannot be stored in safetensors")
        specs.append((name, dtype, list(t.shape), math.prod(t.shape) * t.dtype.itemsize))
    header, offsets, length = _core.plan_header(specs, _METADATA)
    blocks, whole, writable = [], [], True
    places: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for name, t in weights.items():
        if not is_sharded(t):
            whole.append(_Block(name, t.detach(), [0] * t.dim(), list(t.shape)))
            continue
        ok, block = _local_block(name, t, places)
        writable = writable and ok
        if block is not None:
            blocks.append(block)
    return _Weights(
        target=target,
        weights=weights,
        header=header,
        length=length,
        offsets=dict(zip(weights, offsets, strict=True)),
        shapes={name: list(t.shape) for name, t in weights.items()},
        blocks=blocks,
        whole=whole,
        writable=writable,
    )


def _local_block(
    name: str, t: Any, places: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...]]]
) -> tuple[bool, _Block | None]:
    """(whether this path writes the DTensor `t`, the block of it this rank writes, if any). `places`
    caches torch's block computation by shape, mesh and placements (the layers share a few shapes)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, tuple(t.placements)
    if any(type(p) not in (Shard, Replicate) for p in placements):
        return False, None
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return True, None  # this rank is not on the tensor's mesh: it holds none of it
    local = t.to_local().detach()
    key = (tuple(t.shape), id(mesh), placements)
    if key not in places:
        places[key] = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    shape, offset = places[key]
    if tuple(local.shape) != tuple(shape):
        return False, None
    # A block replicated along a mesh dimension is written by the first rank along it only.
    replica = any(isinstance(p, Replicate) and c for p, c in zip(placements, coordinate, strict=True))
    if replica or local.numel() == 0:
        return True, None
    return True, _Block(name, local, list(offset), list(shape))


def _stage(w: _Weights, fsync: bool) -> Any:
    directory, name = os.path.split(w.target)
    remove_stale_temps(directory, name)  # left by a save whose coordinator was killed
    return _core.stage_sized(w.target, hidden_temp_path(directory, name), w.header, w.length, fsync)


def _write(weights: list[_Weights], temps: Sequence[str], coordinator: bool, fsync: bool) -> None:
    jobs = []
    for w, temp in zip(weights, temps, strict=True):
        blocks = w.blocks + (w.whole if coordinator else [])
        if blocks:
            jobs.append((temp, w, blocks))
    with _on_host([b.tensor for _, _, blocks in jobs for b in blocks]) as host:
        data = iter(host)
        files = [(temp, None, [_record(w, b, next(data)) for b in blocks]) for temp, w, blocks in jobs]
        if files:
            _core.write_chunks(files, fsync)


@contextlib.contextmanager
def _on_host(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """`tensors` as contiguous host tensors: CPU ones as they are (copied only when not contiguous),
    device ones through the DCP writer's reusable staging buffer, held until the caller is done."""
    if all(t.device.type == "cpu" for t in tensors):
        yield [t if t.is_contiguous() else t.contiguous() for t in tensors]
        return
    from .dcp import writer

    with writer._STAGING_LOCK:
        yield writer._on_host(tensors)


def _record(w: _Weights, b: _Block, host: torch.Tensor) -> tuple[Any, ...]:
    # numpy has no bfloat16/float8: a uint8 view of the same memory carries every dtype.
    data = host.reshape(-1).view(torch.uint8).numpy().data
    return (b.name, data, w.offsets[b.name], host.element_size(), w.shapes[b.name], b.offsets, b.sizes)


def _save_gathered(entries: list[_Weights | tuple[str, bytes]], is_main: bool, fsync: bool) -> None:
    """The gather path: every rank gathers every weights file first (collectives, in the same order on
    every rank), then each main rank writes its files; a failure there is its own."""
    full = [full_tensors(e.weights) for e in entries if isinstance(e, _Weights)]
    if not is_main:
        return
    gathered = iter(full)
    with FileSet() as files:
        for entry in entries:
            if isinstance(entry, _Weights):
                stage_weights(files, entry.target, next(gathered), fsync)
            else:
                files.stage_bytes(*entry, fsync)


def _exchange(mine: Any) -> list[Any]:
    """Every rank's `mine`, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _raise_if_failed(
    reports: list[Any], own: Exception | None, directory: str, what: str = "failed, so nothing was published"
) -> None:
    if own is not None:
        raise own
    failed = [(r, report.error) for r, report in enumerate(reports) if report.error is not None]
    if failed:
        rank, error = failed[0]
        raise RankFailedError(f"saving {directory}: rank {rank} {what}: {error}")


def _check_same_adapter(plans: list[_Plan], directory: str) -> None:
    for rank, plan in enumerate(plans):
        if plan.digests != plans[0].digests:
            raise TensorError(
                f"saving {directory}: rank {rank} holds another adapter than rank 0 (other tensors, shapes "
                "or dtypes): every rank must save the same adapters"
            )


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
