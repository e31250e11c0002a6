"""`fastadapter.Checkpointer`: checkpoints that cost the training loop one memory copy.

`save(step, model_or_state_dict)` copies the tensors into a reusable host buffer (pinned when they are
on CUDA), laid out as the final files' bytes, hands the buffer to a Rust thread and returns. The
thread writes the files (several at once for sharded models) into a hidden temp directory, fsyncs
them, renames the directory to `root/checkpoint-<step>` and only then deletes checkpoints beyond
`keep_last`. A reader, or a restarted job, sees whole checkpoints or none; a killed writer leaves a
hidden temp directory that is ignored and later cleaned up.

What is written:
* a model with adapters (a `peft.PeftModel`, or one fastadapter injected): exactly the files
  `fastadapter.save` / `save_pretrained` writes (byte-identical `adapter_model.safetensors`,
  `adapter_config.json`, `README.md`), so the checkpoint directory loads in PEFT;
* a state dict, or a module without adapters: Hugging Face sharded safetensors
  (`model.safetensors`, or `model-0000X-of-0000Y.safetensors` + `model.safetensors.index.json`),
  plus `config.json` when the module is a transformers model;
* always `fastadapter_checkpoint.json`: the step, the kind, tied-weight aliases and `extra`.

Ranks: only rank 0 writes a checkpoint of shared weights (other ranks' `save` returns at once).
With `per_rank=True` every rank saves its own state dict (its RNG, data loader, optimizer partition),
and rank r's files are `checkpoint-<step>/rank-<r>-of-<n>/` (`model.safetensors` under the rank's own
keys, its `fastadapter_checkpoint.json` and `files`). In a torch.distributed job this goes through
torch.distributed.checkpoint and `fastadapter.dcp.StorageWriter`, the same way as sharded models below:
every rank writes only its own tensors, the coordinator publishes the whole step atomically with a
top-level `fastadapter_checkpoint.json` (kind "per_rank", the world size), a failure raises on every
rank. Without an initialised process group (processes that only have RANK/WORLD_SIZE) there is no
collective to agree on one checkpoint: each process publishes its own part atomically, and the step
counts as complete once all parts are there (what earlier versions wrote in every job). `load` reads
this rank's part of either, in a job of the world size that saved it.

Sharded models and adapters (DTensors: FSDP2, tensor parallel) in a torch.distributed job are saved by
every rank through torch.distributed.checkpoint and `fastadapter.dcp.StorageWriter` (`dcp.async_save`,
or `dcp.save` with `async_save=False`: one code path): each rank writes its own shards straight into
the final files, nothing is gathered, and the coordinator publishes the checkpoint directory. The files
are the same as above: a sharded adapter's checkpoint holds `fastadapter.save`'s files, byte for byte
(the plugin's `layout` names PEFT's files and keys); a full model's, the consolidated
`model.safetensors`. A failure raises on every rank (the failing rank's own error, the others
`RankFailedError`) and leaves the previous checkpoints as they were. `load` gives each rank its shards.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import json
import os
import re
import shutil
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _core
from ._fileset import hidden_temp_path
from .names import ADAPTER_WEIGHTS, MODEL_WEIGHTS, SAFETENSORS_INDEX

# torch (and so _snapshot) is imported when a Checkpointer is made, not here: `import fastadapter`
# must stay torch-free for the conversion API and CLI.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from ._snapshot import SnapshotBuffer
    from ._write_ahead import WriteAheads

__all__ = ["Checkpointer"]

# A replaced checkpoint directory is deleted on the core's release thread (`replace_dir`), which dies
# with the interpreter: let the deletions queued by the end finish (a no-op if nothing was queued).
atexit.register(_core.wait_released)

META_NAME = "fastadapter_checkpoint.json"
FORMAT = "fastadapter-checkpoint"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_PART = re.compile(r"^rank-(\d+)-of-(\d+)$")


@dataclass
class _Pending:
    job: _core.CheckpointJob | _DcpJob
    buffer: SnapshotBuffer | None  # None: a torch.distributed.checkpoint save (DCP stages its own copy)


class _DcpJob:
    """A checkpoint being written by `torch.distributed.checkpoint.async_save` (or by `save`, through
    `run`): the `CheckpointJob` interface the Checkpointer waits on."""

    def __init__(self, step: int, future: Any, after: Any, writer: Any, rank: int) -> None:
        self.step = step
        self._future = future
        self._after = after
        self._writer = writer
        self._rank = rank

    def done(self) -> bool:
        return self._future is None or bool(self._future.done())

    def wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            self.run(future.result)

    def run(self, save: Any) -> None:
        """`save()`, then `after` once it succeeded. DCP's `CheckpointException` (every rank gets it) is
        raised as this rank's own error where this rank failed, else as `RankFailedError` naming the rank
        that did; the coordinator's staging directory is removed."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            save()
        except CheckpointException as e:
            self._writer.discard()
            raise _rank_error(e, self._rank, self._writer.path) from e
        except BaseException:
            self._writer.discard()
            raise
        self._after()


