"""`.bin` (torch.save) checkpoints to safetensors, without torch and without running the pickle.

The Rust core reads the zip container over a memory map and interprets `data.pkl` with exactly what
`torch.load(weights_only=True)` allows (globals are recorded, never resolved), then writes the tensor
bytes from the source mapping straight to the output file. This module only decides names, runs files in
parallel (the Rust call releases the GIL) and reports. It must not import torch.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import _core
from .names import BIN_INDEX, SAFETENSORS_INDEX

__all__ = ["Conversion", "ConvertReport", "convert", "convert_dir", "default_destination"]

_SHARD = re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin")
_SUFFIXES = (".bin", ".pt", ".pth")


def default_destination(src: str | os.PathLike[str]) -> str:
    """Where `src` converts to, by Hugging Face's naming: `adapter_model.bin` -> `adapter_model.safetensors`,
    `pytorch_model.bin` -> `model.safetensors`, `pytorch_model-00001-of-00002.bin` ->
    `model-00001-of-00002.safetensors`, any other `x.bin|.pt|.pth` -> `x.safetensors`."""
    directory, base = os.path.split(os.fspath(src))
    if base == "pytorch_model.bin":
        name = "model.safetensors"
    elif shard := _SHARD.fullmatch(base):
        name = f"model-{shard[1]}-of-{shard[2]}.safetensors"
    else:
        stem, ext = os.path.splitext(base)
        if ext not in _SUFFIXES:
            raise ValueError(f"{src}: not a torch checkpoint name (expected one of {', '.join(_SUFFIXES)})")
        name = stem + ".safetensors"
    return os.path.join(directory, name)


@dataclass(frozen=True)
class Conversion:
    """One converted file."""

    src: str
    dst: str
    tensors: int
    bytes: int
    seconds: float
    aliases_copied: int = 0
    # Non-tensor entries of the checkpoint (e.g. `_metadata`), as (name, python type): not converted.
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass
class ConvertReport:
    """What `convert_dir` did: converted files, files left alone (with why), files that failed (with the
    error message). One file's failure never stops the others."""

    converted: list[Conversion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # (src, dst) of the skipped files whose output already exists (also in `skipped`, with the reason).
    existing: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    planned: list[tuple[str, str]] = field(default_factory=list)  # (src, dst) of a dry run

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.converted)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    overwrite: bool = True,
    fsync: bool = False,
    progress: _core.Progress | None = None,
) -> Conversion:
    """Convert one torch.save checkpoint to safetensors (metadata `{"format": "pt"}`).

    `dst` defaults to `default_destination(src)`. The output is written to a temp file and renamed into
    place; with `verify` (the default) it is re-read and compared with the source before it is published.
    The source is never modified. Raises `UnsafeCheckpointError` for a pickle that asks for anything
    `torch.load(weights_only=True)` would refuse, `CheckpointError` for a malformed file,
    `FileExistsError` when `dst` exists and `overwrite` is false.
    """
    src = os.fspath(src)
    dst = os.fspath(dst) if dst is not None else default_destination(src)
    if not overwrite and os.path.exists(dst):
        raise FileExistsError(17, "destination exists (pass overwrite=True to replace it)", dst)
    start = time.perf_counter()
    report = _core.convert_file(src, dst, verify=verify, fsync=fsync, progress=progress)
    return Conversion(
        src=src,
        dst=dst,
        tensors=int(report["tensors"]),
        bytes=int(report["bytes"]),
        seconds=time.perf_counter() - start,
        aliases_copied=int(report["aliases_copied"]),
        skipped=tuple(tuple(s) for s in report["skipped"]),
    )


def find_checkpoints(paths: Iterable[str | os.PathLike[str]], *, recursive: bool = True) -> Iterator[str]:
    """Checkpoint files named by `paths`: files as given, directories searched for *.bin/*.pt/*.pth."""
    for entry in paths:
        path = os.fspath(entry)
        if not os.path.isdir(path):
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(_SUFFIXES))
            if not recursive:
                break


