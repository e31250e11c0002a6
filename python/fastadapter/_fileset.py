"""Writing a set of files so that a failure leaves the previous set untouched.

Every file is first staged as a hidden temp file beside its target; only when all of them are written
are they renamed into place, one after the other. A failure while staging discards every temp file;
the old files were never touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from . import _core
from .errors import SharedStorageError


class Staged(Protocol):
    def commit(self) -> None: ...
    def discard(self) -> None: ...


class StagedByCallback:
    """A file produced by a Python writer (e.g. `torch.save`) into a private temp directory beside the
    target. The temp file gets the target's own name there, because torch.save names the archive's
    root folder after the file."""

    def __init__(self, target: str, write: Callable[[str], None]) -> None:
        self.target = target
        self._dir: str | None = tempfile.mkdtemp(prefix=".fastadapter-", dir=os.path.dirname(target) or ".")
        try:
            self._path = os.path.join(self._dir, os.path.basename(target))
            write(self._path)
            os.chmod(self._path, 0o666 & ~_current_umask())
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        assert self._dir is not None, "already committed or discarded"
        os.replace(self._path, self.target)
        self.discard()

    def discard(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def hidden_temp_path(directory: str, name: str) -> str:
    """`directory/.<name>.tmp-<pid>-<16 hex digits>`: where a file or directory called `name` is written
    before it is renamed into place. The Rust core names its temp files and staging directories the same
    way, and its stale-staging cleanup reads the pid from that name (a dead writer's leftovers go)."""
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")


def remove_stale_temps(directory: str, name: str) -> None:
    """Temp files and staging directories of earlier writes of `name` (`hidden_temp_path`) whose writer is
    gone (killed, or its save failed on another rank): never published, so never read; this frees their
    space. One of a live process on this host is left alone: it may still be writing."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(directory):
        pid, _, token = entry.removeprefix(prefix).partition("-")
        if not entry.startswith(prefix) or not pid.isdigit() or len(token) != 16 or _alive(int(pid)):
            continue
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_shared(path: str, rank: int, remedy: str) -> None:
    """Raise `SharedStorageError` unless `path`, which the coordinating rank has just created under a
    name no other file has, exists for this rank too: where it does not, the ranks do not share the file
    system (another node's disk), and writing there would create a stray file instead."""
    if not os.path.exists(path):
        raise SharedStorageError(
            errno.ENOENT,
            f"rank {rank} cannot see what the coordinating rank created: the ranks do not share this file "
            f"system; {remedy}",
            path,
        )


def _current_umask() -> int:
    # os.umask can only be read by setting it; /proc reports it without a race (Linux).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class FileSet:
    """Context manager: stage files with `add`, commit them all on success, discard them all on error."""

    def __init__(self) -> None:
        self._staged: list[Staged] = []
        self._large: list[Staged] = []

    def add(self, staged: Staged, *, large: bool = False) -> None:
        """`large` files (weights) are committed after the others. Renaming a file over an existing one
        makes ext4 start writing the new file back inside the rename (`auto_da_alloc`), and the next
        rename on that file system waits for the journal: an `adapter_config.json` renamed right after
        its weights took about as long as the weights' own rename. Renamed last, the weights leave that
        wait to whatever touches the file system next, not to this save."""
        (self._large if large else self._staged).append(staged)

    def stage_bytes(self, target: str, data: bytes, fsync: bool = False) -> None:
        self.add(_core.stage_bytes(target, data, fsync))

    def __enter__(self) -> FileSet:
        return self

    def commit(self) -> None:
        """Rename every staged file into place, in the order staged, the large ones last; whatever is left
        is discarded."""
        staged, self._staged, self._large = [*self._staged, *self._large], [], []
        try:
            for s in staged:
                s.commit()
        finally:
            for s in staged:
                s.discard()

    def discard(self) -> None:
        staged, self._staged, self._large = [*self._staged, *self._large], [], []
        for s in staged:
            s.discard()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.commit()