class Checkpointer:
    """Periodic checkpoints under `root`: `save` stalls for one copy, a Rust thread writes.

    `keep_last`: after each checkpoint is durable, delete all but the newest `keep_last` (by step; the
    one just written always stays). `async_save=False` makes `save` return only once the checkpoint is
    published. `fsync`: make every checkpoint durable (files, directories) before it is published and
    before old ones are deleted. `max_pending`: saves in flight at most; a further `save` first waits
    for the oldest (memory stays bounded at `max_pending` snapshot buffers). `max_shard_size` (bytes or
    "5GB"-style) splits full state dicts into shards like `save_pretrained`. `rank`/`world_size` default
    to torch.distributed's, else the RANK/WORLD_SIZE environment variables, else 0/1.

    A failure in the background is raised by the next call (`save`, `wait`, `close`, `steps`, `latest`,
    `load`), once. Use as a context manager, or call `close()`, to wait for the last saves.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        async_save: bool = True,
        fsync: bool = True,
        max_pending: int = 1,
        max_shard_size: int | str = "5GB",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, not {keep_last!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, not {max_pending!r}")
        self.root = os.fspath(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.fsync = fsync
        self.max_shard_size = parse_size(max_shard_size)
        self.rank, self.world_size = _rank_info(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        from ._snapshot import SnapshotBuffer

        self._free = [SnapshotBuffer() for _ in range(max_pending)]
        self._pending: collections.deque[_Pending] = collections.deque()
        self._failure: BaseException | None = None
        self._closed = False
        # A job's thread would die with the interpreter: finish pending saves at exit (or when this
        # object is collected) even if nobody called close().
        weakref.finalize(self, _drain, self._pending)
        if os.path.isfile(self.root):
            raise NotADirectoryError(f"checkpoint root {self.root!r} is a file")
        if os.path.isdir(self.root):
            # Temp directories of writers that died (never those of a live process): they are never
            # read, this only frees their space.
            _core.clean_stale_checkpoints(self.root)

    # -- saving ---------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
        *,
        extra: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        per_rank: bool = False,
    ) -> None:
        """Snapshot `model_or_state_dict` as checkpoint `step` and return; the files are written in the
        background (or before returning, with `async_save=False`). `extra`: JSON-serialisable metadata
        stored in fastadapter_checkpoint.json. `files`: more small files to put in the checkpoint
        (e.g. `trainer_state.json`), relative name → bytes."""
        self._check_open()
        self._reap()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        meta: dict[str, Any] = {"format": FORMAT, "version": 1, "step": step}
        if extra is not None:
            meta["extra"] = dict(extra)
        if per_rank and _distributed():
            self._save_per_rank(step, model_or_state_dict, meta, files)  # every rank, through DCP
            return
        if not per_rank and _is_sharded(model_or_state_dict):
            self._save_dcp(step, model_or_state_dict, meta, files)  # every rank writes its own shards
            return
        if self.rank != 0 and not per_rank:
            return  # shared files are written by rank 0 only
        staging = None
        if not self.async_save and not per_rank:
            staging = _Staging(self.root, self.path(step), model_or_state_dict, self.fsync)
        with staging or contextlib.nullcontext():
            big, small = self._plan(step, model_or_state_dict, meta, per_rank)
            small.append((META_NAME, _json_bytes(meta)))
            taken = {name for name, *_ in big} | {name for name, _ in small}
            for name, data in (files or {}).items():
                if name in taken:
                    raise ValueError(f"extra file {name!r} clashes with a checkpoint file")
                small.append((name, bytes(data)))
            if staging is not None and _in_place(big, small):
                self._write_in_place(step, big, small, staging)
                return
        from ._snapshot import take

        buffer = self._acquire()
        try:
            view, images = take(buffer, big)
            job = _core.publish_checkpoint(
                self.root,
                step,
                view.numpy().data,
                [(i.name, i.start, i.end) for i in images],
                small,
                fsync=self.fsync,
                parallel=True,
                keep_last=self.keep_last if self.rank == 0 else None,
                part=_part_name(self.rank, self.world_size) if per_rank else None,
            )
        except BaseException:
            self._free.append(buffer)
            raise
        self._pending.append(_Pending(job, buffer))
        if not self.async_save:
            self.wait()

    def _write_in_place(
        self,
        step: int,
        big: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, str] | None]],
        small: list[tuple[str, bytes]],
        staging: _Staging,
    ) -> None:
        """`async_save=False` with every tensor in host memory: the caller waits for the files anyway, so
        no snapshot is taken; each file goes straight from the tensors into a hidden staging directory
        (fastadapter.save's writer), which is then renamed into place as `publish_checkpoint` does (same
        staging name, so a killed writer's leftovers are cleaned the same way). One copy of the bytes
        instead of two: the snapshot copy was most of what the sync save spent above one `write()` of
        the same bytes (bench_save_sync.py). The shards of a model are written several at once, as
        `publish_checkpoint(parallel=True)` writes them; an adapter's weights may already be written
        (`_Staging`)."""
        from ._tensors import write_records

        files = []
        for name, tensors, metadata in big:
            written = staging.ahead.take(name, tensors) if staging.ahead is not None else None
            if written is not None:
                written.commit()
            else:
                files.append((os.path.join(staging.path, name), write_records(tensors), dict(metadata or {})))
            if staging.ahead is not None:
                staging.ahead.remember(name, tensors)
        for pending in _core.write_safetensors_files(files, self.fsync):
            pending.commit()
        for name, data in small:
            _core.stage_bytes(os.path.join(staging.path, name), data, self.fsync).commit()
        _core.publish_dir(staging.path, self.path(step), self.fsync)
        staging.published = True
        if self.rank == 0 and self.keep_last is not None:
            _core.rotate_checkpoints(self.root, self.keep_last, step)

    def _save_dcp(self, step: int, obj: Any, meta: dict[str, Any], files: Mapping[str, bytes] | None) -> None:
        """A sharded model or adapter (FSDP2, tensor parallel: DTensors) through
        `torch.distributed.checkpoint` and fastadapter's plugin: every rank writes its own shards straight
        into the final files, published atomically as `checkpoint-<step>` with this checkpoint's small
        files. An adapter's files are `fastadapter.save`'s (PEFT's `adapter_model.safetensors`, byte for
        byte), and nothing is gathered. Asynchronous unless `async_save=False`: DCP stages a copy and
        writes on a thread. A failure raises on every rank: the failing rank's own error, the others'
        `RankFailedError`; the previous checkpoints stay as they were."""
        from .dcp import StorageWriter

        if _has_adapters(obj):
            meta["kind"] = "adapter"
            state, layout, small = _sharded_adapter(obj, self.path(step))
        else:
            meta["kind"] = "full"
            state, layout, small = _full_state(obj), None, _config_file(obj)
        taken = set(small) | {file for file, _ in (layout or {}).values()}
        small[META_NAME] = _json_bytes(meta)
        for name, data in (files or {}).items():
            if name in taken or name == META_NAME:
                raise ValueError(f"extra file {name!r} clashes with a checkpoint file")
            small[name] = bytes(data)
        writer = StorageWriter(self.path(step), sync_files=self.fsync, extra_files=small, layout=layout)
        self._run_dcp(step, state, writer)

    def _save_per_rank(
        self, step: int, obj: Any, meta: dict[str, Any], files: Mapping[str, bytes] | None
    ) -> None:
        """Every rank's own state dict (its RNG, data loader, optimizer partition: different on every rank)
        as one checkpoint, through `torch.distributed.checkpoint` and fastadapter's plugin. Rank r's
        tensors go to `rank-<r>-of-<n>/model.safetensors` under their own names, with its own
        `fastadapter_checkpoint.json` (its `extra`) and `files` beside them: the layout of the
        per-process parts, so one reader serves both, and `safe_open` on a rank's file shows that
        rank's keys as it saved them. The DCP keys carry the part name, so equal keys of two ranks never
        collide and each rank writes only its own bytes. The coordinator names every file (the plugin's
        `layout`) and writes the small files, so the ranks first exchange their keys and small files
        (one `all_gather_object`, which also tells every rank whether another refused its state dict:
        then all raise, none is left waiting in DCP's collectives); the coordinator publishes the
        directory with a top-level `fastadapter_checkpoint.json` of kind "per_rank" and the world size."""
        import torch.distributed as dist

        from .dcp import StorageWriter
        from .errors import RankFailedError

        rank, world = dist.get_rank(), dist.get_world_size()
        # The exchange and DCP's save are collectives: one at a time, in the same order on every rank.
        self.wait()
        try:
            state, small = self._own_part_files(obj, meta, files, rank, world)
            mine: tuple[str, list[str], dict[str, bytes], str | None] = (
                _part_name(rank, world),
                list(state),
                small,
                None,
            )
        except (TypeError, ValueError) as e:
            refused: BaseException | None = e
            state, mine = {}, (_part_name(rank, world), [], {}, f"{type(e).__name__}: {e}")
        else:
            refused = None
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        if refused is not None:
            raise refused
        failed = [(r, error) for r, (*_, error) in enumerate(parts) if error is not None]
        if failed:
            raise RankFailedError(f"saving {self.path(step)}: rank {failed[0][0]} failed: {failed[0][1]}")
        layout: dict[str, tuple[str, str]] = {}
        extra_files: dict[str, bytes] = {}
        for name, keys, part_files, _ in parts:
            layout.update({f"{name}/{key}": (f"{name}/{MODEL_WEIGHTS}", key) for key in keys})
            # An empty rank's part holds only these: its directory exists, so the step is complete.
            extra_files.update({f"{name}/{file}": data for file, data in part_files.items()})
        if rank == 0:
            top = {"format": FORMAT, "version": 1, "step": step, "kind": "per_rank", "world_size": world}
            extra_files[META_NAME] = _json_bytes(top)
        writer = StorageWriter(self.path(step), sync_files=self.fsync, extra_files=extra_files, layout=layout)
        part = _part_name(rank, world)
        self._run_dcp(step, {f"{part}/{key}": t.detach() for key, t in state.items()}, writer)

    def _own_part_files(
        self, obj: Any, meta: dict[str, Any], files: Mapping[str, bytes] | None, rank: int, world: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """This rank's tensors and small files for a per-rank checkpoint, checked."""
        import torch

        if _has_adapters(obj):
            raise ValueError("per_rank=True is for full state dicts; adapters are saved by rank 0")
        if (rank, world) != (self.rank, self.world_size):
            raise ValueError(
                f"this Checkpointer is rank {self.rank} of {self.world_size}, torch.distributed's rank "
                f"{rank} of {world}: a per-rank checkpoint is written by torch.distributed's ranks"
            )
        state = _full_state(obj)
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"per-rank state dict entry {key!r} is a {type(t).__name__}, not a tensor")
            if _is_dtensor(t):
                raise ValueError(
                    f"per-rank state dict entry {key!r} is a DTensor: save sharded tensors without per_rank"
                )
        meta["kind"] = "full"
        small = {META_NAME: _json_bytes(meta)}
        for name, data in (files or {}).items():
            if name in (META_NAME, MODEL_WEIGHTS):
                raise ValueError(f"extra file {name!r} clashes with a checkpoint file")
            small[name] = bytes(data)
        return state, small

    def _run_dcp(self, step: int, state: dict[str, torch.Tensor], writer: Any) -> None:
        """`state` saved by DCP through `writer` on every rank: `dcp.async_save` (DCP stages a copy and
        writes on a thread; waited for like a snapshot job) or `dcp.save` with `async_save=False`, one
        code path. Rank 0 rotates `keep_last` once the checkpoint is published; a failure raises on
        every rank (`_DcpJob.run`)."""
        from torch.distributed.checkpoint.state_dict_saver import async_save, save

        # DCP saves are collectives: one at a time, in the same order on every rank.
        self.wait()

        def published() -> None:
            if self.rank == 0 and self.keep_last is not None:
                _core.rotate_checkpoints(self.root, self.keep_last, step)

        if self.async_save:
            future = async_save(state, storage_writer=writer)
            self._pending.append(_Pending(_DcpJob(step, future, published, writer, self.rank), None))
        else:
            _DcpJob(step, None, published, writer, self.rank).run(lambda: save(state, storage_writer=writer))

    def _plan(
        self, step: int, obj: Any, meta: dict[str, Any], per_rank: bool
    ) -> tuple[
        list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, str] | None]], list[tuple[str, bytes]]
    ]:
        from torch import nn

        from .hosts import host_for

        pt = {"format": "pt"}
        big: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, str] | None]] = []
        small: list[tuple[str, bytes]] = []
        if isinstance(obj, nn.Module) and host_for(obj).configs():
            if per_rank:
                raise ValueError("per_rank=True is for full state dicts; adapters are saved by rank 0")
            from .save import adapter_files

            meta["kind"] = "adapter"
            final = os.path.join(self.root, f"checkpoint-{step}")
            for name, payload in adapter_files(obj, final):
                if isinstance(payload, bytes):
                    small.append((name, payload))
                else:
                    big.append((name, payload, pt))
            return big, small
        meta["kind"] = "full"
        if isinstance(obj, nn.Module):
            state = obj.state_dict()
            config = getattr(obj, "config", None)
            if config is not None and callable(getattr(config, "to_json_string", None)):
                small.append(("config.json", config.to_json_string(use_diff=True).encode()))
            total_parameters: int | None = sum(p.numel() for p in obj.parameters())
        elif isinstance(obj, Mapping):
            state = dict(obj)
            total_parameters = None
        else:
            raise TypeError(f"expected an nn.Module or a state dict, not {type(obj).__name__}")
        unique, aliases = dedupe_aliases(state)
        if aliases:
            meta["aliases"] = aliases
        shards, index = shard(unique, self.max_shard_size, total_parameters)
        if index is not None:
            small.append((SAFETENSORS_INDEX, index))
        return [(name, tensors, pt) for name, tensors in shards], small

    def _acquire(self) -> SnapshotBuffer:
        # Back-pressure: at most max_pending snapshots exist; wait for the oldest to be written.
        while not self._free:
            self._finish(self._pending.popleft())
            self._raise_failure()
        return self._free.pop()

    # -- waiting --------------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every pending checkpoint is published; raise the first background failure."""
        while self._pending:
            self._finish(self._pending.popleft())
        self._raise_failure()

    def close(self) -> None:
        """Wait for pending saves, then refuse further ones. Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _finish(self, pending: _Pending) -> None:
        try:
            pending.job.wait()
        except BaseException as e:  # kept and raised by the caller, never dropped
            if self._failure is None:
                self._failure = e
        finally:
            if pending.buffer is not None:
                self._free.append(pending.buffer)

    def _reap(self) -> None:
        """Collect the saves that have finished, without blocking; raise a failure among them."""
        while self._pending and self._pending[0].job.done():
            self._finish(self._pending.popleft())
        self._raise_failure()

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")

    # -- reading --------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        self._reap()
        return list(_core.checkpoint_steps(self.root))

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"checkpoint-{step}")

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The `extra` metadata saved with checkpoint `step` (default: the latest); of a per-rank
        checkpoint, the one this rank saved."""
        directory = self.path(self._resolve(step))
        meta = _read_meta(directory)
        part = self._own_part(directory, meta)
        if part is not None:
            meta = _read_meta(part)
        extra: dict[str, Any] = meta.get("extra", {})
        return extra

    def load(
        self,
        step: int | None = None,
        model: nn.Module | None = None,
        *,
        adapter_name: str = "default",
    ) -> dict[str, torch.Tensor]:
        """The tensors of checkpoint `step` (default: the latest), after waiting for pending saves.

        For an adapter checkpoint, those of adapter `adapter_name` (keys as in PEFT's file); for a full
        one, the whole state dict (tied aliases restored); for a per-rank one (`save(per_rank=True)`),
        this rank's own state dict, from the part its rank wrote (a job of another world size is
        refused: `WorldSizeError`). Given `model`, they are also loaded into it: into its existing
        adapter `adapter_name` in place (a resumed run), or by `fastadapter.load` if it has none; a full
        or per-rank state dict with `model.load_state_dict`.
        """
        self.wait()
        directory = self.path(self._resolve(step))
        meta = _read_meta(directory)
        part = self._own_part(directory, meta)
        if part is not None:
            state = _load_part(part, written_by_dcp=meta.get("kind") == "per_rank")
            if model is not None:
                model.load_state_dict(state)
            return state
        if meta.get("kind", "adapter" if _is_adapter_dir(directory) else "full") == "adapter":
            return _load_adapter(directory, model, adapter_name)
        if model is not None and _is_sharded(model):
            # Every rank reads only its own shards, straight into them.
            from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

            from .dcp import StorageReader

            sharded = model.state_dict()
            dcp_load(sharded, storage_reader=StorageReader(directory))
            model.load_state_dict(sharded)
            return sharded
        state = _load_full(directory, meta)
        if model is not None:
            model.load_state_dict(state)
        return state

    def _own_part(self, directory: str, meta: dict[str, Any]) -> str | None:
        """This rank's part of a per-rank checkpoint, or None for a shared one. Per-rank checkpoints are
        DCP's (kind "per_rank", world size in the metadata) or per-process parts (no top-level
        metadata: what jobs without torch.distributed and earlier versions write); both keep rank r's
        files in `rank-<r>-of-<n>/`. `steps()` lists a step of parts only once all `n` are there."""
        if meta.get("kind") == "per_rank":
            saved = int(meta["world_size"])
        elif "kind" in meta:
            return None
        else:
            sizes = {n for _, n in map(_parse_part, os.listdir(directory)) if n}
            if not sizes:
                return None
            saved = max(sizes)
        if saved != self.world_size:
            from .errors import WorldSizeError

            raise WorldSizeError(
                f"{directory} is a per-rank checkpoint of {saved} ranks, and this job has {self.world_size}: "
                f"each rank loads the part its rank saved, so it loads on {saved} ranks only"
            )
        return os.path.join(directory, _part_name(self.rank, saved))

    def _resolve(self, step: int | None) -> int:
        if step is not None:
            if step not in self.steps():
                raise FileNotFoundError(f"no complete checkpoint for step {step} under {self.root}")
            return step
        latest = self.latest()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint under {self.root}")
        return latest


