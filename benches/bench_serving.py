"""Serving many adapters: per-load time as adapters accumulate, set_adapter vs the number loaded, hotswap
against PEFT's and against reading the file. Cold loads (file not in the page cache) are in
bench_cold.py, the memory of several serving processes in bench_load_memory.py (both under `make bench`).

Usage: flock /tmp/fastadapter-bench.lock python benches/bench_serving.py [loads|switch|hotswap ...]
Prints one table per job and writes .benchmarks/serving.json. Ratios within one run are what count.

The model: a 16-layer, hidden-1024 Llama (bf16, built on the meta device then `to_empty`: no init cost);
each adapter r=16 on q/k/v/o (8 MB in fp32), written once with random weights.

- loads: N adapters loaded one after another into one model (`fastadapter.load(model, dir, f"x{i}")`),
  per host: fastadapter's own layers (`layers="fastadapter"`), a PeftModel, a transformers model; PEFT's
  own `load_adapter` on a PeftModel as the peer. Reported: the median of the first and of the last 10
  loads (a load on this VM takes 7 or 14 ms at random: one slow load moves a mean of 10 by a tenth), and
  the last 10 against loads made round by round beside them into a reference model that holds one
  adapter besides its first (each deleted again, untimed): the VM's speed moves in steps of up to 2x
  within minutes, and the reference sees the same steps.
- switch: `set_adapter` alternating between two adapters on a model holding 2 and on one holding N,
  switch by switch in turn, per host; PEFT's `PeftModel.set_adapter` as the peer.
- hotswap: `fastadapter.hotswap` vs PEFT's `hotswap_adapter` on a PeftModel (same file, warm cache), per
  host and per kind of weights (see `swap_model`), and two floors: read the file once (one `read()` into
  a page-aligned buffer), and the copy alone that a swap into weights of their own makes (`ChunkReads`
  of every tensor into its weight, planned beforehand). Each contender's rounds alternate with the
  floor's, and its ratio is to the floor of its own rounds.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastadapter

LAYERS, HIDDEN, RANK = 16, 1024, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
QUICK = os.environ.get("FASTADAPTER_BENCH_QUICK") == "1"
N_LOADS = 20 if QUICK else 60
N_SWITCH = 20 if QUICK else 100
N_PEFT_LOADS = 20 if QUICK else 40  # PEFT's own load_adapter slows down: 40 are enough to see it


def base_model() -> nn.Module:
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to_empty(device="cpu").to(torch.bfloat16).eval()


def write_adapter(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for target in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=g) * 0.01
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def adapters(root: Path, n: int) -> list[Path]:
    return [write_adapter(root / f"a{i}", i) for i in range(n)]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- loads ------------------------------------------------------------------------------------------------


def first_loaded(host: str, directory: Path) -> nn.Module:
    """The model holding its first adapter ("x0"), by the host's own way."""
    base = base_model()
    if host == "fastadapter":
        return fastadapter.load(base, directory, "x0", layers="fastadapter")
    if host in ("peft", "peft_load_adapter"):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(directory), adapter_name="x0")
    return fastadapter.load(base, directory, "x0")  # transformers' integration


def load_once(model: nn.Module, host: str, directory: Path, name: str) -> float:
    if host == "peft_load_adapter":
        return timed(lambda: model.load_adapter(str(directory), adapter_name=name))  # type: ignore[operator]
    return timed(lambda: fastadapter.load(model, directory, name))


def load_times(host: str, dirs: list[Path]) -> tuple[list[float], list[float]]:
    """Per-load times into a model that keeps every adapter (the count grows), and, round by round beside
    them, into a reference model that holds one adapter besides its first (each load deleted again,
    untimed): the VM's speed moves in steps of up to 2x, and the reference sees the same steps."""
    model, reference = first_loaded(host, dirs[0]), first_loaded(host, dirs[0])
    delete = (
        reference.delete_adapter
        if host == "peft_load_adapter"
        else partial(fastadapter.delete_adapter, reference)
    )
    growing, steady = [], []
    for i, d in enumerate(dirs[1:], start=1):
        # The same file into both, first into one, then the other, in turn: the second load finds the
        # file's header and pages in the CPU's caches.
        if i % 2:
            growing.append(load_once(model, host, d, f"x{i}"))
            steady.append(load_once(reference, host, d, "y"))
        else:
            steady.append(load_once(reference, host, d, "y"))
            growing.append(load_once(model, host, d, f"x{i}"))
        delete("y")
    return growing, steady


