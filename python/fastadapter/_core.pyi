# Type stubs for the native module fastadapter._core (rust/python/src), kept by hand and checked against the
# built module by `make lint` (mypy.stubtest; what it cannot check is in scripts/stubtest-allowlist.txt).
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, final

from typing_extensions import Buffer

__all__ = [
    "CheckpointJob",
    "ChunkReads",
    "PendingFile",
    "Progress",
    "SafetensorsFile",
    "WriteJob",
    "__version__",
    "checkpoint_steps",
    "clean_stale_checkpoints",
    "convert_file",
    "copy_ranges",
    "inspect_torch",
    "map_file_over",
    "plan_header",
    "publish_checkpoint",
    "publish_dir",
    "read_chunks",
    "rotate_checkpoints",
    "select_keys",
    "stage_bytes",
    "stage_sized",
    "start_write_safetensors",
    "wait_released",
    "write_chunks",
    "write_safetensors",
    "write_safetensors_files",
]

__version__: str

# (name, safetensors dtype, shape, start, end); offsets are absolute byte positions in the file. Stub-only,
# hence private.
_Record = tuple[str, str, list[int], int, int]

@final
class SafetensorsFile:
    """A validated, privately (copy-on-write) mapped safetensors file; exports the mapping as a buffer."""

    def __new__(cls, path: str | PathLike[str]) -> SafetensorsFile: ...
    @property
    def path(self) -> Path: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    @property
    def header_len(self) -> int: ...
    @property
    def header(self) -> bytes:
        """The stored header (its 8-byte length and JSON)."""
    def __len__(self) -> int: ...
    def entries(self) -> list[_Record]: ...
    def select(
        self,
        prefix: str | None = None,
        pattern: str | None = None,
        renames: Sequence[tuple[str, str]] | None = None,
    ) -> list[_Record]: ...
    def prefetch(self, only_cold: bool = False) -> bool:
        """Start bringing the pages in on a background thread (one thread while they are in the page
        cache, or none with ``only_cold``; two reading at once when some are not); ``stop_prefetch``
        ends it. Returns whether the file was found cold (asked of the kernel before it starts)."""
    def stop_prefetch(self, wait: bool = False) -> bool:
        """Join the prefetch: stopped after its current 4 MiB piece while the pages are cached (or,
        ``wait=True``, once every page is in), always run to the end once it reads from disk. Returns
        whether it read from disk; its error (file shrunk, disk error) is raised as ``OSError`` naming
        the file."""
    def map_over(self, target: SafetensorsFile) -> None:
        """Map this file over ``target``'s memory in place (same addresses, no copy), pages brought in;
        ``target``'s header still describes its own file. ``ValueError`` / ``OSError`` naming this file
        (another length, or no longer the file validated) with ``target`` unchanged."""
    def __buffer__(self, flags: int, /) -> memoryview: ...

def map_file_over(path: str | PathLike[str], header: bytes, target: SafetensorsFile) -> None:
    """``SafetensorsFile.map_over`` for the file at ``path``, when its length is ``target``'s and its
    header is ``header`` byte for byte; ``ValueError`` / ``OSError`` naming it otherwise, ``target``
    unchanged."""

