"""Every patch test starts with empty counts and leaves PEFT and transformers unpatched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import fastadapter


@pytest.fixture(autouse=True)
def unpatched_after() -> Iterator[None]:
    fastadapter.patch_report(reset=True)
    yield
    fastadapter.unpatch()
