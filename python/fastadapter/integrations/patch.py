"""`fastadapter.patch()`: PEFT's and transformers' own adapter calls, run by fastadapter.

While patched, these calls go through fastadapter when it supports them, with the same signature,
return value, side effects, warnings, exceptions and files as the original:

- `PeftModel.save_pretrained` -> `fastadapter.save`;
- `PeftModel.from_pretrained` and `PeftModel.load_adapter` (a new adapter name) -> fastadapter's load,
  with PEFT's semantics (`load_adapter` leaves the active adapter as it was and returns the load result);
- transformers' `PreTrainedModel.load_adapter` and adapter-only `save_pretrained`;
- `peft.utils.hotswap.hotswap_adapter` -> `fastadapter.hotswap`, with PEFT's bookkeeping (the adapter's
  config and `lora_alpha` stay as they were; only the weights and the scaling change).

Each call first decides, before anything is changed, whether fastadapter supports it (method, options,
files, model); if not, the original runs. `patch_report()` counts both, with the reasons; the
`fastadapter` logger says at DEBUG which path each call took (`patch(verbose=True)` prints it).
Trainer's adapter checkpoints go through the same calls. Nothing here imports torch, peft or
transformers: sites are patched when their modules are imported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ._patch_report import PatchReport, logger, patch_report
from ._patch_sites import apply_all, is_patched, restore_all

__all__ = ["PatchReport", "is_patched", "patch", "patch_report", "patched", "unpatch"]

_verbose_handler: logging.Handler | None = None


def patch(verbose: bool = False) -> None:
    """Route PEFT's and transformers' adapter save/load calls through fastadapter (idempotent).
    `verbose=True`: log, for each call, which path ran and why (the `fastadapter` logger at DEBUG, to
    stderr)."""
    global _verbose_handler
    apply_all()
    if verbose and _verbose_handler is None:
        _verbose_handler = logging.StreamHandler()
        _verbose_handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(_verbose_handler)
        logger.setLevel(logging.DEBUG)


def unpatch() -> None:
    """Put every original function back (the very objects `patch()` replaced)."""
    global _verbose_handler
    restore_all()
    if _verbose_handler is not None:
        logger.removeHandler(_verbose_handler)
        logger.setLevel(logging.NOTSET)
        _verbose_handler = None


@contextlib.contextmanager
def patched(verbose: bool = False) -> Iterator[None]:
    """`patch()` for the duration of a `with` block; it unpatches on exit unless already patched before."""
    was = is_patched()
    patch(verbose=verbose)
    try:
        yield
    finally:
        if not was:
            unpatch()