def bench_loads(dirs: list[Path]) -> dict[str, Any]:
    rows = {}
    for host in ("fastadapter", "peft", "transformers", "peft_load_adapter"):
        n = N_PEFT_LOADS if host == "peft_load_adapter" else N_LOADS
        times, reference = load_times(host, dirs[: n + 1])
        gc.collect()
        first, last = statistics.median(times[:10]), statistics.median(times[-10:])
        beside, beside_first = statistics.median(reference[-10:]), statistics.median(reference[:10])
        # Each end against the reference's loads at the same moments: what the count adds, with the
        # VM's speed steps divided out (the reference's own loads moved by up to 1.6x between the ends).
        growth = (last / beside) / (first / beside_first)
        rows[host] = {
            "n": n,
            "first10_ms": first * 1e3,
            "last10_ms": last * 1e3,
            "ratio": last / first,
            "reference_last10_ms": beside * 1e3,
            "ratio_to_reference": last / beside,
            "reference_first10_ms": beside_first * 1e3,
            "growth_vs_reference": growth,
        }
        print(
            f"loads  {host:20s} n={n:3d} first10 {first * 1e3:7.2f} ms  last10 {last * 1e3:7.2f} ms  "
            f"last/first {last / first:5.2f}  reference beside last10 {beside * 1e3:7.2f} ms  "
            f"last/reference {last / beside:5.2f}  growth vs reference {growth:5.2f}",
            flush=True,
        )
    return rows


# --- switch -----------------------------------------------------------------------------------------------


def switcher(model: nn.Module, host: str) -> Callable[[str], Any]:
    if host == "peft_set_adapter":
        return model.set_adapter  # type: ignore[return-value]
    return partial(fastadapter.set_adapter, model)


def bench_switch(dirs: list[Path], rounds: int = 200) -> dict[str, Any]:
    """`set_adapter` on a model holding 2 adapters and on one holding N, switch by switch in turn (so
    both see the same moments of the VM), each alternating between two of its adapters."""
    rows = {}
    for host in ("fastadapter", "peft", "transformers", "peft_set_adapter"):
        few = first_loaded("peft" if host == "peft_set_adapter" else host, dirs[0])
        many = first_loaded("peft" if host == "peft_set_adapter" else host, dirs[0])
        fastadapter.load(few, dirs[1], "x1")
        for i in range(1, N_SWITCH):
            fastadapter.load(many, dirs[i], f"x{i}")
        on_few, on_many = switcher(few, host), switcher(many, host)
        last = f"x{N_SWITCH - 1}"
        two, lots = interleaved(
            [lambda i: on_few(("x0", "x1")[i % 2]), lambda i: on_many(("x0", last)[i % 2])],  # noqa: B023
            rounds,
        )
        rows[host] = {"with_2_ms": two * 1e3, f"with_{N_SWITCH}_ms": lots * 1e3, "ratio": lots / two}
        print(
            f"switch {host:20s} with 2 {two * 1e3:7.3f} ms  with {N_SWITCH} {lots * 1e3:7.3f} ms  "
            f"ratio {lots / two:5.2f}",
            flush=True,
        )
        del few, many
        gc.collect()
    return rows


# --- hotswap ----------------------------------------------------------------------------------------------


def read_once(path: Path, buffer: mmap.mmap) -> None:
    with open(path, "rb", buffering=0) as f:
        f.readinto(buffer)  # type: ignore[attr-defined]


def swap_with_peft(model: nn.Module, directory: Path, name: str = "x0") -> None:
    from peft.utils.hotswap import hotswap_adapter

    hotswap_adapter(model, str(directory), name, torch_device="cpu")


def swap_model(host: str, dirs: list[Path]) -> tuple[nn.Module, str]:
    """A model holding the adapter to swap, and its name. `peft`: a PeftModel whose adapter PEFT loaded
    (weights in memory of their own: a swap copies into them); `peft_second`: a PeftModel whose second
    adapter fastadapter loaded (views of the file's mapping, like the `transformers` and `fastadapter`
    hosts: a file laid out alike is mapped over them in place)."""
    if host == "peft_second":
        model = first_loaded("peft", dirs[0])
        fastadapter.load(model, dirs[3], "x1")
        return model, "x1"
    return first_loaded("peft" if host == "peft_hotswap_adapter" else host, dirs[0]), "x0"


