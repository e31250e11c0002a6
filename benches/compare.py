"""Ratio tables from one pytest-benchmark JSON: fastadapter against every peer measured in the same run.

Usage: python benches/compare.py .benchmarks/latest.json

Only ratios within one run mean anything on a noisy machine, so there are no stored baselines. A
contender's rounds from all its interleaved blocks are pooled before taking the median and minimum.
Memory results (bench_load_memory.py: `kind: memory` in extra_info, no timing) get their own table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any

OURS = "fastadapter"
# The ceilings: raw_write, the same write into preallocated extents (ext4 then skips a synchronous
# flush) and raw_pwritev (the same file in 1 MiB pwritev calls from the tensors' own memory) for saves;
# floor (map the file, read every tensor once) for loads; cp of the source bytes for conversions; one
# copy from/to page-locked memory for host-device transfers (bench_cuda*); for checkpoints, one memcpy
# of the saved bytes (the least an async save can stall), torch's copy of them, and plain writes of the
# same bytes into the page cache; for distributed checkpoints, DCP's own cost with a plugin that writes
# nothing (dcp_no_io); for cold loads (bench_cold.py), plain reads of the file from disk (read_*), of
# which the fastest in the run is the target's reference.
CEILINGS = (
    "raw_write",
    "raw_pwritev",
    "raw_write_shared",
    "raw_write_fallocate",
    "floor",
    "cp",
    "torch_pinned_h2d",
    "torch_pinned_d2h",
    "memcpy",
    "torch_copy",
    "page_cache_write",
    "dcp_no_io",
    "read_sequential",
    "read_parallel",
    "read_direct",
)
READS = ("read_sequential", "read_parallel", "read_direct")
COLD_TARGET = 1.2  # a cold load (or hotswap) against the fastest plain read of the file
# fastadapter loading into another host's model -> that host's own loader of the same adapter. Its time
# against plain fastadapter's is the cost of the host's layers (target: at most HOST_TARGET).
HOSTS = {"fastadapter_peft": "peft_load_adapter", "fastadapter_transformers": "transformers_load_adapter"}
HOST_TARGET = 1.5
# PEFT's own call with `fastadapter.patch()` (bench_patch.py) against calling fastadapter directly: the
# cost of the patch layer (target: at most PATCH_TARGET), and its speedup over the same call unpatched.
PATCHED = "peft_patched"
PATCH_TARGET = 1.1
ORDER = (
    "fastadapter",
    "fastadapter_noverify",
    "fastadapter_fsync",
    "fastadapter_sync",
    "fastadapter_per_tensor",
    "fastadapter_peft",
    "fastadapter_transformers",
    "fastadapter_per_rank",
    "fastadapter_hotswap",
    "fastadapter_dcp",
    "fastadapter_gathered",
    "peft_patched",
    "peft",
    "transformers",
    "peft_low_cpu_mem",
    "peft_gathered",
    "peft_load_adapter",
    "transformers_load_adapter",
    "safetensors",
    "torch_save",
    "raw_write",
    "raw_pwritev",
    "raw_write_shared",
    "raw_write_fallocate",
    "floor",
    "torch_mmap",
    "hf_convert",
    "cp",
    "per_tensor_to",
    "torch_pageable_h2d",
    "torch_pinned_h2d",
    "per_tensor_cpu",
    "torch_pageable_d2h",
    "torch_pinned_d2h",
    "memcpy",
    "torch_copy",
    "page_cache_write",
    "torch_filesystem",
    "torch_hf",
    "torch_hf_consolidated",
    "torch_hf_reader",
    "dcp_no_io",
    "read_sequential",
    "read_parallel",
    "read_direct",
)


@dataclass
class Result:
    contender: str
    times_s: list[float]  # every timed round, pooled over the contender's interleaved blocks
    nbytes: int
    tensors: int
    background: list[float]  # share of CPU time other processes used during each block
    anon_peak_mb: float | None = None  # conversions: peak anonymous-memory growth of one run
    file_peak_mb: float | None = None  # conversions: peak file-backed RSS growth (mapped page cache)
    device: str | None = None  # GPU benchmarks: the device's name
    cache_drop: str | None = None  # cold loads: how the file's pages were dropped before each round

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9


def load(path: str) -> tuple[dict[str, Any], dict[str, list[Result]]]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    groups: dict[str, dict[str, Result]] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") == "memory":
            continue  # memory_results
        contender = info.get("contender", bench["name"])
        # "data" holds each round; fall back to the median for JSON written without it.
        times = bench["stats"].get("data") or [bench["stats"]["median"]]
        results = groups.setdefault(bench.get("group") or "ungrouped", {})
        background = [float(info["background_cpu"])] if "background_cpu" in info else []
        if contender in results:
            results[contender].times_s.extend(times)
            results[contender].background.extend(background)
        else:
            results[contender] = Result(
                contender, list(times), int(info.get("bytes", 0)), int(info.get("tensors", 0)), background
            )
        if "device" in info:
            results[contender].device = str(info["device"])
        if "cache_drop" in info:
            results[contender].cache_drop = str(info["cache_drop"])
        for key in ("anon_peak_mb", "file_peak_mb"):
            if key in info:
                previous = getattr(results[contender], key)
                setattr(results[contender], key, max(previous or 0.0, float(info[key])))
    rank = {name: i for i, name in enumerate(ORDER)}
    return data, {
        group: sorted(results.values(), key=lambda r: rank.get(r.contender, len(ORDER)))
        for group, results in groups.items()
    }


@dataclass
class Memory:
    contender: str
    workers: int
    pss_growth_mb: list[float]  # one per worker, all read while every worker held the adapter

    @property
    def mean_mb(self) -> float:
        return statistics.mean(self.pss_growth_mb)


def memory_results(data: dict[str, Any]) -> dict[str, tuple[dict[str, Any], list[Memory]]]:
    """group -> (extra_info of its first result, for the adapter's size; its results)."""
    groups: dict[str, tuple[dict[str, Any], list[Memory]]] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") != "memory":
            continue
        _, results = groups.setdefault(bench.get("group") or "memory", (info, []))
        growth = [float(x) for x in info["pss_growth_mb"]]
        results.append(Memory(str(info["contender"]), int(info["workers"]), growth))
    return groups


def memory_table(group: str, info: dict[str, Any], results: list[Memory]) -> str:
    rank = {name: i for i, name in enumerate(ORDER)}
    contenders = sorted({r.contender for r in results}, key=lambda c: (rank.get(c, len(ORDER)), c))
    workers = sorted({r.workers for r in results})
    cell = {(r.contender, r.workers): r.mean_mb for r in results}
    lines = [
        f"### {group}: {int(info.get('bytes', 0)) / 1e6:.0f} MB, {info.get('tensors', '?')} tensors, "
        "mean PSS growth per worker (MB) while all N workers hold the same adapter",
        "",
        "| contender | "
        + " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in workers)
        + " | "
        + " | ".join(f"vs fastadapter ({n})" for n in workers)
        + " |",
        "|---|" + "---:|" * (2 * len(workers)),
    ]
    for c in contenders:
        sizes = [_mb(cell.get((c, n))) for n in workers]
        ratios = [_ratio(cell.get((c, n)), cell.get((OURS, n))) for n in workers]
        lines.append(f"| {c} | " + " | ".join(sizes) + " | " + " | ".join(ratios) + " |")
    lines.append("")
    lines.append("vs fastadapter = contender's growth / fastadapter's (>1: the contender needs more memory)")
    return "\n".join(lines)


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference <= 0:
        return "n/a"
    return f"{value / reference:.2f}x"


def machine_line(data: dict[str, Any]) -> str:
    info = data.get("machine_info", {})
    packages = info.get("packages", {})
    versions = ", ".join(f"{name} {version}" for name, version in packages.items())
    # Recorded by benches/conftest.py on the machine that ran the benchmarks (not this one).
    cpu = info.get("cpu_model") or info.get("cpu", {}).get("brand_raw") or "unknown CPU"
    cores = info.get("cpu_count") or os.cpu_count()
    when = data.get("datetime", "?")
    return f"Machine: {cpu}, {cores} cores; {versions or 'versions not recorded'}; run {when}"


def table(group: str, results: list[Result]) -> str:
    ours = next((r for r in results if r.contender == OURS), None)
    first = results[0]
    memory = any(r.anon_peak_mb is not None for r in results)  # only conversions record it
    by_name = {r.contender: r for r in results}
    hosts = any(c in by_name for c in HOSTS)  # loads into PEFT / transformers models
    on = f", {first.device}" if first.device else ""
    lines = [
        f"### {group}: {first.nbytes / 1e6:.0f} MB, {first.tensors} tensors{on}",
        "",
        "| contender | rounds | median (ms) | min (ms) | GB/s | fastadapter speedup |"
        + (" peak anon growth (MB) | peak mapped file (MB) |" if memory else "")
        + (
            f" host / fastadapter (target ≤ {HOST_TARGET}x) | speedup vs host's own loader |" if hosts else ""
        ),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if memory else "") + ("---:|---:|" if hosts else ""),
    ]
    for r in results:
        speedup = f"{r.median_s / ours.median_s:.2f}x" if ours is not None else "n/a"
        extra = f" {_mb(r.anon_peak_mb)} | {_mb(r.file_peak_mb)} |" if memory else ""
        if hosts:
            extra += f" {_host_cost(r, ours)} | {_host_speedup(r, by_name)} |"
        lines.append(
            f"| {r.contender} | {len(r.times_s)} | {r.median_s * 1e3:.1f} | {r.min_s * 1e3:.1f} "
            f"| {r.gbps:.2f} | {speedup} |{extra}"
        )
    lines.append("")
    if hosts:
        lines.append(
            "host / fastadapter: fastadapter loading into a PeftModel / transformers model (PEFT's layers) "
            "against into the plain model (its own layers); speedup vs host's own loader: "
            + ", ".join(f"{peer} / {c}" for c, peer in HOSTS.items())
        )
    background = [b for r in results for b in r.background]
    if background:
        lines.append(
            f"CPU used by other processes during these rounds: mean {statistics.mean(background):.0%}, "
            f"max {max(background):.0%} (of both cores; above ~10% the numbers are suspect)"
        )
    if ours is None:
        lines.append("fastadapter: no result in this run (skipped or failed)")
        return "\n".join(lines)
    patched = by_name.get(PATCHED)
    if patched is not None:
        ratio = patched.median_s / ours.median_s
        over = " (over target)" if ratio > PATCH_TARGET else ""
        lines.append(f"peft_patched / fastadapter: {ratio:.2f}x (target ≤ {PATCH_TARGET}x){over}")
        if "peft" in by_name:
            lines.append(
                f"peft / peft_patched: {by_name['peft'].median_s / patched.median_s:.2f}x faster patched"
            )
    for ceiling in (r for r in results if r.contender in CEILINGS):
        lines.append(
            f"fastadapter / {ceiling.contender}: {ours.median_s / ceiling.median_s:.2f}x of ceiling (time)"
        )
    lines.extend(_cold_lines(results, by_name))
    return "\n".join(lines)


