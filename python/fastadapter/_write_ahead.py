"""A repeated save of the same adapter starts writing its weights file before its tensors are selected.

Training saves the same model every N steps. Selecting the adapter's tensors (a walk of every module)
and writing them (the kernel copying the bytes) take turns on one thread, although the writer releases
the GIL. So `fastadapter.save` remembers which tensors each weights file held (their keys and the
tensor objects, weakly) and, on the next save of that model, writes a file from those tensors on a
second thread while the selection runs. The file is kept only if the selection then gives the same
keys with the very same tensor objects: its bytes are then exactly what writing the selection would
give (the records were taken from those objects at the start of this save, and nothing ran between but
the selection). Otherwise it is discarded and the selection written as usual: nothing is trusted that
was not compared, and a changed model costs one extra write of its old tensors.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
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
    """One weights file being written from the tensors its last save held."""

    def __init__(self, target: str, keys: list[str], tensors: list[torch.Tensor], fsync: bool) -> None:
        from ._tensors import write_records

        self.keys, self.tensors = keys, tensors
        records = write_records(dict(zip(keys, tensors, strict=True)))
        self.pending: _core.PendingFile | None = None
        self._thread = threading.Thread(
            target=self._write, args=(target, records, fsync), name="fastadapter-write-ahead", daemon=True
        )
        self._thread.start()

    def _write(self, target: str, records: list[Any], fsync: bool) -> None:
        # A failure stages nothing: the save then writes the selection itself and meets the error there.
        with contextlib.suppress(Exception):
            self.pending = _core.write_safetensors(target, records, {"format": "pt"}, fsync)

    def take(self, weights: Mapping[str, torch.Tensor]) -> _core.PendingFile | None:
        """The staged file, if `weights` are the tensors it was written from; else None (discarded)."""
        self._thread.join()
        same = list(weights) == self.keys and all(map(operator.is_, weights.values(), self.tensors))
        pending, self.pending = self.pending, None
        if same and pending is not None:
            return pending
        if pending is not None:
            pending.discard()
        return None

    def discard(self) -> None:
        self._thread.join()
        if self.pending is not None:
            self.pending.discard()
            self.pending = None


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
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self._started[relative] = _Ahead(target, held[0], alive, fsync)

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
