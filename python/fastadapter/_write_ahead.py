"""A repeated save of the same adapter starts writing its weights file before its tensors are selected.

Training saves the same model every N steps. Selecting the adapter's tensors (a walk of every module)
and writing them (the kernel copying the bytes) take turns on one thread, although the writer releases
the GIL. So `fastadapter.save` remembers which tensors each weights file held (their keys and the
tensor objects, weakly) and, on the next save of that model, writes a file from those tensors on a
Rust thread while the selection runs. The file is kept only if the selection then gives the same
keys with the very same tensor objects: its bytes are then exactly what writing the selection would
give (the records were taken from those objects at the start of this save, and nothing ran between but
the selection). Otherwise it is discarded and the selection written as usual: nothing is trusted that
was not compared, and a changed model costs one extra write of its old tensors.
"""

from __future__ import annotations

import contextlib
import operator
import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _core

if TYPE_CHECKING:
    import torch
    from torch import nn

# model -> weights file (relative to the save directory) -> (keys, tensors) of its last save.
_LAST: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[list[str], list[weakref.ref[Any]]]]] = (
    weakref.WeakKeyDictionary()
)


class _Ahead:
    """One weights file being written (by a Rust thread, no GIL needed) from the tensors its last save
    held."""

    def __init__(self, job: _core.WriteJob, keys: list[str], tensors: list[torch.Tensor]) -> None:
        self.job: _core.WriteJob | None = job
        self.keys, self.tensors = keys, tensors

    def take(self, weights: Mapping[str, torch.Tensor]) -> _core.PendingFile | None:
        """The staged file, if `weights` are the tensors it was written from; else None (discarded)."""
        same = list(weights) == self.keys and all(map(operator.is_, weights.values(), self.tensors))
        pending = self._wait()
        if same:
            return pending
        if pending is not None:
            pending.discard()
        return None

    def discard(self) -> None:
        pending = self._wait()
        if pending is not None:
            pending.discard()

    def _wait(self) -> _core.PendingFile | None:
        job, self.job = self.job, None
        if job is None:
            return None
        # A failure stages nothing: the save then writes the selection itself and meets the error there.
        with contextlib.suppress(Exception):
            return job.wait()
        return None


class WriteAheads:
    """The weights files of one save, started from the model's last save. Use as a context manager:
    whatever was not taken is discarded (and its thread joined) on exit."""

    def __init__(self, model: nn.Module, save_directory: str, weights_files: list[str], fsync: bool) -> None:
        self.model = model
        self._started: dict[str, _Ahead] = {}
        try:
            self._start(save_directory, weights_files, fsync)
        except BaseException:
            self.__exit__()
            raise

    def _start(self, save_directory: str, weights_files: list[str], fsync: bool) -> None:
        from ._tensors import write_records

        last = _LAST.get(self.model, {})
        for relative in weights_files:
            held = last.get(relative)
            if held is None:
                continue
            tensors = [ref() for ref in held[1]]
            alive = [t for t in tensors if t is not None]
            if len(alive) < len(tensors) or any(t.device.type != "cpu" for t in alive):
                continue  # device tensors take the pinned snapshot path (save.stage_weights)
            target = os.path.join(save_directory, relative)
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                records = write_records(dict(zip(held[0], alive, strict=True)))
                job = _core.start_write_safetensors(target, records, {"format": "pt"}, fsync)
            except Exception:  # e.g. a tensor no longer writable: maybe not selected now, nothing to raise
                continue
            self._started[relative] = _Ahead(job, held[0], alive)

    def take(self, relative: str, weights: Mapping[str, torch.Tensor]) -> _core.PendingFile | None:
        ahead = self._started.pop(relative, None)
        return ahead.take(weights) if ahead is not None else None

    def remember(self, relative: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Keep which tensors this file held, for the next save. Only a selection of the model's own
        parameters: other selections (PEFT's, from `state_dict()`) give new tensor objects every time,
        which would never match."""
        from torch import nn

        last = _LAST.setdefault(self.model, {})
        if all(isinstance(t, nn.Parameter) for t in weights.values()):
            last[relative] = (list(weights), [weakref.ref(t) for t in weights.values()])
        else:
            last.pop(relative, None)

    def __enter__(self) -> WriteAheads:
        return self

    def __exit__(self, *exc: object) -> None:
        started, self._started = self._started, {}
        for ahead in started.values():
            ahead.discard()