def _cold_lines(results: list[Result], by_name: dict[str, Result]) -> list[str]:
    """Cold loads: fastadapter's load and hotswap against the fastest plain read of the file in the run."""
    reads = [r for r in results if r.contender in READS]
    if not reads:
        return []
    fastest = min(reads, key=lambda r: r.median_s)
    drops = sorted({r.cache_drop for r in results if r.cache_drop})
    lines = [f"page cache dropped before each round with: {', '.join(drops) or 'not recorded'}"]
    for name in (OURS, "fastadapter_hotswap"):
        r = by_name.get(name)
        if r is not None:
            ratio = r.median_s / fastest.median_s
            over = " (over target)" if ratio > COLD_TARGET else ""
            lines.append(
                f"{name} / fastest read ({fastest.contender}): {ratio:.2f}x (target ≤ {COLD_TARGET}x){over}"
            )
    return lines


def _host_cost(r: Result, ours: Result | None) -> str:
    if r.contender not in HOSTS or ours is None:
        return ""
    ratio = r.median_s / ours.median_s
    return f"{ratio:.2f}x" + (" (over target)" if ratio > HOST_TARGET else "")


def _host_speedup(r: Result, by_name: dict[str, Result]) -> str:
    peer = by_name.get(HOSTS.get(r.contender, ""))
    return f"{peer.median_s / r.median_s:.2f}x" if peer is not None else ""


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} BENCHMARK_JSON", file=sys.stderr)
        return 2
    data, groups = load(argv[1])
    print(machine_line(data))
    print("Speedup = peer median / fastadapter median (>1: fastadapter is faster).")
    for group, results in groups.items():
        print()
        print(table(group, results))
    for group, (info, memory) in memory_results(data).items():
        print()
        print(memory_table(group, info, memory))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
