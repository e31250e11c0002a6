"""Checkpointing inside a training loop: how long does the loop stall per save, and how fast do
checkpoints reach the page cache when saved back to back?

Stall: a simulated training loop (a fixed matmul workload per step) saves the Llama-shaped adapter
every `STEPS_PER_SAVE` steps; the timed call is the save alone, the steps run untimed between rounds.
Contenders: fastadapter's Checkpointer (async, the default; with fsync; and sync), PEFT
save_pretrained, safetensors save_file, torch.save, and two ceilings: one `memcpy` (ctypes.memmove,
a single call) of the saved bytes into a preallocated buffer, which is what an async save must cost at
least, and the same copy by torch (`copy_`, which may use several threads).

Throughput: `SAVES_BACK_TO_BACK` checkpoints saved with no work between them and waited for, against
`page_cache_write`: the same number of files of the same size written with one `write()` each into new
files (the old ones deleted as `keep_last=2` does), no serialisation at all. Both without fsync:
the page cache is the ceiling being compared with, not the disk.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from conftest import SAFETENSORS_NAME, BackgroundLoad, build_peft_model
from fastadapter import Checkpointer

STALL_CONTENDERS = (
    "fastadapter",
    "fastadapter_fsync",
    "fastadapter_sync",
    "peft",
    "safetensors",
    "torch_save",
    "memcpy",
    "torch_copy",
)
STEPS_PER_SAVE = 4
ROUNDS = 4
SAVES_BACK_TO_BACK = 4
BLOCKS = 2


class Workload:
    """A fixed amount of compute standing in for training steps."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(512, 512, generator=gen)

    def steps(self, n: int) -> None:
        x = self.a
        for _ in range(n * 8):
            x = torch.tanh(x @ self.a)


class Setup:
    def __init__(self, root: Path) -> None:
        self.model = build_peft_model("llama")
        self.state_dict = get_peft_model_state_dict(self.model)
        self.root = root
        self.workload = Workload()
        reference = root / "reference"
        self.model.save_pretrained(str(reference))
        self.payload = (reference / SAFETENSORS_NAME).read_bytes()
        self.nbytes = len(self.payload)
        self.tensors = len(self.state_dict)
        self.steps = itertools.count(1)


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    root = Path(tempfile.mkdtemp(prefix="fastadapter-bench-ckpt-"))
    try:
        yield Setup(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stall_call(contender: str, s: Setup) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """(the timed save, what to wait for between saves, a cleanup to run after the rounds)."""
    out = s.root / contender
    out.mkdir(exist_ok=True)
    if contender.startswith("fastadapter"):
        ck = Checkpointer(
            out,
            keep_last=2,
            fsync=contender == "fastadapter_fsync",
            async_save=contender != "fastadapter_sync",
        )
        return (lambda: ck.save(next(s.steps), s.model)), ck.wait, ck.close
    if contender == "peft":
        return (lambda: s.model.save_pretrained(str(out))), _nothing, _nothing
    if contender == "safetensors":

        def write() -> None:
            save_file(s.state_dict, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})

        return write, _nothing, _nothing
    if contender == "torch_save":
        return (lambda: torch.save(s.state_dict, str(out / "adapter_model.bin"))), _nothing, _nothing
    src = torch.frombuffer(bytearray(s.payload), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.fill_(1)  # fault the pages in: a reused buffer is warm
    if contender == "memcpy":

        def memcpy() -> None:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), s.nbytes)

        return memcpy, _nothing, _nothing
    if contender == "torch_copy":

        def copy() -> None:
            dst.copy_(src)

        return copy, _nothing, _nothing
    raise ValueError(f"unknown contender {contender!r}")


def _nothing() -> None:
    pass


def schedule() -> list[tuple[int, str]]:
    n = len(STALL_CONTENDERS)
    return [(b, STALL_CONTENDERS[(b + i) % n]) for b in range(BLOCKS) for i in range(n)]


@pytest.mark.parametrize(("block", "contender"), schedule(), ids=[f"b{b}-{c}" for b, c in schedule()])
def test_stall(benchmark: Any, setup: Setup, block: int, contender: str) -> None:
    save, settle, done = stall_call(contender, setup)
    benchmark.group = "checkpoint stall per save (llama adapter)"
    benchmark.extra_info.update(contender=contender, block=block, bytes=setup.nbytes, tensors=setup.tensors)
    load = BackgroundLoad()
    load.start()
    try:
        # Untimed before each save: the previous checkpoint finished and on disk (saves are minutes
        # apart in a real run; a save that waits for the previous one is back-pressure, measured by
        # the throughput test), then the training steps.
        benchmark.pedantic(
            save,
            setup=lambda: between_saves(setup, settle),
            rounds=ROUNDS,
            iterations=1,
            warmup_rounds=1,
        )
    finally:
        done()
    benchmark.extra_info["background_cpu"] = load.stop()


def between_saves(s: Setup, settle: Callable[[], None]) -> None:
    settle()
    os.sync()
    s.workload.steps(STEPS_PER_SAVE)


@pytest.mark.parametrize("contender", ["fastadapter", "page_cache_write"])
@pytest.mark.parametrize("block", range(BLOCKS))
def test_throughput(benchmark: Any, setup: Setup, block: int, contender: str) -> None:
    out = setup.root / f"tp-{contender}"
    out.mkdir(exist_ok=True)
    if contender == "fastadapter":
        ck = Checkpointer(out, keep_last=2, fsync=False, max_pending=2)

        def run() -> None:
            for _ in range(SAVES_BACK_TO_BACK):
                ck.save(next(setup.steps), setup.model)
            ck.wait()

    else:
        counter = itertools.count()

        def run() -> None:
            for _ in range(SAVES_BACK_TO_BACK):
                k = next(counter)
                with open(out / f"f{k}", "wb") as f:
                    f.write(setup.payload)
                old = out / f"f{k - 2}"
                if old.exists():
                    old.unlink()

    benchmark.group = f"checkpoint throughput ({SAVES_BACK_TO_BACK} saves back to back)"
    benchmark.extra_info.update(
        contender=contender, block=block, bytes=setup.nbytes * SAVES_BACK_TO_BACK, tensors=setup.tensors
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(run, setup=os.sync, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["background_cpu"] = load.stop()
