"""Saving an adapter: fastadapter vs PEFT vs safetensors' writer vs one raw write of the same bytes.

Every contender rewrites the same files in its own directory each round, the pattern of periodic
checkpoints; all of them pay the same overwrite cost. `raw_write` is the ceiling: one buffered write of
a preallocated buffer the size of the adapter file, no serialisation at all.

`raw_write_fallocate` is the same write into a file first extended with `posix_fallocate`. On ext4 this
matters more than anything a serialiser does: truncating or renaming over a file that holds delayed
allocations makes ext4 submit the new file's writeback synchronously in close()/rename() (the
`auto_da_alloc` heuristic), while data written into preallocated extents is left dirty in the page cache.
Keeping both raw variants in every run shows how much of a contender's time is that effect.

Noise on the shared 2-core machine comes in phases lasting seconds (other jobs, page-cache and host
memory churn), so the rounds are split into blocks that interleave the contenders, with the order
rotated per block: a slow phase lands on all of them. compare.py pools a contender's blocks.
Every round starts after `settle()` (conftest), untimed: the previous checkpoint is on disk, as it would be
after the training steps between two saves, and one contender's dirty pages (or fastadapter's background
release of the file it replaced) never slow the next.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

import fastadapter
from conftest import SAFETENSORS_NAME, Adapter, BackgroundLoad, settle

CONTENDERS = ("fastadapter", "peft", "safetensors", "raw_write", "raw_write_fallocate")
BLOCKS = 3
ROUNDS_PER_BLOCK = 2


def schedule() -> list[tuple[int, str]]:
    """(block, contender) in run order; each block starts one contender later than the previous."""
    n = len(CONTENDERS)
    return [(b, CONTENDERS[(b + i) % n]) for b in range(BLOCKS) for i in range(n)]


def writer(contender: str, adapter: Adapter, out: Path) -> Callable[[], None]:
    """The timed call for one contender; everything it needs is prepared here, outside the timing."""
    path = out / SAFETENSORS_NAME
    if contender == "fastadapter":
        return lambda: fastadapter.save(adapter.model, str(out))
    if contender == "peft":
        return lambda: adapter.model.save_pretrained(str(out))
    if contender == "safetensors":
        # The state dict is computed once: this measures safetensors' writer alone.
        return lambda: save_file(adapter.state_dict, str(path), metadata={"format": "pt"})
    if contender == "raw_write":
        return lambda: _raw_write(path, adapter.payload)
    if contender == "raw_write_fallocate":
        return lambda: _raw_write(path, adapter.payload, preallocate=True)
    raise ValueError(f"unknown contender {contender!r}")


def _raw_write(path: Path, payload: bytes, preallocate: bool = False) -> None:
    with open(path, "wb") as f:
        if preallocate:
            os.posix_fallocate(f.fileno(), 0, len(payload))
        f.write(payload)


@pytest.mark.parametrize(("block", "contender"), schedule(), ids=[f"b{b}-{c}" for b, c in schedule()])
def test_save(benchmark: Any, adapter: Adapter, out_root: Path, block: int, contender: str) -> None:
    out = out_root / contender
    out.mkdir(exist_ok=True)
    write = writer(contender, adapter, out)
    try:
        write()  # the warm-up round; in block 0 it also creates the files the timed rounds overwrite
    except NotImplementedError:
        pytest.skip(f"{contender}: not implemented yet")
    benchmark.group = adapter.name
    benchmark.extra_info.update(
        contender=contender, adapter=adapter.name, block=block, bytes=adapter.nbytes, tensors=adapter.tensors
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(write, setup=settle, rounds=ROUNDS_PER_BLOCK, iterations=1)
    benchmark.extra_info["background_cpu"] = load.stop()
    if contender == "fastadapter" and block == 0:
        assert_same_as_peft(out, adapter.reference_dir)


def assert_same_as_peft(ours: Path, peft: Path) -> None:
    """Outside the timing: a fast save is worthless unless it writes PEFT's exact bytes."""
    assert (ours / SAFETENSORS_NAME).read_bytes() == (peft / SAFETENSORS_NAME).read_bytes(), (
        "adapter_model.safetensors differs from PEFT's"
    )
    assert _config(ours) == _config(peft), "adapter_config.json differs from PEFT's"


def _config(directory: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((directory / "adapter_config.json").read_text())
    # A set in PEFT: its list order depends on the hash seed.
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config
