"""The exceptions fastadapter raises itself.

Every class derives from :class:`FastAdapterError` *and* from the built-in exception that fits, so code
written for PEFT (which raises ``ValueError``) keeps working, and ``except FastAdapterError`` catches
everything that is ours. Operating-system failures are plain ``OSError`` subclasses
(``FileNotFoundError``, ``PermissionError``, ...) with ``filename`` set.
"""

from __future__ import annotations

__all__ = [
    "AdapterExistsError",
    "AdapterNotFoundError",
    "CheckpointError",
    "ConfigError",
    "FastAdapterError",
    "HeaderError",
    "KeyPatternError",
    "MissingTensorError",
    "NotADirectoryPathError",
    "RankFailedError",
    "SharedStorageError",
    "TargetModuleError",
    "TensorError",
    "UnsafeCheckpointError",
    "UnsupportedAdapterError",
    "UnsupportedTargetError",
    "WorldSizeError",
]


class FastAdapterError(Exception):
    """Base class of every error raised by fastadapter itself."""


class HeaderError(FastAdapterError, ValueError):
    """A safetensors file is malformed (bad header, offsets, sizes); the message names the file."""


class TensorError(FastAdapterError, ValueError):
    """A tensor cannot be written or read as asked (wrong size, duplicate name, unknown dtype)."""


class MissingTensorError(TensorError, KeyError):
    """A tensor that must be present in a file is not there; the message names it and the file."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class KeyPatternError(FastAdapterError, ValueError):
    """A key selection/rename pattern is not a valid regular expression."""


class CheckpointError(FastAdapterError, ValueError):
    """A torch.save checkpoint is malformed or unsupported (bad zip, legacy format, big-endian, pickle)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for something `torch.load(weights_only=True)` would refuse (a global such
    as `os.system`, a disallowed opcode). It was refused, never executed; the message names it."""


class AdapterNotFoundError(FastAdapterError, ValueError):
    """The model has no adapter, or not the one that was named."""


class UnsupportedAdapterError(FastAdapterError, ValueError):
    """The adapter uses a method or option fastadapter does not handle (named in the message)."""


class NotADirectoryPathError(FastAdapterError, NotADirectoryError, ValueError):
    """A path that must be a directory is an existing file."""


class ConfigError(FastAdapterError, ValueError):
    """An adapter config is malformed (a field has the wrong type or value); the message names the field."""


class AdapterExistsError(FastAdapterError, ValueError):
    """The model already has an adapter of that name."""


class TargetModuleError(FastAdapterError, ValueError):
    """An adapter targets a module the model does not have, or one fastadapter cannot adapt."""


class UnsupportedTargetError(TargetModuleError, UnsupportedAdapterError):
    """An adapter targets a kind of layer fastadapter does not adapt (e.g. `nn.MultiheadAttention`): refused
    before the model is touched. Both a `TargetModuleError` and an `UnsupportedAdapterError`."""


class SharedStorageError(FastAdapterError, FileNotFoundError):
    """A rank cannot see the directory the coordinator created for a consolidated distributed checkpoint:
    the ranks do not share a file system. `fastadapter.dcp.StorageWriter(path, consolidate=False)` writes
    per-rank files instead."""


class RankFailedError(FastAdapterError, RuntimeError):
    """A save that every rank takes part in (`fastadapter.save` of an FSDP2-sharded adapter, each rank
    writing its own slices) failed on another rank; the message names that rank and its error. The
    failing rank raises its own error, and the previous files are left as they were."""


class WorldSizeError(FastAdapterError, ValueError):
    """A per-rank checkpoint (every rank's own state dict) is loaded by a job of another world size than
    the one that saved it: each rank reads the part its own rank wrote. The message names the checkpoint
    and both sizes."""