def select_keys(
    keys: Sequence[str],
    prefix: str | None = None,
    pattern: str | None = None,
    renames: Sequence[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]: ...

@final
class PendingFile:
    """A file staged beside its target; ``commit()`` renames it into place, ``discard()`` removes it."""

    @property
    def target(self) -> Path: ...
    @property
    def temp_path(self) -> Path: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...

def write_safetensors(
    path: str | PathLike[str],
    tensors: Sequence[tuple[str, str, Sequence[int], Buffer]],
    metadata: dict[str, str] | None = None,
    fsync: bool = False,
) -> PendingFile: ...
def write_safetensors_files(
    files: Sequence[
        tuple[str | PathLike[str], Sequence[tuple[str, str, Sequence[int], Buffer]], dict[str, str] | None]
    ],
    fsync: bool = False,
) -> list[PendingFile]: ...

@final
class WriteJob:
    """A safetensors file being written by a Rust thread; dropping it discards the file."""

    def wait(self) -> PendingFile: ...

def start_write_safetensors(
    path: str | PathLike[str],
    tensors: Sequence[tuple[str, str, Sequence[int], Buffer]],
    metadata: dict[str, str] | None = None,
    fsync: bool = False,
) -> WriteJob: ...
def stage_bytes(path: str | PathLike[str], data: Buffer, fsync: bool = False) -> PendingFile: ...
def stage_sized(
    path: str | PathLike[str],
    temp_path: str | PathLike[str],
    header: Buffer,
    length: int,
    fsync: bool = False,
) -> PendingFile:
    """Stage `path` as a new file at `temp_path` (created exclusively) holding `header` and `length`
    bytes in all; other processes write the rest (``write_chunks``) before ``commit()``."""

def wait_released() -> None:
    """Wait until files replaced by earlier commits are freed and replaced checkpoint directories deleted
    (that happens on a background thread)."""

def plan_header(
    tensors: Sequence[tuple[str, str, Sequence[int], int]],
    metadata: dict[str, str] | None = None,
) -> tuple[bytes, list[int], int]: ...

@final
class Progress:
    """Bytes written so far by the conversion it is passed to; safe to read from another thread."""

    def __new__(cls) -> Progress: ...
    @property
    def value(self) -> int: ...

def convert_file(
    src: str | PathLike[str],
    dst: str | PathLike[str],
    verify: bool = True,
    check_crc: bool = True,
    fsync: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]: ...
def inspect_torch(path: str | PathLike[str]) -> list[tuple[str, str, list[int], int, str | None]]: ...
def copy_ranges(
    dst: Buffer,
    sources: Sequence[Buffer],
    ranges: Sequence[tuple[int, int, int, int]],
) -> int:
    """Copy (source index, source offset, destination offset, length) byte ranges into `dst`, in
    parallel with the GIL released; checked first (ValueError). Returns the bytes copied."""

def write_chunks(
    files: Sequence[
        tuple[
            str | PathLike[str],
            Buffer | None,
            Sequence[tuple[str, Buffer, int, int, Sequence[int], Sequence[int], Sequence[int]]],
        ]
    ],
    fsync: bool = False,
) -> int:
    """Write each file's header (or None) and chunks (name, buffer, tensor offset, item size, shape,
    chunk offsets, chunk sizes) at their offsets, without truncating; files in parallel, GIL released.
    Returns the bytes written."""

def publish_dir(staging: str | PathLike[str], target: str | PathLike[str], fsync: bool = False) -> Path:
    """Rename the written directory `staging` to `target`, atomically replacing a previous one."""

@final
class ChunkReads:
    """The blocks of `read_chunks`, checked and held once, for reading files laid out alike into the
    same buffers again and again."""

    def __new__(
        cls, chunks: Sequence[tuple[str, Buffer, int, int, Sequence[int], Sequence[int], Sequence[int]]]
    ) -> ChunkReads: ...
    def read(self, path: str | PathLike[str], replace_pages: bool = False) -> int:
        """`read_chunks(path, chunks, replace_pages)`; reads from several threads take turns."""
    def __len__(self) -> int: ...

def read_chunks(
    path: str | PathLike[str],
    chunks: Sequence[tuple[str, Buffer, int, int, Sequence[int], Sequence[int], Sequence[int]]],
    replace_pages: bool = False,
) -> int:
    """Read each block (name, writable buffer, stored tensor's offset, item size, stored shape, block
    offsets, block sizes) of `path` into its buffer with positional reads, GIL released.
    `replace_pages`: the buffers' whole pages are discarded first (views of a private file mapping:
    fresh pages instead of copy-on-write faults)."""

@final
class CheckpointJob:
    """A checkpoint being written by a background Rust thread."""

    @property
    def step(self) -> int: ...
    def done(self) -> bool: ...
    def wait(self) -> Path: ...

def publish_checkpoint(
    root: str | PathLike[str],
    step: int,
    snapshot: Buffer,
    files: Sequence[tuple[str, int, int]],
    small: Sequence[tuple[str, bytes]],
    fsync: bool = True,
    parallel: bool = True,
    keep_last: int | None = None,
    part: str | None = None,
) -> CheckpointJob: ...
def checkpoint_steps(root: str | PathLike[str]) -> list[int]: ...
def clean_stale_checkpoints(root: str | PathLike[str]) -> int: ...
def rotate_checkpoints(root: str | PathLike[str], keep: int, protect: int) -> list[int]: ...
