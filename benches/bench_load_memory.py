"""Memory of a loaded adapter: PSS growth of 1, 2 and 4 processes that each load the same adapter file.

Each worker process builds the bf16 base (meta device, then `to_empty`: its pages are never touched),
reads its own PSS from /proc/self/smaps_rollup, loads the `many` adapter (1024 x Linear(1024), r=64:
537 MB of fp32 weights, PEFT's own file) with the contender, reads every LoRA weight once (the `touch` of
bench_load.py), and reads its PSS again. PSS splits a shared page among the processes that map it, so
both readings are taken while every worker is alive, the second one after all of them have loaded
(barriers), before any exits. The result is the mean growth per worker: what one more serving process
costs once N of them hold the same adapter. The file is in the page cache throughout; page cache that no
process maps is not counted.

- `fastadapter`: `fastadapter.load(base, dir)` on the plain model (fastadapter's own LoRA layers; fp32
  weights on a bf16 base stay views of the file's private mapping, shared between the workers);
- `fastadapter_peft`: `fastadapter.load(peft_model, dir, adapter_name="second")` on a PeftModel that
  already holds the adapter as "default" (loaded before the first reading); the growth is that call's;
- `fastadapter_transformers`: `fastadapter.load(model, dir)` on a transformers `PreTrainedModel` with the
  same module tree (conftest's `BenchModel`);
- `peft_low_cpu_mem`: `PeftModel.from_pretrained(base, dir, low_cpu_mem_usage=True)`;
- `transformers_load_adapter`: `model.load_adapter(dir, adapter_name="default")` on the same
  `PreTrainedModel` (as users call it). It keeps the LoRA weights in the base's dtype (bf16: half the
  bytes), where PEFT and fastadapter upcast them to fp32.

`cold`: the same for fastadapter and peft_low_cpu_mem with the file's pages dropped from the page cache
(`posix_fadvise(DONTNEED)`, by every worker after its first reading) before the loads: the file is then
read from disk during the loads, by fastadapter's parallel prefetch, into the same shared page cache.

Workers are forked from a forkserver that has imported torch, peft, transformers and fastadapter (no
fork of a process that ran torch; no 6 s of imports per worker). Before its first reading each worker
runs its contender once on a tiny adapter, so that lazy imports and the copy-on-write of the server's
pages that the code path touches are not counted as the adapter's. This is not a timing: the figures go
into pytest-benchmark's `extra_info` of a trivial benchmark, and compare.py prints them as a table.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn

import bench_load
import fastadapter
from conftest import QUICK, SAFETENSORS_NAME, Adapter, bench_body, build_peft_model, transformers_base

CONTENDERS = (
    "fastadapter",
    "fastadapter_peft",
    "fastadapter_transformers",
    "peft_low_cpu_mem",
    "transformers_load_adapter",
)
WORKERS = (1, 2) if QUICK else (1, 2, 4)
# (contender, whether the file is dropped from the page cache before the loads)
CASES = [(c, False) for c in CONTENDERS] + [(c, True) for c in ("fastadapter", "peft_low_cpu_mem")]
WARMUP_SIZES = {"count": 4, "width": 64}  # the warm-up adapter: 4 x Linear(64), same config otherwise
TIMEOUT_S = 300.0
# The fields of /proc/self/smaps_rollup recorded (kB), growth reported in MB (1e6 bytes).
FIELDS = {"Pss:": "pss", "Pss_Anon:": "pss_anon", "Pss_File:": "pss_file", "Rss:": "rss"}


@pytest.fixture(scope="module")
def warmup_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="fastadapter-bench-warmup-"))
    try:
        build_peft_model("many", **WARMUP_SIZES).save_pretrained(str(directory))
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def stop_forkserver() -> Iterator[None]:
    """The server holds torch & co. imported: not left idling through the benchmarks that follow."""
    yield
    stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)  # private, but stable since 3.8
    if stop is not None:
        stop()


def smaps_rollup() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in FIELDS:
                out[FIELDS[parts[0]]] = int(parts[1])
    return out


def host(contender: str, directory: str, **sizes: int) -> nn.Module:
    """The model the contender loads into, built before the first reading."""
    if contender == "fastadapter_peft":
        base = bench_body("many", **sizes).to_empty(device="cpu")
        return PeftModel.from_pretrained(base, directory, low_cpu_mem_usage=True)
    if contender in ("fastadapter_transformers", "transformers_load_adapter"):
        return transformers_base("many", **sizes)
    return bench_body("many", **sizes).to_empty(device="cpu")


def load(contender: str, model: nn.Module, directory: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """The measured call; returns the loaded model and its weights of the loaded adapter."""
    if contender in ("fastadapter", "fastadapter_transformers"):
        model = fastadapter.load(model, directory)
    elif contender == "fastadapter_peft":
        model = fastadapter.load(model, directory, adapter_name="second")
        return model, bench_load.lora_weights(model, "second")
    elif contender == "peft_low_cpu_mem":
        model = PeftModel.from_pretrained(model, directory, low_cpu_mem_usage=True)
    elif contender == "transformers_load_adapter":
        model.load_adapter(directory, adapter_name="default")
    else:
        raise ValueError(f"unknown contender {contender!r}")
    return model, bench_load.lora_weights(model)


def evict(directory: str) -> None:
    fd = os.open(os.path.join(directory, SAFETENSORS_NAME), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def worker(contender: str, directory: str, warmup: str, barrier: Any, results: Any, cold: bool) -> None:
    try:
        torch.set_num_threads(1)  # the workers share the machine's cores; this is not a timing
        model, weights = load(contender, host(contender, warmup, **WARMUP_SIZES), warmup)
        bench_load.touch(weights)
        del model, weights
        gc.collect()
        model = host(contender, directory)
        gc.collect()
        barrier.wait(TIMEOUT_S)  # everyone alive and built
        before = smaps_rollup()
        if cold:
            evict(directory)  # nobody maps it yet: its pages leave the page cache
        barrier.wait(TIMEOUT_S)  # everyone has read: no other worker's load moves this one's first reading
        model, weights = load(contender, model, directory)
        bench_load.touch(weights)
        tensors = len(weights)
        barrier.wait(TIMEOUT_S)  # everyone holds the adapter
        after = smaps_rollup()
        barrier.wait(TIMEOUT_S)  # everyone has read: only now may a worker exit and drop its pages
        growth = {k: (after[k] - before[k]) * 1024 / 1e6 for k in before}
        results.put({"pid": os.getpid(), "tensors": tensors, **growth})
    except BaseException:
        barrier.abort()
        results.put({"pid": os.getpid(), "error": traceback.format_exc()})


def forkserver() -> Any:
    """The forkserver context, its server started with this module (so torch, peft, transformers and
    fastadapter) imported. Python 3.11's server imports its preload with the interpreter's default
    `sys.path`, not ours (it drops the one it is given), hence PYTHONPATH while it starts."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # takes effect only if the server is not running yet
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), saved) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


