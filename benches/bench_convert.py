"""Converting torch `.bin` checkpoints to safetensors: fastadapter vs torch vs Hugging Face's convert flow vs
`cp` of the same bytes.

Two workloads, built once per session under the system temp dir (never in the repository) and removed
after: a 2 GiB bf16 checkpoint (64 tensors of 4096x4096), and a folder of 16 shards of 96 MiB each (as
`save_pretrained` used to write them, with `pytorch_model.bin.index.json`).

Contenders, each timed on the same source bytes:

- `fastadapter`: `fastadapter.convert` / `convert_dir` with their defaults (the output is re-read and
  compared with the source before it is published); `fastadapter_noverify` without that check.
- `torch_mmap`: `torch.load(mmap=True, weights_only=True)` + `safetensors.torch.save_file`, file by file.
- `hf_convert` (the single file only): the flow of safetensors' `convert.py`, which the Hub's conversion
  bot runs: `torch.load`, drop names aliasing a storage another name covers, make contiguous, `save_file`
  with `{"format": "pt"}`, check the size, reload with `load_file` and compare every tensor.
- `cp`: `cp` of the source bytes (`cp -r` of the folder): the ceiling.

The sources stay in the page cache (the machine has the RAM for it), so this measures the conversion, not
the disk's read speed. Every round starts after the previous outputs are deleted and `os.sync()` (untimed),
so one contender's dirty pages never throttle the next; the rounds are interleaved in blocks with the
order rotated per block, as in bench_save.py, and compare.py pools them.

Peak memory: in block 0 each contender also runs once in a child process whose anonymous memory
(`RssAnon` in /proc/<pid>/status: heap, not the page cache behind mapped files) is sampled every 2 ms;
the growth over the child's idle baseline goes into the JSON as `anon_peak_mb`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import _remove_duplicate_names, load_file, save_file

import fastadapter
from conftest import BackgroundLoad
from fastadapter.convert import default_destination

FILE_TENSORS, FOLDER_FILES, FOLDER_TENSORS_PER_FILE = 64, 16, 3
# Tensors are SIDE x SIDE bf16; a smaller side gives a quick smoke run of the same code.
SIDE = int(os.environ.get("FASTADAPTER_BENCH_CONVERT_SIDE", "4096"))
BLOCKS = 3
ROUNDS_PER_BLOCK = 1
CONTENDERS = {
    "file": ("fastadapter", "fastadapter_noverify", "torch_mmap", "hf_convert", "cp"),
    "folder": ("fastadapter", "fastadapter_noverify", "torch_mmap", "cp"),
}
GROUPS = {"file": "convert_2GiB_bf16", "folder": "convert_dir_16x96MiB"}


def schedule() -> list[tuple[str, int, str]]:
    """(workload, block, contender) in run order; each block starts one contender later than the last."""
    out = []
    for kind, contenders in CONTENDERS.items():
        n = len(contenders)
        out += [(kind, b, contenders[(b + i) % n]) for b in range(BLOCKS) for i in range(n)]
    return out


# --- workloads -----------------------------------------------------------------------------------------


@dataclass
class Workload:
    kind: str
    src: Path  # the checkpoint file, or the folder of shards
    sources: list[Path]  # the .bin files
    outputs: list[Path]  # what the converters write (default names, beside the sources)
    cp_target: Path
    nbytes: int  # bytes of the source files
    tensors: int

    def clean(self) -> None:
        index = [self.src / "model.safetensors.index.json"] if self.kind == "folder" else []
        for path in [*self.outputs, *index]:
            path.unlink(missing_ok=True)
        if self.cp_target.is_dir():
            shutil.rmtree(self.cp_target)
        else:
            self.cp_target.unlink(missing_ok=True)


def _random_bf16(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(SIDE, SIDE, generator=gen, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def workloads() -> Iterator[dict[str, Workload]]:
    root = Path(tempfile.mkdtemp(prefix="fastadapter-bench-convert-"))
    try:
        gen = torch.Generator().manual_seed(0)
        big = root / "file" / "pytorch_model.bin"
        big.parent.mkdir()
        torch.save({f"model.layers.{i}.weight": _random_bf16(gen) for i in range(FILE_TENSORS)}, big)

        folder = root / "folder"
        folder.mkdir()
        shards, weight_map = [], {}
        for i in range(FOLDER_FILES):
            shard = folder / f"pytorch_model-{i + 1:05d}-of-{FOLDER_FILES:05d}.bin"
            names = [f"model.layers.{i}.mlp.w{j}" for j in range(FOLDER_TENSORS_PER_FILE)]
            torch.save({name: _random_bf16(gen) for name in names}, shard)
            weight_map.update(dict.fromkeys(names, shard.name))
            shards.append(shard)
        total = sum(p.stat().st_size for p in shards)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        os.sync()

        def outputs(paths: list[Path]) -> list[Path]:
            return [Path(default_destination(str(p))) for p in paths]

        yield {
            "file": Workload(
                "file", big, [big], outputs([big]), root / "file-cp.bin", big.stat().st_size, FILE_TENSORS
            ),
            "folder": Workload(
                "folder",
                folder,
                shards,
                outputs(shards),
                root / "folder-cp",
                total,
                FOLDER_FILES * FOLDER_TENSORS_PER_FILE,
            ),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- contenders ----------------------------------------------------------------------------------------


def torch_mmap(src: Path, dst: Path) -> None:
    state = torch.load(src, mmap=True, weights_only=True)
    save_file(state, str(dst), metadata={"format": "pt"})


def hf_convert(src: Path, dst: Path) -> None:
    """safetensors' convert.py `convert_file`, minus the Hub plumbing."""
    loaded = torch.load(src, map_location="cpu", weights_only=True)
    if "state_dict" in loaded:
        loaded = loaded["state_dict"]
    to_removes = _remove_duplicate_names(loaded)
    metadata = {"format": "pt"}
    for kept_name, to_remove_group in to_removes.items():
        for to_remove in to_remove_group:
            if to_remove not in metadata:
                metadata[to_remove] = kept_name
            del loaded[to_remove]
    loaded = {k: v.contiguous() for k, v in loaded.items()}
    save_file(loaded, str(dst), metadata=metadata)
    sf_size, pt_size = dst.stat().st_size, src.stat().st_size
    if (sf_size - pt_size) / pt_size > 0.01:
        raise RuntimeError(f"file size differs by more than 1%: {sf_size} vs {pt_size}")
    reloaded = load_file(str(dst))
    for k in loaded:
        if not torch.equal(loaded[k], reloaded[k]):
            raise RuntimeError(f"The output tensors do not match for key {k}")


