"""`fastadapter.dcp.StorageReader`: torch.distributed.checkpoint's storage plugin that reads Hugging Face
safetensors checkpoints into any sharding.

It reads every `*.safetensors` file directly under `path`: the Hub's layout (full tensors, one file or
shards + index), DCP's per-rank layout (chunks placed by `DCP_SHARDING_INFO`), ours. The metadata comes
from the headers alone (the Rust core validates them; no tensor is read). `read_data` reads only the
block each read item asks for, with positional reads straight into the rank's tensor (GIL released):
a rank that holds a slice never materialises the whole tensor, so N ranks can load what M wrote.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader as _DcpStorageReader
from torch.futures import Future

from .. import _core
from .._core import SafetensorsFile
from .._dtypes import SAFETENSORS_TO_TORCH
from ..errors import HeaderError, TensorError
from .writer import OBJECTS_INDEX

__all__ = ["StorageReader"]

_SHARDING_KEY = "DCP_SHARDING_INFO"


@dataclass(frozen=True)
class _Stored:
    """Where one chunk's bytes are: the file (relative), and its header record."""

    file: str
    record: tuple[str, str, list[int], int, int]


@dataclass(frozen=True)
class _StoredObject:
    file: str
    offset: int
    length: int


class StorageReader(_DcpStorageReader):
    """Read a safetensors checkpoint directory (any of the layouts above) with `dcp.load`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.load_id = str(uuid.uuid4())
        self.storage_data: dict[MetadataIndex, _Stored | _StoredObject] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return bool(FileSystem.validate_checkpoint_id(checkpoint_id))

    # -- metadata -------------------------------------------------------------------------------------

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _Stored | _StoredObject] = {}
        names = sorted(
            n for n in os.listdir(self.path) if n.endswith(".safetensors") and not n.startswith(".")
        )
        for name in names:
            file = SafetensorsFile(os.path.join(self.path, name))
            sharding = _sharding_info(file)
            for record in file.entries():
                fqn, dtype, shape, _, _ = record
                offsets = _offsets(file, sharding, fqn, len(shape))
                index = MetadataIndex(fqn, offsets)
                if index in storage:
                    other = storage[index]
                    raise HeaderError(
                        f"{file.path}: tensor `{fqn}` at {offsets} is also in "
                        f"{other.file}: two files claim the same data"
                    )
                storage[index] = _Stored(name, record)
                _add_chunk(tensors, file, fqn, dtype, shape, offsets)
        objects = _read_objects_index(self.path)
        for fqn, stored in objects.items():
            storage[MetadataIndex(fqn)] = stored
        self.storage_data = storage
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = dict(tensors)
        state.update({fqn: BytesStorageMetadata() for fqn in objects})
        return Metadata(
            state_dict_metadata=state,
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    # -- reading --------------------------------------------------------------------------------------

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[self.storage_data[item.storage_index].file].append(item)
        for name, items in per_file.items():
            tensor_items = [i for i in items if i.type != LoadItemType.BYTE_IO]
            if tensor_items:
                self._read_tensors(name, tensor_items, planner)
            object_items = [i for i in items if i.type == LoadItemType.BYTE_IO]
            if object_items:
                self._read_objects(name, object_items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_tensors(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Each item's block read from the file with positional reads straight into its target tensor
        (one copy, page cache to tensor) when the target is a contiguous CPU tensor of the file's
        dtype; otherwise into a buffer of the block's size, then copied (moved to the device, cast)."""
        path = os.path.join(self.path, name)
        reads = []
        pending: list[tuple[ReadItem, torch.Tensor, torch.Tensor]] = []
        for item in items:
            stored = self.storage_data[item.storage_index]
            assert isinstance(stored, _Stored)
            fqn, dtype, shape, start, _ = stored.record
            file_dtype = SAFETENSORS_TO_TORCH[dtype]
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(item.lengths):
                raise TensorError(
                    f"{path}: tensor `{fqn}`: a block of shape {tuple(item.lengths)} read into a tensor of "
                    f"shape {tuple(target.shape)}"
                )
            direct = target.device.type == "cpu" and target.dtype == file_dtype and target.is_contiguous()
            buffer = target if direct else torch.empty(tuple(item.lengths), dtype=file_dtype)
            reads.append(
                (
                    fqn,
                    buffer.reshape(-1).view(torch.uint8).numpy().data,
                    start,
                    file_dtype.itemsize,
                    shape,
                    list(item.storage_offsets),
                    list(item.lengths),
                )
            )
            pending.append((item, target, buffer))
        _core.read_chunks(path, reads)
        for item, target, buffer in pending:
            if buffer is not target:
                target.copy_(buffer)
            planner.commit_tensor(item, target)

    def _read_objects(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        with open(os.path.join(self.path, name), "rb") as f:
            for item in items:
                stored = self.storage_data[item.storage_index]
                assert isinstance(stored, _StoredObject)
                f.seek(stored.offset)
                planner.load_bytes(item, io.BytesIO(f.read(stored.length)))


def _sharding_info(file: SafetensorsFile) -> dict[str, Any] | None:
    raw = file.metadata.get(_SHARDING_KEY)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as e:
        raise HeaderError(f"{file.path}: {_SHARDING_KEY} is not JSON: {e}") from e
    if not isinstance(info, dict):
        raise HeaderError(f"{file.path}: {_SHARDING_KEY} is not a JSON object")
    return info


def _offsets(file: SafetensorsFile, sharding: dict[str, Any] | None, fqn: str, ndim: int) -> list[int]:
    """Where the file's tensor `fqn` sits in the whole tensor: its saved offsets, or the origin."""
    if sharding is None:
        return [0] * ndim
    try:
        offsets = sharding[fqn]["saved_offsets"]
    except (KeyError, TypeError) as e:
        raise HeaderError(f"{file.path}: tensor `{fqn}` has no saved_offsets in {_SHARDING_KEY}") from e
    if not (
        isinstance(offsets, list)
        and len(offsets) == ndim
        and all(isinstance(o, int) and o >= 0 for o in offsets)
    ):
        raise HeaderError(
            f"{file.path}: tensor `{fqn}`: saved_offsets {offsets!r} do not fit its {ndim} dimensions"
        )
    return offsets


def _add_chunk(
    tensors: dict[str, TensorStorageMetadata],
    file: SafetensorsFile,
    fqn: str,
    dtype: str,
    shape: list[int],
    offsets: list[int],
) -> None:
    torch_dtype = SAFETENSORS_TO_TORCH.get(dtype)
    if torch_dtype is None:
        raise TensorError(f"{file.path}: tensor `{fqn}` has dtype {dtype}, which torch cannot represent")
    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape))
    ends = [o + s for o, s in zip(offsets, shape, strict=True)]
    known = tensors.get(fqn)
    if known is None:
        tensors[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype), torch.Size(ends), [chunk])
        return
    if known.properties.dtype != torch_dtype or len(known.size) != len(shape):
        raise HeaderError(f"{file.path}: tensor `{fqn}` is {dtype} {shape} here, unlike its other chunks")
    known.chunks.append(chunk)
    known.size = torch.Size(max(a, b) for a, b in zip(known.size, ends, strict=True))


def _read_objects_index(path: str) -> dict[str, _StoredObject]:
    try:
        with open(os.path.join(path, OBJECTS_INDEX), encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    return {fqn: _StoredObject(file, offset, length) for fqn, (file, offset, length) in raw.items()}
