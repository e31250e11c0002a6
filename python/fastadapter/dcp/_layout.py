"""The consolidated checkpoint's files, planned by the coordinator from DCP's global plan before any
byte is written: which file each tensor goes to, each file's exact header (the Rust core's
`plan_header`, safetensors 0.8's bytes) and each tensor's offset in it. Every rank is then told where
its own chunks go, and writes them there itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

from .. import _core
from .._dtypes import TORCH_TO_SAFETENSORS
from ..errors import TensorError
from ..names import MODEL_WEIGHTS

# safetensors.torch.save_file(..., metadata={"format": "pt"}), as transformers and PEFT write it.
FILE_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Place:
    """Where one tensor lives: the file (relative name) and the absolute offset of its first byte."""

    file: str
    offset: int


@dataclass
class RankPlan:
    """`SavePlan.storage_data` of one rank: where its chunks go, and (coordinator only) the headers."""

    staging: str
    places: dict[str, Place] = field(default_factory=dict)
    headers: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        from .._dtypes import SAFETENSORS_TO_TORCH

        return math.prod(self.shape) * SAFETENSORS_TO_TORCH[self.dtype].itemsize


def file_names(indices: Sequence[int]) -> dict[int, str]:
    """File index -> name: one file is `model.safetensors` (what `save_pretrained` writes, no index
    needed); N files are `model-0000I-of-0000N.safetensors`, as transformers and DCP's HF writer name them."""
    n = max(indices, default=1)
    if n == 1:
        return {1: MODEL_WEIGHTS}
    return {i: f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}


def tensors_of(plans: Sequence[SavePlan]) -> dict[str, Tensor]:
    """Every tensor of the checkpoint (fqn -> dtype, full shape) from the ranks' write items."""
    out: dict[str, Tensor] = {}
    for plan in plans:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                continue
            fqn = item.index.fqn
            torch_dtype = item.tensor_data.properties.dtype
            dtype = TORCH_TO_SAFETENSORS.get(torch_dtype)
            if dtype is None:
                raise TensorError(f"tensor `{fqn}`: dtype {torch_dtype} cannot be stored in safetensors")
            out.setdefault(fqn, Tensor(dtype, tuple(item.tensor_data.size)))
    return out


def plan_files(
    tensors: Mapping[str, Tensor],
    fqn_to_index: Mapping[str, int] | None,
    layout: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[dict[str, Place], dict[str, bytes]]:
    """Place every tensor in its file; returns (fqn -> place, file -> header bytes). `layout` (fqn ->
    (file, name in it)) names the files and the tensors in them instead of `fqn_to_index`."""
    if layout is None:
        where, files = _indexed(tensors, fqn_to_index)
    else:
        missing = [fqn for fqn in tensors if fqn not in layout]
        if missing:
            raise TensorError(f"tensor `{missing[0]}` has no file in the layout")
        where = {fqn: layout[fqn] for fqn in tensors}
        files = list(dict.fromkeys(file for file, _ in layout.values()))
    by_file: dict[str, list[str]] = {name: [] for name in files}
    for fqn in tensors:
        by_file[where[fqn][0]].append(fqn)
    places: dict[str, Place] = {}
    headers: dict[str, bytes] = {}
    for name, fqns in by_file.items():
        specs = [
            (where[fqn][1], tensors[fqn].dtype, list(tensors[fqn].shape), tensors[fqn].nbytes) for fqn in fqns
        ]
        header, offsets, _ = _core.plan_header(specs, FILE_METADATA)
        headers[name] = header
        places.update({fqn: Place(name, off) for fqn, off in zip(fqns, offsets, strict=True)})
    return places, headers


def _indexed(
    tensors: Mapping[str, Tensor], fqn_to_index: Mapping[str, int] | None
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """(fqn -> (file, fqn), every file) from file indices: `model.safetensors`, or numbered files."""
    index = {fqn: 1 for fqn in tensors} if fqn_to_index is None else dict(fqn_to_index)
    missing = [fqn for fqn in tensors if fqn not in index]
    if missing:
        raise TensorError(f"tensor `{missing[0]}` has no file in fqn_to_index_mapping")
    if any(i < 1 for i in index.values()):
        raise TensorError("fqn_to_index_mapping: file indices start at 1")
    names = file_names(list(index.values()))
    return {fqn: (names[index[fqn]], fqn) for fqn in tensors}, list(names.values())


def index_json(tensors: Mapping[str, Tensor], places: Mapping[str, Place]) -> bytes | None:
    """`model.safetensors.index.json` as transformers writes it (sorted keys, indent 2, newline), or
    None when the checkpoint is one file."""
    import json

    if {p.file for p in places.values()} <= {MODEL_WEIGHTS}:
        return None
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": {fqn: p.file for fqn, p in places.items()},
    }
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
