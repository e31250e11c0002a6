"""fastadapter: fast, safe LoRA/PEFT adapter I/O with a Rust core.

``fastadapter.save(model, dir)`` is a drop-in for ``PeftModel.save_pretrained`` whose files are
byte-identical to PEFT's; ``fastadapter.convert`` / ``convert_dir`` turn torch ``.bin`` checkpoints into
safetensors without torch and without running their pickles; ``fastadapter.load`` / ``inject`` put LoRA
adapters on any torch model, with or without peft, with outputs equal to PEFT's. Importing fastadapter
imports neither peft nor torch: modules that need torch import it when they are called.
"""

from __future__ import annotations

from ._core import __version__
from .checkpoint import Checkpointer
from .convert import Conversion, ConvertReport, convert, convert_dir
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    FastAdapterError,
    HeaderError,
    KeyPatternError,
    MissingTensorError,
    NotADirectoryPathError,
    TargetModuleError,
    TensorError,
    UnsafeCheckpointError,
    UnsupportedAdapterError,
)
from .load import active_adapters, delete_adapter, inject, load, merge_and_unload, set_adapter, unload
from .save import save

__all__ = [
    "AdapterExistsError",
    "AdapterNotFoundError",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "Conversion",
    "ConvertReport",
    "FastAdapterError",
    "HeaderError",
    "KeyPatternError",
    "MissingTensorError",
    "NotADirectoryPathError",
    "TargetModuleError",
    "TensorError",
    "UnsafeCheckpointError",
    "UnsupportedAdapterError",
    "__version__",
    "active_adapters",
    "convert",
    "convert_dir",
    "delete_adapter",
    "inject",
    "load",
    "merge_and_unload",
    "save",
    "set_adapter",
    "unload",
]