def convert_dir(
    root: str | os.PathLike[str],
    *,
    jobs: int | None = None,
    recursive: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: _core.Progress | None = None,
    on_done: Callable[[str, Conversion | BaseException], None] | None = None,
) -> ConvertReport:
    """Convert every checkpoint under `root` (see `convert_paths`)."""
    return convert_paths(
        [root],
        jobs=jobs,
        recursive=recursive,
        verify=verify,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        on_done=on_done,
    )


def convert_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    jobs: int | None = None,
    recursive: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: _core.Progress | None = None,
    on_done: Callable[[str, Conversion | BaseException], None] | None = None,
) -> ConvertReport:
    """Convert the checkpoints among `paths` (files, or directories searched for *.bin/*.pt/*.pth), `jobs`
    files at a time (default: one per CPU). Existing outputs are skipped unless `overwrite`. A sharded
    checkpoint's `pytorch_model.bin.index.json` becomes `model.safetensors.index.json` once all its shards
    converted. `on_done(src, result_or_error)` is called as each file finishes."""
    report = ConvertReport()
    todo: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()
    for src in find_checkpoints(paths, recursive=recursive):
        seen_dirs.add(os.path.dirname(src))
        try:
            dst = default_destination(src)
        except ValueError as e:
            report.skipped.append((src, str(e)))
            continue
        if not os.path.isfile(src):
            report.failed.append((src, f"{src}: no such file"))
        elif os.path.exists(dst) and not overwrite:
            report.skipped.append((src, f"{dst} exists (pass overwrite=True to replace it)"))
            report.existing.append((src, dst))
        else:
            todo.append((src, dst))
    if dry_run:
        report.planned = todo
        return report

    def run(job: tuple[str, str]) -> Conversion | BaseException:
        try:
            return convert(job[0], job[1], verify=verify, overwrite=True, progress=progress)
        except Exception as e:  # one file's failure must not stop the others
            return e

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        for (src, _), result in zip(todo, pool.map(run, todo), strict=True):
            if isinstance(result, Conversion):
                report.converted.append(result)
            else:
                report.failed.append((src, str(result) or type(result).__name__))
            if on_done is not None:
                on_done(src, result)

    _convert_indexes(report, seen_dirs, overwrite)
    return report


def _convert_indexes(report: ConvertReport, directories: set[str], overwrite: bool) -> None:
    """Write `model.safetensors.index.json` beside each `pytorch_model.bin.index.json` whose shards were all
    converted, by this run or before it. An existing one is kept unless this run converted shards in that
    directory or `overwrite` is set."""
    changed = {os.path.dirname(c.src) for c in report.converted}
    for directory in sorted(directories):
        index_path = os.path.join(directory, BIN_INDEX)
        safe_index = os.path.join(directory, SAFETENSORS_INDEX)
        if not os.path.isfile(index_path):
            continue
        if os.path.exists(safe_index) and directory not in changed and not overwrite:
            continue
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            shards = sorted(set(index["weight_map"].values()))
            renamed = {s: os.path.basename(default_destination(s)) for s in shards}
            missing = [n for n in renamed.values() if not os.path.isfile(os.path.join(directory, n))]
            if missing:
                report.failed.append((index_path, f"{index_path}: shards not converted: {missing}"))
                continue
            total = sum(_tensor_bytes(os.path.join(directory, n)) for n in renamed.values())
            out = {
                "metadata": {**index.get("metadata", {}), "total_size": total},
                "weight_map": {k: renamed[v] for k, v in index["weight_map"].items()},
            }
            data = (json.dumps(out, indent=2, sort_keys=True) + "\n").encode()
            _core.stage_bytes(safe_index, data).commit()
        except (OSError, ValueError, KeyError, TypeError) as e:
            report.failed.append((index_path, f"{index_path}: {e}"))


def _tensor_bytes(path: str) -> int:
    return sum(end - start for _, _, _, start, end in _core.SafetensorsFile(path).entries())