def copy_chunks(path: Path, model: nn.Module, name: str) -> Any:
    """The reads of every tensor of `path` into the adapter's weights, held as a swap plan holds them
    (`_core.ChunkReads`): the copy a swap into weights of their own makes, and nothing else."""
    from fastadapter._core import ChunkReads, SafetensorsFile

    weights = dict(model.named_parameters())
    chunks = []
    for key, _, shape, start, _ in SafetensorsFile(str(path)).entries():
        module, slot = key.removeprefix("base_model.model.").rsplit(".", 2)[0], key.split(".")[-2]
        live = weights[f"base_model.model.{module}.{slot}.{name}.weight"]
        chunks.append(
            (key, live.detach().view(-1).view(torch.uint8).numpy().data, start, 4, shape, [0, 0], shape)
        )
    return ChunkReads(chunks)


def interleaved(fns: list[Callable[[int], Any]], rounds: int) -> list[float]:
    """Medians of `fns` timed round by round in turn: a contender and its floor see the same moments of
    this VM, whose speed moves by up to 2x within minutes."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(rounds):
        for fn, out in zip(fns, times, strict=True):
            out.append(timed(partial(fn, i)))
    return [statistics.median(t) for t in times]


HOTSWAP_HOSTS = ("peft", "peft_second", "transformers", "fastadapter", "peft_hotswap_adapter")


def bench_hotswap(dirs: list[Path], rounds: int = 20) -> dict[str, Any]:
    """Each contender's swaps alternate with the floor's reads (the same file), so every ratio compares
    rounds taken side by side; `floor_read_once` is the median over all of them."""
    rows: dict[str, Any] = {}
    files = [d / "adapter_model.safetensors" for d in dirs[1:3]]
    # Page-aligned memory: the kernel's copy into a `bytearray` (malloc'd, 16 bytes past a page) ran
    # 1.3-4x slower here than into aligned memory, depending on where malloc put it.
    buffer = mmap.mmap(-1, files[0].stat().st_size)

    def floor(i: int) -> None:
        read_once(files[i % 2], buffer)

    floors: list[float] = []
    for host in HOTSWAP_HOSTS:
        model, name = swap_model(host, dirs)
        swap = partial(swap_with_peft if host == "peft_hotswap_adapter" else fastadapter.hotswap, model)
        swap(dirs[1], name)
        t, f = interleaved([lambda i: swap(dirs[1 + i % 2], name), floor], rounds)  # noqa: B023
        rows[host], rows[f"floor_{host}"] = t * 1e3, f * 1e3
        floors.append(f)
        if host == "peft":
            chunks = [copy_chunks(path, model, name) for path in files]
            c, f = interleaved([lambda i: chunks[i % 2].read(str(files[i % 2])), floor], rounds)  # noqa: B023
            rows["floor_copy_into_weights"], rows["floor_copy"] = c * 1e3, f * 1e3
            floors.append(f)
    rows["floor_read_once"] = statistics.median(floors) * 1e3
    for host in HOTSWAP_HOSTS:
        print(
            f"hotswap {host:20s} {rows[host]:8.2f} ms  /floor {rows[host] / rows[f'floor_{host}']:6.2f}  "
            f"(floor {rows[f'floor_{host}']:5.2f} ms)  "
            f"peft_hotswap_adapter/this {rows['peft_hotswap_adapter'] / rows[host]:6.1f}",
            flush=True,
        )
    copy = rows["floor_copy_into_weights"]
    print(
        f"hotswap copy into the weights only  {copy:8.2f} ms  /floor {copy / rows['floor_copy']:6.2f}  "
        f"(floor {rows['floor_copy']:5.2f} ms)  "
        f"peft_hotswap_adapter / it {rows['peft_hotswap_adapter'] / copy:.1f}",
        flush=True,
    )
    return rows


JOBS = {"loads": bench_loads, "switch": bench_switch, "hotswap": bench_hotswap}


def main(argv: list[str]) -> None:
    jobs = argv or list(JOBS)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results: dict[str, Any] = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="fastadapter-serving-") as tmp:
        dirs = adapters(Path(tmp), max(N_LOADS, N_SWITCH) + 1)
        os.sync()
        for job in jobs:
            results[job] = JOBS[job](dirs)
    out = Path(".benchmarks")
    out.mkdir(exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
