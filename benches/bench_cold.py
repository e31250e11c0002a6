"""Cold loads: an adapter whose file is not in the page cache, loaded until every weight is resident,
against PEFT and against the fastest plain read of the same file found in the same run.

Two PEFT-written adapters: `llama` (4 Llama-7B layers, r=64 on the 7 projections: 80 MB, 56 tensors)
and `many` (512 x Linear(1024), r=64: 268 MB, 1024 tensors). Before every round the file's pages are
dropped: `os.sync()`, then `posix_fadvise(POSIX_FADV_DONTNEED)` on the file, and `echo 1 >
/proc/sys/vm/drop_caches` too when it is writable and this process holds the benchmark lock (run as
`flock /tmp/fastadapter-bench.lock ...`: never drop every cache on a machine others are measuring on).
Which was used is recorded in `extra_info["cache_drop"]` and printed by compare.py. The model of the
previous round is freed first: pages a process still maps are not dropped.

- `fastadapter`: `fastadapter.load(base, dir)` on the plain model, then every page of every LoRA weight
  read (one element per page: the weights are in memory, as the reads' bytes are; summing every
  element, as the warm group does, would add a pass over memory the reads do not make);
- `fastadapter_hotswap`: `fastadapter.hotswap(model, dir)` into a model holding a copy of the adapter
  (loaded from another file and its weights read once before the round, as an adapter in use), then
  every page read likewise;
- `peft_low_cpu_mem`: `PeftModel.from_pretrained(base, dir, low_cpu_mem_usage=True)`, every page read;
- the ceilings, plain reads of the file into memory in 4 MiB requests: `read_sequential` (one buffered
  reader), `read_parallel` (4 buffered readers of separate quarters), `read_direct` (4 `O_DIRECT`
  readers, page-cache bypassed). compare.py sets fastadapter against the fastest of them (target 1.2x).

Group `warm load <adapter>`: the same loads with the file in the page cache, against `floor` (map the
file and read every tensor once), so that a change for the cold path shows what it costs the warm one.
Disk timings are noisy: compare within one run; each contender's rounds come in blocks interleaved with
the others' and are pooled (medians).
"""

from __future__ import annotations

import gc
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel

import fastadapter
from bench_load import lora_weights, touch
from conftest import QUICK, SAFETENSORS_NAME, BackgroundLoad, bench_body, build_peft_model
from fastadapter._core import SafetensorsFile
from fastadapter._tensors import mapped_tensors

SIZES = {"llama": {"layers": 4}, "many": {"count": 512}}
COLD = (
    "fastadapter",
    "fastadapter_hotswap",
    "peft_low_cpu_mem",
    "read_sequential",
    "read_parallel",
    "read_direct",
)
WARM = ("fastadapter", "fastadapter_hotswap", "peft_low_cpu_mem", "floor")
READERS = {"read_sequential": (1, False), "read_parallel": (4, False), "read_direct": (4, True)}
# Each contender's rounds come in blocks that take turns with the other contenders' (the order rotated
# block by block): the disk's speed drifts over minutes, and a contender timed all at once sees one
# stretch of it. compare.py pools a contender's blocks. Cold rounds take turns one by one: single
# cold reads of the same file on this VM took 38-112 ms within a minute.
BLOCKS, COLD_BLOCKS = (1, 1) if QUICK else (3, 9)
ROUNDS, COLD_ROUNDS = (1, 1) if QUICK else (3, 1)
REQUEST = 4 << 20
PAGE = mmap.PAGESIZE
LOCK = "/tmp/fastadapter-bench.lock"
DROP_CACHES = "/proc/sys/vm/drop_caches"