# -- pieces shared with tests and the Trainer callback -------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a `save_pretrained`-style string ("5GB" = 5e9, "500MiB" = 500 * 2**20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, not {size}")
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB or 500MiB")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, not {size!r}")
    return value


def dedupe_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are the very same view of the same memory as an earlier key (tied weights),
    as `save_pretrained` does; returns (state without them, {dropped: kept})."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            unique[name] = t
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def shard(
    state: Mapping[str, torch.Tensor], max_shard_size: int, total_parameters: int | None = None
) -> tuple[list[tuple[str, dict[str, torch.Tensor]]], bytes | None]:
    """Split like `huggingface_hub.split_torch_state_dict_into_shards` (in key order; a tensor larger
    than the limit gets a shard of its own) and name the files as `save_pretrained` does. Returns the
    shards and, when there are several, the index JSON bytes transformers writes."""
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    current_size = total = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        total += size
        if size > max_shard_size:
            shards.append({name: t})
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = t
        current_size += size
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return [(MODEL_WEIGHTS, shards[0])], None
    n = len(shards)
    named = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]
    metadata: dict[str, int] = {"total_size": total}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    index = {
        "metadata": metadata,
        "weight_map": {key: file for file, s in named for key in s},
    }
    return named, _json_bytes(index)


def _drain(pending: collections.deque[_Pending]) -> None:
    while pending:
        job = pending.popleft().job
        try:
            job.wait()
        except Exception as e:  # nobody is left to raise it to: say it
            warnings.warn(f"fastadapter: checkpoint {job.step} failed: {e}", RuntimeWarning, stacklevel=1)


