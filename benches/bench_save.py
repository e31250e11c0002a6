"""Saving an adapter, in the three settings a save happens in, each against its own ceiling:

- `new_dir`: every round saves into a directory that did not exist (`checkpoint-500/`, `out/run-3/`);
  the previous round's directory is removed untimed. Ceiling: one `write()` of the same bytes into a
  new file.
- `overwrite`: every round rewrites the same files (a script saving to `out/adapter` again). Ceiling:
  one `write()` of the same bytes over the existing file (`open(..., "wb")`).
- `fsync`: overwrite, durable on return (`fastadapter.save(..., fsync=True)`). Ceiling: the same write
  over the existing file, then `fsync`. PEFT has no durable save: it is not in this group.

Contenders: fastadapter, PEFT's `save_pretrained`, safetensors' `save_file` of the same state dict (its
writer alone). Targets (issue 16): fastadapter within 1.2x of the group's `raw_write`, and at least 1.5x
faster than PEFT in `new_dir` and `overwrite`. `raw_pwritev` is the part of a save no writer of these
tensors can skip: the same file written from the tensors' own memory (no serialisation, no selection)
with one `pwritev` per 1 MiB block of the file, as fastadapter's writer does, into the same kind of
file as `raw_write`. Against `raw_write` it measures what gathering many separate buffers costs the
kernel's copy; against fastadapter, what the selection, temp file, rename and side files add.

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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import fastadapter
from conftest import QUICK, SAFETENSORS_NAME, Adapter, BackgroundLoad, settle

SETTINGS = ("new_dir", "overwrite", "fsync")
CONTENDERS = ("fastadapter", "peft", "safetensors", "raw_write", "raw_pwritev")
BLOCKS = 1 if QUICK else 3
ROUNDS_PER_BLOCK = 1 if QUICK else 3


def contenders(setting: str) -> tuple[str, ...]:
    return tuple(c for c in CONTENDERS if not (setting == "fsync" and c == "peft"))


def schedule() -> list[tuple[str, int, str]]:
    """(setting, block, contender) in run order; each block starts one contender later than the previous."""
    runs = []
    for setting in SETTINGS:
        names = contenders(setting)
        n = len(names)
        runs += [(setting, b, names[(b + i) % n]) for b in range(BLOCKS) for i in range(n)]
    return runs


def writer(contender: str, setting: str, adapter: Adapter, out: Callable[[], Path]) -> Callable[[], None]:
    """The timed call for one contender; `out()` is this round's directory (made by the round's setup for
    the ceiling only: every library creates its own)."""
    fsync = setting == "fsync"
    if contender == "fastadapter":
        return lambda: fastadapter.save(adapter.model, str(out()), fsync=fsync)
    if contender == "peft":
        return lambda: adapter.model.save_pretrained(str(out()))
    if contender == "safetensors":
        # The state dict is computed once: this measures safetensors' writer alone.
        def save() -> None:
            out().mkdir(exist_ok=True)
            save_file(adapter.state_dict, str(out() / SAFETENSORS_NAME), metadata={"format": "pt"})
            if fsync:
                _fsync(out() / SAFETENSORS_NAME)

        return save
    if contender == "raw_write":
        return lambda: _raw_write(out(), adapter.payload, fsync)
    if contender == "raw_pwritev":
        batches = pwritev_batches(adapter)
        return lambda: _raw_pwritev(out(), batches, fsync)
    raise ValueError(f"unknown contender {contender!r}")


# The file's blocks that one pwritev fills, as in fastadapter's writer (rust/core/src/writer.rs: BATCH_BYTES).
BATCH_BYTES = 1 << 20


def pwritev_batches(adapter: Adapter) -> list[tuple[int, list[memoryview]]]:
    """The file `raw_write` writes, as (file offset, buffers) runs of file-adjacent pieces, one run per
    1 MiB block of the file as the writer cuts them: the header from the payload, every tensor's bytes
    from the tensor's own memory."""
    payload = memoryview(adapter.payload)
    header_len = 8 + int.from_bytes(payload[:8], "little")
    header = json.loads(bytes(payload[8:header_len]))
    pieces: list[tuple[int, memoryview]] = [(0, payload[:header_len])]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        data = adapter.state_dict[name].detach().reshape(-1).view(torch.uint8).numpy().data
        assert data == payload[header_len + start : header_len + end], name  # the same bytes, from the tensor
        k = 0
        while k < len(data):
            at = header_len + start + k
            end = min(len(data), k + BATCH_BYTES - at % BATCH_BYTES)  # cut at the file's block boundaries
            pieces.append((at, data[k:end]))
            k = end
    pieces.sort(key=lambda p: p[0])
    batches: list[tuple[int, list[memoryview]]] = []
    size = 0
    for offset, data in pieces:
        last = batches[-1] if batches else None
        if last is not None and offset // BATCH_BYTES == last[0] // BATCH_BYTES and offset == last[0] + size:
            last[1].append(data)
            size += len(data)
        else:
            batches.append((offset, [data]))
            size = len(data)
    return batches


def _raw_pwritev(directory: Path, batches: list[tuple[int, list[memoryview]]], fsync: bool) -> None:
    directory.mkdir(exist_ok=True)
    fd = os.open(directory / SAFETENSORS_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset, buffers in batches:
            written = os.pwritev(fd, buffers, offset)
            assert written == sum(len(b) for b in buffers)  # regular files: no short writes here
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _raw_write(directory: Path, payload: bytes, fsync: bool, name: str = SAFETENSORS_NAME) -> None:
    directory.mkdir(exist_ok=True)
    with open(directory / name, "wb") as f:
        f.write(payload)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Rounds:
    """Where each round writes: a fresh directory per round (`new_dir`, the previous one removed untimed)
    or always the same one (the other settings)."""

    def __init__(self, root: Path, fresh: bool) -> None:
        self.root, self.fresh, self.n = root, fresh, 0

    def current(self) -> Path:
        return self.root / f"r{self.n}" if self.fresh else self.root

    def setup(self) -> None:
        if self.fresh:
            shutil.rmtree(self.current(), ignore_errors=True)
            self.n += 1
        settle()


@pytest.mark.parametrize(
    ("setting", "block", "contender"), schedule(), ids=[f"{s}-b{b}-{c}" for s, b, c in schedule()]
)
def test_save(
    benchmark: Any, adapter: Adapter, out_root: Path, setting: str, block: int, contender: str
) -> None:
    root = out_root / setting / contender
    root.mkdir(parents=True, exist_ok=True)
    rounds = Rounds(root, fresh=setting == "new_dir")
    write = writer(contender, setting, adapter, rounds.current)
    write()  # the warm-up round; in block 0 it also creates the files the overwrite rounds replace
    benchmark.group = f"save {adapter.name} ({setting})"
    benchmark.extra_info.update(
        contender=contender,
        adapter=adapter.name,
        setting=setting,
        block=block,
        bytes=adapter.nbytes,
        tensors=adapter.tensors,
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(write, setup=rounds.setup, rounds=ROUNDS_PER_BLOCK, iterations=1)
    benchmark.extra_info["background_cpu"] = load.stop()
    if contender == "fastadapter" and block == 0:
        assert_same_as_peft(rounds.current(), adapter.reference_dir)


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