@pytest.fixture(scope="module", params=list(SIZES))
def cold_adapter(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, Path]]:
    """(name, the adapter's directory, a copy of it in another directory: what hotswap swaps from)."""
    name = request.param
    root = Path(tempfile.mkdtemp(prefix=f"fastadapter-bench-cold-{name}-"))
    try:
        build_peft_model(name, **SIZES[name]).save_pretrained(str(root / "a"))
        shutil.copytree(root / "a", root / "b")
        gc.collect()
        yield name, root / "a", root / "b"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def holds_bench_lock() -> bool:
    """Whether this process runs under `flock /tmp/fastadapter-bench.lock` (which passes its locked
    descriptor on to the command)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == LOCK:
                return True
        except OSError:
            continue
    return False


def drop_method() -> str:
    return "fadvise+drop_caches" if holds_bench_lock() and os.access(DROP_CACHES, os.W_OK) else "fadvise"


def drop(path: Path, method: str) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if method == "fadvise+drop_caches":
        with open(DROP_CACHES, "w") as f:
            f.write("1")


def touch_pages(tensors: list[Any]) -> float:
    """Read one element of every page of every tensor: each page is then in memory (a fault brings in a
    page that is not), without a pass over every byte."""
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        total += float(flat[:: max(1, PAGE // t.element_size())].sum())
    return total


def read_file(path: Path, threads: int, direct: bool) -> None:
    """Read the whole file into memory: `threads` readers of consecutive ranges, 4 MiB requests each
    (into one page-aligned buffer per reader, as `O_DIRECT` requires)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    share = -(-size // threads // REQUEST) * REQUEST
    errors: list[BaseException] = []

    def reader(start: int, end: int) -> None:
        try:
            buf = mmap.mmap(-1, REQUEST)
            view = memoryview(buf)
            while start < end:
                n = os.preadv(fd, [view], start)  # the whole request: O_DIRECT needs aligned lengths
                if n <= 0:
                    break
                start += n
            view.release()
            buf.close()
        except BaseException as e:  # re-raised by the caller
            errors.append(e)

    try:
        workers = [
            threading.Thread(target=reader, args=(i * share, min(size, (i + 1) * share)))
            for i in range(threads)
            if i * share < size
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]


class Round:
    def __init__(self, contender: str, name: str, directory: Path, other: Path, cold: bool) -> None:
        self.contender, self.name, self.directory, self.other, self.cold = (
            contender,
            name,
            directory,
            other,
            cold,
        )
        self.path = directory / SAFETENSORS_NAME
        self.method = drop_method() if cold else "none"
        self.model: Any = None

    def setup(self) -> None:
        self.model = None
        gc.collect()
        if self.contender == "fastadapter_hotswap":
            self.model = fastadapter.load(
                bench_body(self.name, **SIZES[self.name]).to_empty(device="cpu"), self.other
            )
            # In use, as on a server: its pages mapped, so dropping caches leaves them (otherwise the swap's
            # copy-on-write of each weight page would first read the old adapter back from disk).
            touch(lora_weights(self.model))
        elif not self.contender.startswith("read_") and self.contender != "floor":
            self.model = bench_body(self.name, **SIZES[self.name]).to_empty(device="cpu")
        if self.cold:
            drop(self.path, self.method)
        else:
            os.sync()

    def run(self) -> float:
        c, d = self.contender, str(self.directory)
        resident = touch_pages if self.cold else touch
        if c == "fastadapter":
            self.model = fastadapter.load(self.model, d)
            return resident(lora_weights(self.model))
        if c == "fastadapter_hotswap":
            fastadapter.hotswap(self.model, d)
            return resident(lora_weights(self.model))
        if c == "peft_low_cpu_mem":
            self.model = PeftModel.from_pretrained(self.model, d, low_cpu_mem_usage=True)
            return resident(lora_weights(self.model))
        if c == "floor":
            file = SafetensorsFile(str(self.path))
            return touch(mapped_tensors(file, file.entries()).values())
        threads, direct = READERS[c]
        read_file(self.path, threads, direct)
        return 0.0


def schedule(contenders: tuple[str, ...], blocks: int) -> list[tuple[int, str]]:
    n = len(contenders)
    return [(b, contenders[(b + i) % n]) for b in range(blocks) for i in range(n)]


def measure(
    benchmark: Any, cold_adapter: tuple[str, Path, Path], contender: str, cold: bool, block: int
) -> None:
    name, directory, other = cold_adapter
    r = Round(contender, name, directory, other, cold)
    benchmark.group = f"{'cold' if cold else 'warm'} load {name}"
    benchmark.extra_info.update(
        contender=contender,
        block=block,
        adapter=name,
        bytes=r.path.stat().st_size,
        tensors=len(SafetensorsFile(str(r.path))),
        cache_drop=r.method,
    )
    load = BackgroundLoad()
    load.start()
    run: Callable[[], float] = r.run
    rounds = COLD_ROUNDS if cold else ROUNDS
    benchmark.pedantic(run, setup=r.setup, rounds=rounds, iterations=1, warmup_rounds=0 if cold else 1)
    benchmark.extra_info["background_cpu"] = load.stop()
    r.model = None
    gc.collect()


@pytest.mark.parametrize(
    ("block", "contender"),
    schedule(COLD, COLD_BLOCKS),
    ids=[f"b{b}-{c}" for b, c in schedule(COLD, COLD_BLOCKS)],
)
def test_cold_load(benchmark: Any, cold_adapter: tuple[str, Path, Path], block: int, contender: str) -> None:
    measure(benchmark, cold_adapter, contender, cold=True, block=block)


@pytest.mark.parametrize(
    ("block", "contender"), schedule(WARM, BLOCKS), ids=[f"b{b}-{c}" for b, c in schedule(WARM, BLOCKS)]
)
def test_warm_load(benchmark: Any, cold_adapter: tuple[str, Path, Path], block: int, contender: str) -> None:
    measure(benchmark, cold_adapter, contender, cold=False, block=block)