def _is_sharded(obj: Any) -> bool:
    """Whether `obj` (a module or a state dict) holds DTensors (FSDP2, tensor parallel) in a running
    torch.distributed job."""
    if not _distributed():
        return False
    from torch import nn

    if isinstance(obj, nn.Module):
        return any(map(_is_dtensor, obj.parameters()))
    return isinstance(obj, Mapping) and any(map(_is_dtensor, obj.values()))


def _in_place(
    big: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, str] | None]],
    small: list[tuple[str, bytes]],
) -> bool:
    """Whether a synchronous save can be written straight from the tensors: all of them in host memory
    (others are packed through the pinned snapshot: one synchronisation), every file at the top of the
    checkpoint (`publish_dir` flushes those; adapters in subdirectories take the snapshot path)."""
    names = [name for name, *_ in big] + [name for name, _ in small]
    if any(not name or name in (".", "..") or "/" in name or os.sep in name for name in names):
        return False
    return all(t.device.type == "cpu" for _, tensors, _ in big for t in tensors.values())


def _sharded_adapter(
    model: nn.Module, final: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str]], dict[str, bytes]]:
    """The files `fastadapter.save` writes for `model`'s sharded adapters, for the DCP plugin: the
    tensors of every weights file as they are (DTensors: nothing gathered), where each goes (file, name
    in it), and the small files (config, model card)."""
    from .save import adapter_files

    state: dict[str, torch.Tensor] = {}
    layout: dict[str, tuple[str, str]] = {}
    small: dict[str, bytes] = {}
    for name, payload in adapter_files(model, final, gather=False):
        if isinstance(payload, bytes):
            small[name] = payload
            continue
        subdir = os.path.dirname(name)
        for key, t in payload.items():
            fqn = f"{subdir}/{key}" if subdir else key  # adapters in subdirectories have the same keys
            state[fqn] = t.detach()
            layout[fqn] = (name, key)
    return state, layout, small


