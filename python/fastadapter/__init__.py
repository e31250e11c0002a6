"""fastadapter: fast, safe LoRA/PEFT adapter I/O with a Rust core.

``fastadapter.save(model, dir)`` is a drop-in for ``PeftModel.save_pretrained`` whose files are
byte-identical to PEFT's. Importing fastadapter never imports peft.
"""

from __future__ import annotations

from ._core import __version__
from .errors import (
    AdapterNotFoundError,
    FastAdapterError,
    HeaderError,
    KeyPatternError,
    MissingTensorError,
    NotADirectoryPathError,
    TensorError,
    UnsupportedAdapterError,
)
from .save import save

__all__ = [
    "AdapterNotFoundError",
    "FastAdapterError",
    "HeaderError",
    "KeyPatternError",
    "MissingTensorError",
    "NotADirectoryPathError",
    "TensorError",
    "UnsupportedAdapterError",
    "__version__",
    "save",
]