def run_workers(
    contender: str, directory: Path, warmup: Path, workers: int, cold: bool = False
) -> list[dict[str, Any]]:
    ctx = forkserver()
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(contender, str(directory), str(warmup), barrier, results, cold))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=2 * TIMEOUT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(TIMEOUT_S)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        pytest.fail(f"{contender} worker failed:\n" + "\n".join(errors))
    return out


@pytest.mark.parametrize("adapter", ["many"], indirect=True)
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize(
    ("contender", "cold"), CASES, ids=[c + ("-cold" if cold else "") for c, cold in CASES]
)
def test_load_memory(
    benchmark: Any, adapter: Adapter, warmup_dir: Path, contender: str, workers: int, cold: bool
) -> None:
    os.sync()  # the adapter file was just written: no writeback during the loads
    out = run_workers(contender, adapter.reference_dir, warmup_dir, workers, cold)
    assert all(r["tensors"] == adapter.tensors for r in out)
    benchmark.group = f"load memory {adapter.name}" + (" (file not in the page cache)" if cold else "")
    benchmark.extra_info.update(
        kind="memory",
        contender=contender,
        adapter=adapter.name,
        workers=workers,
        cold=cold,
        bytes=adapter.nbytes,
        tensors=adapter.tensors,
        **{f"{k}_growth_mb": [r[k] for r in out] for k in FIELDS.values()},
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