def _full_state(obj: Any) -> dict[str, torch.Tensor]:
    from torch import nn

    return obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)


def _config_file(obj: Any) -> dict[str, bytes]:
    """`config.json` of a transformers model, as `save_pretrained` writes it, for `from_pretrained`."""
    config = getattr(obj, "config", None)
    if config is not None and callable(getattr(config, "to_json_string", None)):
        return {"config.json": config.to_json_string(use_diff=True).encode()}
    return {}


def _rank_error(e: Any, rank: int, path: str) -> BaseException:
    failures: dict[int, tuple[BaseException, Any]] = e.failures
    if rank in failures:
        return failures[rank][0]
    from .errors import RankFailedError

    failed, (error, _) = min(failures.items())
    return RankFailedError(
        f"saving {path}: rank {failed} failed, so nothing was published: {type(error).__name__}: {error}"
    )


class _Staging:
    """The hidden directory a synchronous checkpoint is written into (`hidden_temp_path`, as
    `publish_checkpoint` names it), made before the tensors are selected: the weights file of a model's
    adapter is then written ahead from its last save's tensors while the selection runs (see
    `_write_ahead`; only a top-level file, as `_in_place` takes). Removed on exit unless published."""

    def __init__(self, root: str, final: str, obj: Any, fsync: bool) -> None:
        from torch import nn

        os.makedirs(root, exist_ok=True)
        self.path = hidden_temp_path(root, os.path.basename(final))
        os.mkdir(self.path)
        self.published = False
        self.ahead: WriteAheads | None = None
        if isinstance(obj, nn.Module) and _has_adapters(obj):
            from ._write_ahead import WriteAheads

            self.ahead = WriteAheads(obj, self.path, [ADAPTER_WEIGHTS], fsync)

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.ahead is not None:
                self.ahead.__exit__()
        finally:
            if not self.published:
                shutil.rmtree(self.path, ignore_errors=True)


