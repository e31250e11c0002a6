"""`load` / `inject` pause Python's cyclic GC while they build modules and hand the new modules to its
oldest generation; the caller's setting must always come back, also when the call fails, and nothing of
the caller's may change generation (young garbage is collected, frozen objects stay frozen)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
from peft import get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer

import fastadapter
from fastadapter.layers import LoraLayer
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


def test_the_built_layers_go_to_the_oldest_generation(saved: Path) -> None:
    # So the next allocations after a load do not pay a young-generation scan of them (16 ms after
    # 1024 layers). Left young, they would be in generation 0 or 1 here.
    model = fastadapter.load(tiny_llama(), saved)
    layer = next(m for m in model.modules() if isinstance(m, (LoraLayer, PeftLoraLayer)))
    assert any(o is layer for o in gc.get_objects(generation=2))
    assert fastadapter.active_adapters(model) == ["default"]


def test_the_callers_young_garbage_is_collected_not_promoted(saved: Path) -> None:
    class Node:
        pass

    model = tiny_llama()  # built first: its allocations would trigger a young collection of their own
    cycle = Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    alive = weakref.ref(cycle)
    del cycle
    assert alive() is not None  # only the cyclic collector can free it
    fastadapter.load(model, saved)
    assert alive() is None


def test_objects_the_caller_froze_stay_frozen(saved: Path) -> None:
    def tracked(obj: object) -> bool:  # gc.get_objects() lists the generations, not the frozen objects
        return any(o is obj for o in gc.get_objects())

    mine = [object()]
    gc.freeze()
    try:
        assert not tracked(mine)
        fastadapter.load(tiny_llama(), saved)
        assert not tracked(mine)
    finally:
        gc.unfreeze()
    assert tracked(mine)
