"""What the patch did: for each patched call, whether fastadapter ran it or the original did, and why.

Every decision is logged on the `fastadapter` logger at DEBUG (`patch(verbose=True)` shows them) and
counted; `fastadapter.patch_report()` returns the counts.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger("fastadapter")


@dataclass
class PatchReport:
    """Counts since `patch()` (or the last `patch_report(reset=True)`): `routed[call]` calls fastadapter
    ran, `fallbacks[(call, reason)]` calls that ran the original code, and why. `call` is the patched
    function's name, e.g. `"PeftModel.save_pretrained"`."""

    routed: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def total_routed(self) -> int:
        return sum(self.routed.values())

    @property
    def total_fallbacks(self) -> int:
        return sum(self.fallbacks.values())

    def fallbacks_of(self, call: str) -> int:
        return sum(n for (c, _), n in self.fallbacks.items() if c == call)

    def __str__(self) -> str:
        lines = [f"fastadapter.patch: {self.total_routed} calls routed, {self.total_fallbacks} fell back"]
        for call in sorted({*self.routed, *(c for c, _ in self.fallbacks)}):
            lines.append(f"  {call}: {self.routed[call]} routed, {self.fallbacks_of(call)} fell back")
            for (c, reason), n in self.fallbacks.most_common():
                if c == call:
                    lines.append(f"    {n:6d}  {reason}")
        return "\n".join(lines)


_LOCK = threading.Lock()
_REPORT = PatchReport()


def routed(call: str) -> None:
    with _LOCK:
        _REPORT.routed[call] += 1
    logger.debug("%s: routed to fastadapter", call)


def fell_back(call: str, reason: str) -> None:
    with _LOCK:
        _REPORT.fallbacks[(call, reason)] += 1
    logger.debug("%s: fell back to the original (%s)", call, reason)


def patch_report(reset: bool = False) -> PatchReport:
    """A copy of the counts of routed and fallen-back calls; `reset=True` also starts them afresh."""
    global _REPORT
    with _LOCK:
        snapshot = PatchReport(Counter(_REPORT.routed), Counter(_REPORT.fallbacks))
        if reset:
            _REPORT = PatchReport()
    return snapshot


# Set while a patched call runs, routed or not: the patched functions it calls in turn (PEFT's
# `from_pretrained` calls `load_adapter`; fastadapter uses transformers' own `load_adapter` for what its
# fast way does not build) run the original and are not counted: the report counts the caller's calls.
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("fastadapter_patch_inside", default=False)


def inside_patched_call() -> bool:
    return _INSIDE.get()


@contextlib.contextmanager
def patched_call() -> Iterator[None]:
    token = _INSIDE.set(True)
    try:
        yield
    finally:
        _INSIDE.reset(token)