def _has_adapters(obj: Any) -> bool:
    from torch import nn

    from .hosts import host_for

    return isinstance(obj, nn.Module) and bool(host_for(obj).configs())


def _distributed() -> bool:
    """Whether this process is in a running torch.distributed job (never imports torch)."""
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _rank_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if _distributed():
        import torch.distributed as dist

        r, w = dist.get_rank(), dist.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return (r if rank is None else rank), (w if world_size is None else world_size)


def _part_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _parse_part(name: str) -> tuple[int, int]:
    """`rank-<r>-of-<n>` -> (r, n); (0, 0) for any other name."""
    m = _PART.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _load_part(part: str, written_by_dcp: bool) -> dict[str, torch.Tensor]:
    """One rank's state dict: `model.safetensors`, or shards + index (per-process parts are sharded
    by `max_shard_size`), tied aliases restored from the part's metadata. In DCP's layout a rank that
    saved no tensors has no weights file, only its metadata."""
    if written_by_dcp and not os.path.isfile(os.path.join(part, MODEL_WEIGHTS)):
        if not os.path.isfile(os.path.join(part, META_NAME)):
            raise FileNotFoundError(errno.ENOENT, "no part of this rank in the checkpoint", part)
        return {}
    return _load_full(part, _read_meta(part))


