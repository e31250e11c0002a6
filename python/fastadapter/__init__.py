"""fastadapter: fast, safe LoRA/PEFT adapter I/O with a Rust core.

``fastadapter.save(model, dir)`` is a drop-in for ``PeftModel.save_pretrained`` whose files are
byte-identical to PEFT's; ``fastadapter.convert`` / ``convert_dir`` turn torch ``.bin`` checkpoints into
safetensors without torch and without running their pickles. Importing fastadapter imports neither peft
nor torch: modules that need torch import it when they are called.
"""

from __future__ import annotations

from ._core import __version__
from .convert import Conversion, ConvertReport, convert, convert_dir
from .errors import (
    AdapterNotFoundError,
    CheckpointError,
    FastAdapterError,
    HeaderError,
    KeyPatternError,
    MissingTensorError,
    NotADirectoryPathError,
    TensorError,
    UnsafeCheckpointError,
    UnsupportedAdapterError,
)
from .save import save

__all__ = [
    "AdapterNotFoundError",
    "CheckpointError",
    "Conversion",
    "ConvertReport",
    "FastAdapterError",
    "HeaderError",
    "KeyPatternError",
    "MissingTensorError",
    "NotADirectoryPathError",
    "TensorError",
    "UnsafeCheckpointError",
    "UnsupportedAdapterError",
    "__version__",
    "convert",
    "convert_dir",
    "save",
]
