"""`fastadapter.dcp.StorageWriter`: torch.distributed.checkpoint's storage plugin that writes Hugging Face
safetensors, consolidated in one pass.

DCP calls, in order: `reset`, `set_up_storage_writer` and `prepare_local_plan` on every rank,
`prepare_global_plan` on the coordinator, `write_data` on every rank, `finish` on the coordinator once
every rank's writes succeeded. The coordinator plans the final files from the global plan (which tensor
goes where, each header's exact bytes) and creates a hidden staging directory beside `path`; every rank
then writes its own chunks straight to their offsets in those files (row slices as one run, column
slices as strided runs), with the GIL released, all ranks at once; `finish` renames the staging
directory to `path`. Nothing is read back and nothing is written twice: no per-rank shard files, no
consolidation pass.

The ranks must share the file system that holds `path` (one node, NFS, Lustre, ...): a rank that cannot
see the staging directory raises `SharedStorageError`. `consolidate=False` writes DCP's per-rank layout
instead (`shard-0000R-model-0000I-of-0000N.safetensors` with `DCP_SHARDING_INFO`, what torch's
`HuggingFaceStorageWriter(save_distributed=True)` writes and its reader reads), each rank its own
files, each file published atomically on its own: for storage the ranks do not share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter as _DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .. import _core
from .._dtypes import TORCH_TO_SAFETENSORS
from .._fileset import hidden_temp_path, remove_stale_temps, require_shared
from ..errors import NotADirectoryPathError, TensorError
from ..names import SAFETENSORS_INDEX
from ._layout import Place, RankPlan, index_json, plan_files, tensors_of

__all__ = ["OBJECTS_INDEX", "StorageWriter"]

# Non-tensor entries of a state dict (DCP's BYTE_IO items: torch.save'd objects such as an optimizer's
# param_groups) live beside the safetensors files: `objects-<rank>.bin`, indexed by this file.
OBJECTS_INDEX = "dcp_objects.json"
_SHARDED_NAME = "shard-{rank:05d}-model-{index:05d}-of-{count:05d}.safetensors"
# Chunks on these devices are copied to the host through one reusable staging buffer (page-locked for
# CUDA: asynchronous copies on a side stream, one synchronisation per device) instead of one pageable
# `.to("cpu")` each. Tests add "cpu" to run the same path without a GPU.
STAGED_DEVICE_TYPES = frozenset({"cuda"})
_STAGING_LOCK = threading.Lock()  # one buffer per process: saves from several threads take turns
_STAGING_BUFFER: Any = None


class StorageWriter(_DcpStorageWriter):
    """Write a DCP checkpoint to `path` as Hugging Face safetensors.

    `consolidate=True` (the default): full tensors in `model.safetensors`, or, with
    `fqn_to_index_mapping` (fqn -> file index from 1, as torch's `HuggingFaceStorageWriter` takes it),
    `model-0000I-of-0000N.safetensors` + `model.safetensors.index.json`; each file byte-identical to
    `safetensors.torch.save_file(full_tensors, metadata={"format": "pt"})`. Published atomically: until
    `finish`, the checkpoint exists only as a hidden directory beside `path`; a previous checkpoint at
    `path` is swapped out whole. `sync_files`: fsync files and directories before publishing (DCP's
    default). A `path` holding anything but checkpoint files is refused, never replaced.
    `extra_files` (name -> bytes, e.g. `config.json`) are published with the checkpoint, by the coordinator.
    `layout` (fqn -> (file, tensor name in it), files relative to `path`, subdirectories allowed) puts the
    tensors in files named otherwise, with no index: the Checkpointer writes a sharded adapter as PEFT's
    `adapter_model.safetensors` (and `<adapter>/adapter_model.safetensors`) this way.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        consolidate: bool = True,
        fqn_to_index_mapping: Mapping[str, int] | None = None,
        sync_files: bool = True,
        extra_files: Mapping[str, bytes] | None = None,
        layout: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        super().__init__()
        if layout is not None and (fqn_to_index_mapping is not None or not consolidate):
            raise ValueError(
                "layout names the consolidated files: not with fqn_to_index_mapping or consolidate=False"
            )
        self.path = os.fspath(path)
        self.consolidate = consolidate
        self.fqn_to_index_mapping = dict(fqn_to_index_mapping) if fqn_to_index_mapping is not None else None
        self.sync_files = sync_files
        self.extra_files = dict(extra_files or {})
        self.layout = dict(layout) if layout is not None else None
        for name in self.extra_files:
            if not _is_relative(name) or _is_checkpoint_file(os.path.basename(name)):
                raise ValueError(
                    f"extra file name {name!r}: a relative file name that is not a checkpoint file"
                )
        for file, _ in (self.layout or {}).values():
            if not _is_relative(file) or not file.endswith(".safetensors") or file in self.extra_files:
                raise ValueError(
                    f"layout file name {file!r}: a relative .safetensors name, not an extra file"
                )
        self.save_id = str(uuid.uuid4())
        self.is_coordinator = False
        self.rank = 0
        # Known to the coordinator from `prepare_global_plan` on, for `finish`.
        self._staging: str | None = None
        self._index: bytes | None = None

    # -- identity ------------------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        # A local path whose parent exists and is writable: DCP's own rule for file system checkpoints.
        return bool(FileSystem.validate_checkpoint_id(checkpoint_id))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    # -- planning -------------------------------------------------------------------------------------

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0
        if not kwargs.get("use_collectives", True) and _world_size() > 1:
            raise ValueError(
                "fastadapter.dcp.StorageWriter plans the files across ranks: it needs use_collectives=True"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.is_coordinator:
            _check_replaceable(self.path, whole=self.consolidate, ours=self._own_names())
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if not all(p.usable for p in plans):
            # A cached plan would send the ranks to a previous save's (published) staging directory.
            raise ValueError("fastadapter.dcp.StorageWriter plans every save anew: disable plan caching")
        if not self.consolidate:
            return [dataclasses.replace(p, storage_data=RankPlan(staging="")) for p in plans]
        tensors = tensors_of(plans)
        places, headers = plan_files(tensors, self.fqn_to_index_mapping, self.layout)
        # Created here, before any rank writes: a rank that cannot see it does not share the storage.
        staging = _make_staging(self.path)
        self._staging = staging
        for name in headers:
            os.makedirs(os.path.join(staging, os.path.dirname(name)), exist_ok=True)
        self._index = index_json(tensors, places) if self.layout is None else None
        out = []
        for i, plan in enumerate(plans):
            mine = {item.index.fqn for item in plan.items if item.type != WriteItemType.BYTE_IO}
            rank_plan = RankPlan(
                staging=staging,
                places={fqn: places[fqn] for fqn in mine},
                headers=headers if i == self.rank else {},
            )
            out.append(dataclasses.replace(plan, storage_data=rank_plan))
        return out

    # -- writing --------------------------------------------------------------------------------------

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank_plan: RankPlan = plan.storage_data
        directory = rank_plan.staging if self.consolidate else self.path
        if self.consolidate:
            remedy = "use StorageWriter(path, consolidate=False) for per-rank files"
            require_shared(directory, self.rank, remedy)
        os.makedirs(directory, exist_ok=True)
        tensor_items = [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
        object_items = [i for i in plan.items if i.type == WriteItemType.BYTE_IO]
        results = _write_objects(directory, self.rank, object_items, planner)
        data = [_tensor(planner.resolve_data(item)) for item in tensor_items]
        staged = any(t.device.type in STAGED_DEVICE_TYPES for t in data)
        with _STAGING_LOCK if staged else contextlib.nullcontext():
            # The staging buffer holds the bytes until they are written: the lock covers the write too.
            host = _on_host(data) if staged else [_contiguous_cpu(t) for t in data]
            chunks = list(zip(tensor_items, host, strict=True))
            if self.consolidate:
                results += self._write_consolidated(rank_plan, chunks)
            else:
                results += self._write_sharded(chunks)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_consolidated(
        self, rank_plan: RankPlan, chunks: list[tuple[WriteItem, torch.Tensor]]
    ) -> list[WriteResult]:
        by_file: dict[str, list[tuple[Any, ...]]] = {name: [] for name in rank_plan.headers}
        results = []
        for item, tensor in chunks:
            place = rank_plan.places[item.index.fqn]
            by_file.setdefault(place.file, []).append(_chunk_record(item, tensor, place))
            results.append(_result(item, tensor, place.file))
        files = [
            (os.path.join(rank_plan.staging, name), rank_plan.headers.get(name), records)
            for name, records in by_file.items()
        ]
        _core.write_chunks(files, self.sync_files)
        return results

    def _write_sharded(self, chunks: list[tuple[WriteItem, torch.Tensor]]) -> list[WriteResult]:
        """DCP's per-rank layout: this rank's chunks as whole tensors of its own files, with their
        offsets in `DCP_SHARDING_INFO` (what `HuggingFaceStorageReader` rebuilds the tensors from)."""
        mapping = self.fqn_to_index_mapping
        count = max(mapping.values()) if mapping else 1
        by_file: dict[str, list[tuple[WriteItem, torch.Tensor]]] = {}
        for item, tensor in chunks:
            index = mapping[item.index.fqn] if mapping else 1
            name = _SHARDED_NAME.format(rank=self.rank + 1, index=index, count=count)
            by_file.setdefault(name, []).append((item, tensor))
        results = []
        for name, items in by_file.items():
            results += self._write_shard_file(name, items)
        return results

    def _write_shard_file(self, name: str, items: list[tuple[WriteItem, torch.Tensor]]) -> list[WriteResult]:
        fqns = [item.index.fqn for item, _ in items]
        if len(set(fqns)) != len(fqns):
            dup = next(f for f in fqns if fqns.count(f) > 1)
            raise TensorError(f"tensor `{dup}`: this rank holds two chunks of it, which one file cannot name")
        sharding = {item.index.fqn: {"saved_offsets": list(_chunk(item).offsets)} for item, _ in items}
        metadata = {"DCP_SHARDING_INFO": json.dumps(sharding), "DCP_VERSION": "1.0", "format": "pt"}
        specs = [(item.index.fqn, _dtype(item), list(t.shape), t.nbytes) for item, t in items]
        header, offsets, _ = _core.plan_header(specs, metadata)
        temp = hidden_temp_path(self.path, name)
        records = [
            (item.index.fqn, _bytes(t), offset, t.element_size(), list(t.shape), [0] * t.dim(), list(t.shape))
            for (item, t), offset in zip(items, offsets, strict=True)
        ]
        try:
            _core.write_chunks([(temp, header, records)], self.sync_files)
            os.replace(temp, os.path.join(self.path, name))
        except BaseException:
            _remove_quietly(temp)
            raise
        return [_result(item, t, name) for item, t in items]

    # -- publishing -----------------------------------------------------------------------------------

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        directory = self._staging if self.consolidate else self.path
        assert directory is not None, "finish before prepare_global_plan"
        objects = {
            r.index.fqn: r.storage_data for rank in results for r in rank if isinstance(r.storage_data, list)
        }
        if objects:
            _write_small(directory, OBJECTS_INDEX, json.dumps(objects, sort_keys=True).encode())
        for name, data in self.extra_files.items():
            # publish_dir fsyncs the top of the directory; a file further down is fsynced on its own.
            _write_small(directory, name, data, fsync=self.sync_files and os.path.dirname(name) != "")
        if not self.consolidate:
            return
        if self._index is not None:
            _write_small(directory, SAFETENSORS_INDEX, self._index)
        if self.sync_files:
            _sync_subdirectories(directory)
        _check_replaceable(self.path, whole=True, ours=self._own_names())
        _core.publish_dir(directory, self.path, self.sync_files)
        self._staging = None

    def discard(self) -> None:
        """After a failed save, on the coordinator: remove its staging directory (DCP calls nothing on
        failure; every rank's writes have returned by then). Nothing to do once `finish` published it."""
        staging, self._staging = self._staging, None
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    def _own_names(self) -> set[str]:
        """Top-level names this save writes besides checkpoint files: a previous save's are replaceable."""
        names = [*self.extra_files, *(file for file, _ in (self.layout or {}).values())]
        return {name.split("/")[0] for name in names}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _chunk(item: WriteItem) -> Any:
    assert item.tensor_data is not None  # tensor items always carry it
    return item.tensor_data.chunk


def _dtype(item: WriteItem) -> str:
    assert item.tensor_data is not None
    dtype = item.tensor_data.properties.dtype
    name = TORCH_TO_SAFETENSORS.get(dtype)
    if name is None:
        raise TensorError(f"tensor `{item.index.fqn}`: dtype {dtype} cannot be stored in safetensors")
    return name


def _tensor(data: torch.Tensor | io.BytesIO) -> torch.Tensor:
    assert isinstance(data, torch.Tensor)
    return data.detach()


def _contiguous_cpu(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def _on_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor of a staged device type copied into one reusable host buffer (pinned when any is on
    CUDA), all copies queued before one wait per device; contiguous CPU tensors are used as they are.
    Caller holds `_STAGING_LOCK` until it is done with the returned tensors."""
    global _STAGING_BUFFER
    from .._snapshot import SnapshotBuffer, copy_device

    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        if t.device.type in STAGED_DEVICE_TYPES:
            total += -(-t.numel() * t.element_size() // 64) * 64  # cache-line aligned starts
    if _STAGING_BUFFER is None:
        _STAGING_BUFFER = SnapshotBuffer()
    view = _STAGING_BUFFER.reserve(total, pinned=any(t.device.type == "cuda" for t in tensors))
    out, pairs = [], []
    for t, at in zip(tensors, offsets, strict=True):
        if t.device.type not in STAGED_DEVICE_TYPES:
            out.append(_contiguous_cpu(t))
            continue
        dst = view[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        pairs.append((dst, t))
        out.append(dst)
    copy_device(pairs)
    return out


def _bytes(t: torch.Tensor) -> memoryview:
    # numpy has no bfloat16/float8: a uint8 view of the same memory carries every dtype.
    return t.reshape(-1).view(torch.uint8).numpy().data


def _chunk_record(item: WriteItem, t: torch.Tensor, place: Place) -> tuple[Any, ...]:
    assert item.tensor_data is not None
    chunk = item.tensor_data.chunk
    return (
        item.index.fqn,
        _bytes(t),
        place.offset,
        t.element_size(),
        list(item.tensor_data.size),
        list(chunk.offsets),
        list(chunk.sizes),
    )


def _result(item: WriteItem, t: torch.Tensor, file: str) -> WriteResult:
    return WriteResult(index=item.index, size_in_bytes=t.nbytes, storage_data=file)


def _write_objects(
    directory: str, rank: int, items: list[WriteItem], planner: SavePlanner
) -> list[WriteResult]:
    """This rank's non-tensor entries, torch.save'd by the planner, back to back in one file."""
    if not items:
        return []
    name = f"objects-{rank:05d}.bin"
    results = []
    blob = io.BytesIO()
    for item in items:
        data = planner.resolve_data(item)
        assert isinstance(data, io.BytesIO)
        start = blob.tell()
        blob.write(data.getbuffer())
        length = blob.tell() - start
        results.append(
            WriteResult(index=item.index, size_in_bytes=length, storage_data=[name, start, length])
        )
    _write_small(directory, name, blob.getvalue())
    return results


def _write_small(directory: str, name: str, data: bytes, fsync: bool = False) -> None:
    path = os.path.join(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _core.stage_bytes(path, data, fsync).commit()


def _sync_subdirectories(directory: str) -> None:
    for parent, subdirs, _ in os.walk(directory):
        for sub in subdirs:
            fd = os.open(os.path.join(parent, sub), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _is_relative(name: str) -> bool:
    """A path under the checkpoint directory: plain components, none hidden (temp names are)."""
    return all(part and not part.startswith(".") for part in name.split("/"))


def _make_staging(path: str) -> str:
    target = os.path.abspath(path)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, name)
    staging = hidden_temp_path(parent, name)
    os.mkdir(staging)
    return staging


def _is_checkpoint_file(name: str) -> bool:
    return (
        name.endswith(".safetensors")
        or name in (SAFETENSORS_INDEX, OBJECTS_INDEX)
        or (name.startswith("objects-") and name.endswith(".bin"))
    )


def _check_replaceable(path: str, whole: bool, ours: set[str]) -> None:
    """`path` may be absent or a directory; when the save replaces it `whole`, a directory of checkpoint
    files only: anything else there would be lost with it, so it is refused."""
    if os.path.isfile(path):
        raise NotADirectoryPathError(f"checkpoint path {path} is a file, not a directory")
    if not whole or not os.path.isdir(path):
        return
    foreign = sorted(n for n in os.listdir(path) if not _is_checkpoint_file(n) and n not in ours)
    if foreign:
        raise FileExistsError(
            errno.EEXIST,
            f"{path} holds {foreign[0]!r}, which is not part of a checkpoint; a consolidated save replaces "
            "the whole directory, so it refuses to (choose a new path, or remove what is there)",
            path,
        )


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
