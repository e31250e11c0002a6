"""`load` / `inject` pause Python's cyclic GC while they build modules; the caller's setting must always
come back, also when the call fails."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from peft import get_peft_model

import fastadapter
from helpers import lora_config, tiny_llama


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    get_peft_model(tiny_llama(), lora_config()).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_gc_is_enabled_again_after_load_and_inject(saved: Path) -> None:
    assert gc.isenabled()
    fastadapter.load(tiny_llama(), saved)
    assert gc.isenabled()
    fastadapter.inject(tiny_llama(), lora_config())
    assert gc.isenabled()


def test_gc_is_enabled_again_after_a_failed_load(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fastadapter.load(tiny_llama(), tmp_path / "missing")
    assert gc.isenabled()


def test_a_caller_who_disabled_gc_keeps_it_disabled(saved: Path) -> None:
    gc.disable()
    try:
        fastadapter.load(tiny_llama(), saved)
        assert not gc.isenabled()
    finally:
        gc.enable()
