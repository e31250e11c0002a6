"""fastadapter: fast, safe LoRA/PEFT adapter I/O with a Rust core.

``fastadapter.save(model, dir)`` is a drop-in for ``save_pretrained`` whose files are byte-identical to
PEFT's and transformers'; ``fastadapter.load`` puts a saved adapter on a PeftModel, a transformers model
(through its own adapter integration) or any torch model; ``fastadapter.convert`` / ``convert_dir`` turn
torch ``.bin`` checkpoints into safetensors without torch and without running their pickles.

Importing fastadapter imports neither torch nor peft: each public name is imported from its module on
first use (PEP 562), so the torch-free conversion API and CLI never pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    UnsupportedTargetError,
)
from .integrations.patch import PatchReport, patch, patch_report, patched, unpatch
from .save import save

if TYPE_CHECKING:
    from ._hotswap import hotswap, prepare_for_hotswap
    from .adapters import active_adapters, delete_adapter, inject, load, merge_and_unload, set_adapter, unload

# Loading and managing adapters needs torch: these names come from `adapters` on first use (PEP 562).
_ADAPTER_FUNCTIONS = frozenset(
    ("active_adapters", "delete_adapter", "inject", "load", "merge_and_unload", "set_adapter", "unload")
)


_HOTSWAP_FUNCTIONS = frozenset(("hotswap", "prepare_for_hotswap"))


def __getattr__(name: str) -> Any:
    if name in _ADAPTER_FUNCTIONS:
        return getattr(importlib.import_module(".adapters", __name__), name)
    if name in _HOTSWAP_FUNCTIONS:
        return getattr(importlib.import_module("._hotswap", __name__), name)
    raise AttributeError(f"module 'fastadapter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ADAPTER_FUNCTIONS, *_HOTSWAP_FUNCTIONS})


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
    "PatchReport",
    "TargetModuleError",
    "TensorError",
    "UnsafeCheckpointError",
    "UnsupportedAdapterError",
    "UnsupportedTargetError",
    "__version__",
    "active_adapters",
    "convert",
    "convert_dir",
    "delete_adapter",
    "hotswap",
    "inject",
    "load",
    "merge_and_unload",
    "patch",
    "patch_report",
    "patched",
    "prepare_for_hotswap",
    "save",
    "set_adapter",
    "unload",
    "unpatch",
]
