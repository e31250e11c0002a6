"""Where the patch goes in, and putting it in and taking it out.

A site is one function of peft or transformers (`PeftModel.save_pretrained`, ...). Patching replaces it
on its owner (the class or module that defines it) with a function built from the original; unpatching
puts the original object itself back. A site whose module is not imported yet is patched the moment its
module finishes executing (a `sys.meta_path` finder wraps that module's loader), so `patch()` works
whether peft and transformers are imported before or after it, and `import fastadapter` imports neither.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ._patch_report import inside_patched_call, logger, patched_call


@dataclass(frozen=True)
class Site:
    module: str  # the module that defines the owner, e.g. "peft.peft_model"
    owner: str  # a class of that module, or "" for a module-level function
    attr: str
    builder: str  # "module:function" of fastadapter that builds the replacement from the original
    # The original's parameter names, in order: a peft/transformers whose function differs is left alone.
    parameters: tuple[str, ...]

    @property
    def call(self) -> str:
        return f"{self.owner}.{self.attr}" if self.owner else self.attr


_PEFT = "fastadapter.integrations._patch_peft"
_TRANSFORMERS = "fastadapter.integrations._patch_transformers"
SITES: tuple[Site, ...] = (
    Site(
        "peft.peft_model",
        "PeftModel",
        "save_pretrained",
        f"{_PEFT}:save_pretrained",
        (
            "self",
            "save_directory",
            "safe_serialization",
            "selected_adapters",
            "save_embedding_layers",
            "is_main_process",
            "path_initial_model_for_weight_conversion",
            "kwargs",
        ),
    ),
    Site(
        "peft.peft_model",
        "PeftModel",
        "from_pretrained",
        f"{_PEFT}:from_pretrained",
        (
            "cls",
            "model",
            "model_id",
            "adapter_name",
            "is_trainable",
            "config",
            "autocast_adapter_dtype",
            "ephemeral_gpu_offload",
            "low_cpu_mem_usage",
            "key_mapping",
            "kwargs",
        ),
    ),
    Site(
        "peft.peft_model",
        "PeftModel",
        "load_adapter",
        f"{_PEFT}:load_adapter",
        (
            "self",
            "model_id",
            "adapter_name",
            "is_trainable",
            "torch_device",
            "autocast_adapter_dtype",
            "ephemeral_gpu_offload",
            "low_cpu_mem_usage",
            "key_mapping",
            "kwargs",
        ),
    ),
    Site(
        "peft.utils.hotswap",
        "",
        "hotswap_adapter",
        f"{_PEFT}:hotswap_adapter",
        ("model", "model_name_or_path", "adapter_name", "torch_device", "kwargs"),
    ),
    Site(
        "transformers.integrations.peft",
        "PeftAdapterMixin",
        "load_adapter",
        f"{_TRANSFORMERS}:load_adapter",
        (
            "self",
            "peft_model_id",
            "adapter_name",
            "peft_config",
            "adapter_state_dict",
            "low_cpu_mem_usage",
            "is_trainable",
            "hotswap",
            "local_files_only",
            "adapter_kwargs",
            "load_config",
            "kwargs",
        ),
    ),
    Site(
        "transformers.modeling_utils",
        "PreTrainedModel",
        "save_pretrained",
        f"{_TRANSFORMERS}:save_pretrained",
        (
            "self",
            "save_directory",
            "is_main_process",
            "state_dict",
            "push_to_hub",
            "max_shard_size",
            "variant",
            "token",
            "save_peft_format",
            "save_original_format",
            "distributed_checkpoint",
            "kwargs",
        ),
    ),
)

_LOCK = threading.RLock()
_active = False
# site -> (owner object, the original as stored on the owner: a classmethod stays a classmethod)
_applied: dict[Site, tuple[Any, Any]] = {}


def originals() -> dict[str, Any]:
    """The original function of every patched site, by call name (`"PeftModel.save_pretrained"`): what
    the patch falls back to, for callers that want the unpatched behaviour (the PEFT-suite shadow saves)."""
    with _LOCK:
        return {site.call: _unwrapped(raw) for site, (_, raw) in _applied.items()}


def is_patched() -> bool:
    return _active


def apply_all() -> None:
    """Patch every site whose module is imported; the others when their module is imported."""
    global _active
    with _LOCK:
        if _active:
            return
        _active = True
        for module in {site.module for site in SITES}:
            if module in sys.modules:
                _apply_module(module)
        if any(site not in _applied for site in SITES) and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def restore_all() -> None:
    """Put back every original object, exactly as it was on its owner."""
    global _active
    with _LOCK:
        _active = False
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        for owner_and_raw, site in [(v, k) for k, v in _applied.items()]:
            owner, raw = owner_and_raw
            setattr(owner, site.attr, raw)
        _applied.clear()


def _apply_module(module_name: str) -> None:
    module = sys.modules[module_name]
    for site in SITES:
        if site.module == module_name and site not in _applied:
            _apply(site, module)


def _apply(site: Site, module: ModuleType) -> None:
    owner: Any = getattr(module, site.owner, None) if site.owner else module
    raw = None if owner is None else vars(owner).get(site.attr)
    if raw is None:
        logger.warning("fastadapter.patch: %s not found in %s; not patched", site.call, site.module)
        return
    parameters = tuple(inspect.signature(_unwrapped(raw)).parameters)
    if parameters != site.parameters:
        logger.warning(
            "fastadapter.patch: %s has parameters %s, unlike the version fastadapter knows; not patched",
            site.call,
            parameters,
        )
        return
    module_name, _, function = site.builder.partition(":")
    build: Callable[[Any, str], Any] = getattr(importlib.import_module(module_name), function)
    setattr(owner, site.attr, _guarded(raw, build(raw, site.call)))
    _applied[site] = (owner, raw)


def _guarded(raw: Any, replacement: Any) -> Any:
    """`replacement`, except inside another patched call (routed or fallen back): then the original,
    uncounted."""
    if isinstance(raw, classmethod):
        return classmethod(_guarded(raw.__func__, replacement.__func__))
    original = raw

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        if inside_patched_call():
            return original(*args, **kwargs)
        with patched_call():
            return replacement(*args, **kwargs)

    return patched


def _unwrapped(raw: Any) -> Any:
    return raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module that holds sites, it wraps the loader the other finders return,
    so that the sites are patched as soon as the module has executed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not _active or not any(site.module == fullname and site not in _applied for site in SITES):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = (
                find_spec(fullname, path, target) if find_spec is not None else None
            )
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        created: ModuleType | None = self.loader.create_module(spec)
        return created

    def exec_module(self, module: ModuleType) -> None:
        # The module sees its own loader, not this wrapper (tools read __loader__ for sources).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        with _LOCK:
            if _active:
                _apply_module(module.__name__)
            if not any(site not in _applied for site in SITES) and _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


_FINDER = _PatchOnImport()