def _json_bytes(meta: Mapping[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _is_dtensor(t: Any) -> bool:
    import sys

    tensor_module = sys.modules.get("torch.distributed.tensor")
    return tensor_module is not None and isinstance(t, tensor_module.DTensor)


def _read_meta(directory: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, META_NAME), encoding="utf-8") as f:
            meta: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        return {}  # e.g. a checkpoint transformers.Trainer wrote itself
    return meta


def _is_adapter_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS))


def _load_full(directory: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from ._tensors import load_safetensors

    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    else:
        weight_map, files = {}, [MODEL_WEIGHTS]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_safetensors(os.path.join(directory, name)))
    missing = [k for k in weight_map if k not in state]
    if missing:
        from .errors import MissingTensorError

        raise MissingTensorError(f"{index_path}: tensors listed but not in the shards: {missing[:5]}")
    for dropped, kept in meta.get("aliases", {}).items():
        state[dropped] = state[kept]
    return state


def _load_adapter(directory: str, model: nn.Module | None, adapter_name: str) -> dict[str, torch.Tensor]:
    from ._tensors import load_safetensors

    sub = directory if adapter_name == "default" else os.path.join(directory, adapter_name)
    state = load_safetensors(os.path.join(sub, ADAPTER_WEIGHTS))
    if model is None:
        return state
    from .adapters import load

    # A new adapter is added (trainable, to resume training); an existing one takes the weights in place.
    load(model, sub, adapter_name=adapter_name, is_trainable=True)
    return state