def converter(contender: str, work: Workload) -> Callable[[], object]:
    """The timed call: one whole workload."""
    pairs = list(zip(work.sources, work.outputs, strict=True))
    if contender in ("fastadapter", "fastadapter_noverify"):
        verify = contender == "fastadapter"
        if work.kind == "file":
            return lambda: fastadapter.convert(work.src, verify=verify)

        def convert_dir() -> None:
            report = fastadapter.convert_dir(work.src, verify=verify, overwrite=True)
            assert report.ok, report.failed
            assert len(report.converted) == len(work.sources)

        return convert_dir
    if contender in ("torch_mmap", "hf_convert"):
        convert = torch_mmap if contender == "torch_mmap" else hf_convert

        def file_by_file() -> None:
            for src, dst in pairs:
                convert(src, dst)

        return file_by_file
    if contender == "cp":
        flags = ["-r"] if work.kind == "folder" else []
        return lambda: subprocess.run(["cp", *flags, str(work.src), str(work.cp_target)], check=True)
    raise ValueError(f"unknown contender {contender!r}")


def check_output(contender: str, work: Workload) -> None:
    """The outputs of one contender hold the source's tensors (checked once, on a sample)."""
    if contender == "cp":
        return
    for src, dst in list(zip(work.sources, work.outputs, strict=True))[:2]:
        want = torch.load(src, mmap=True, weights_only=True)
        got = load_file(str(dst))
        assert sorted(got) == sorted(want), contender
        for name in list(want)[:4]:
            assert torch.equal(got[name], want[name]), (contender, name)


# --- peak memory ---------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {
            k: int(v.split()[0])
            for k, _, v in (line.partition(":") for line in f)
            if v.strip().endswith("kB")
        }


def measure_memory(contender: str, work: Workload) -> dict[str, float]:
    """Run one conversion in a child; sample its RssAnon/RssFile. Returns growth over the idle child (MB)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    with subprocess.Popen(
        [sys.executable, __file__, "--child", contender, work.kind, str(work.src)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "ready"
            idle = _status(child.pid)
            child.stdin.write("go\n")
            child.stdin.flush()
            peak_anon, peak_file = idle["RssAnon"], idle["RssFile"]
            while child.poll() is None:
                try:
                    now = _status(child.pid)
                    anon, mapped = now["RssAnon"], now["RssFile"]
                except (OSError, KeyError):
                    break  # exiting: a zombie has no memory lines
                peak_anon, peak_file = max(peak_anon, anon), max(peak_file, mapped)
                time.sleep(0.002)
            assert child.wait(timeout=600) == 0, f"{contender}: child failed"
        finally:
            if child.poll() is None:
                child.kill()
    return {
        "anon_peak_mb": (peak_anon - idle["RssAnon"]) / 1024,
        "file_peak_mb": (peak_file - idle["RssFile"]) / 1024,
    }


def _child(contender: str, kind: str, src: str) -> None:
    """Rebuild the workload description from the source path alone and run one conversion on cue."""
    path = Path(src)
    sources = [path] if kind == "file" else sorted(path.glob("pytorch_model-*.bin"))
    outputs = [Path(default_destination(str(p))) for p in sources]
    work = Workload(kind, path, sources, outputs, path.parent / f"{kind}-cp-mem", 0, 0)
    work.clean()
    run = converter(contender, work)
    print("ready", flush=True)
    sys.stdin.readline()
    run()


# --- the benchmark -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "block", "contender"), schedule(), ids=[f"{k}-b{b}-{c}" for k, b, c in schedule()]
)
def test_convert(
    benchmark: Any, workloads: dict[str, Workload], kind: str, block: int, contender: str
) -> None:
    work = workloads[kind]
    run = converter(contender, work)

    def setup() -> None:
        work.clean()
        os.sync()

    benchmark.group = GROUPS[kind]
    benchmark.extra_info.update(
        contender=contender, workload=kind, block=block, bytes=work.nbytes, tensors=work.tensors
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS_PER_BLOCK, iterations=1, warmup_rounds=0)
    benchmark.extra_info["background_cpu"] = load.stop()
    if block == 0:
        check_output(contender, work)
        if contender != "cp":
            setup()
            benchmark.extra_info.update(measure_memory(contender, work))
    work.clean()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--child":
    _child(*sys.argv[2:])
