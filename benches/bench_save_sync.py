"""Saves that return only once the files are written, in the three settings of bench_save.py, each
against its own ceiling (issue 16):

- `checkpoint sync <adapter> (...)`: `Checkpointer(async_save=False)` saving an adapter (its files are
  fastadapter.save's plus fastadapter_checkpoint.json, published as `checkpoint-<step>/`). Peers: PEFT's
  `save_pretrained` and safetensors' `save_file` of the adapter's state dict.
- `sharded <model> (...)`: a whole model without adapters (bf16 weights, random) through the same
  Checkpointer, split by `max_shard_size` into `model-0000I-of-0000N.safetensors` + index. Peers:
  transformers' `save_pretrained(max_shard_size=...)` and `torch.save` of the state dict.

Settings: `new_dir` (every round a new step / directory; the previous one removed untimed),
`overwrite` (the same step / directory again), `fsync` (overwrite, durable on return: Checkpointer's
`fsync=True`, the peers' files fsynced after; PEFT and transformers have no durable save and are left
out). Ceiling `raw_write`: one `write()` per file of the same bytes (the weights files only) into a new
directory / over the existing files / plus `fsync`. Targets: within 1.2x of `raw_write`, and at least
1.5x faster than PEFT / transformers in `new_dir` and `overwrite`.

Rounds are interleaved in blocks with the order rotated per block, and every round starts after
`settle()`, as in bench_save.py.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bench_save import SETTINGS, _fsync, _raw_write
from conftest import QUICK, SAFETENSORS_NAME, Adapter, BackgroundLoad, BenchModel, settle, transformers_base
from fastadapter import Checkpointer

# One round per block, the contenders taking turns round by round: the same 268 MB write had medians
# of 234 and 129 ms in two blocks of 3 rounds a minute apart (16:20 UTC).
BLOCKS = 1 if QUICK else 6
ROUNDS_PER_BLOCK = 1
# The sharded model: 2 Llama-7B-shaped layers in bf16 (811 MB), in shards of at most 200 MB (5 files).
SHARDED_LAYERS = 2
MAX_SHARD = "200MB"

CHECKPOINT_CONTENDERS = ("fastadapter", "peft", "safetensors", "raw_write")
SHARDED_CONTENDERS = ("fastadapter", "transformers", "torch_save", "raw_write")
DURABLE = ("fastadapter", "safetensors", "torch_save", "raw_write")  # the contenders that can fsync


def schedule(contenders: tuple[str, ...]) -> list[tuple[str, int, str]]:
    runs = []
    for setting in SETTINGS:
        names = tuple(c for c in contenders if setting != "fsync" or c in DURABLE)
        runs += [(setting, b, names[(b + i) % len(names)]) for b in range(BLOCKS) for i in range(len(names))]
    return runs


def ids(runs: list[tuple[str, int, str]]) -> list[str]:
    return [f"{s}-b{b}-{c}" for s, b, c in runs]


class Steps:
    """The directory and step each round writes: a new one per round (`new_dir`, the previous removed
    untimed) or always the same (the other settings)."""

    def __init__(self, root: Path, fresh: bool) -> None:
        self.root, self.fresh, self.step = root, fresh, 0

    def directory(self) -> Path:
        return self.root / f"checkpoint-{self.step}"

    def setup(self) -> None:
        if self.fresh:
            shutil.rmtree(self.directory(), ignore_errors=True)
            self.step += 1
        settle()


def _timed(benchmark: Any, write: Callable[[], None], steps: Steps, group: str, info: dict[str, Any]) -> None:
    write()  # warm-up; in block 0 it also creates what the overwrite rounds replace
    benchmark.group = group
    benchmark.extra_info.update(info)
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(write, setup=steps.setup, rounds=ROUNDS_PER_BLOCK, iterations=1)
    benchmark.extra_info["background_cpu"] = load.stop()


# -- Checkpointer(async_save=False) of an adapter ------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "block", "contender"),
    schedule(CHECKPOINT_CONTENDERS),
    ids=ids(schedule(CHECKPOINT_CONTENDERS)),
)
def test_checkpoint_sync(
    benchmark: Any, adapter: Adapter, out_root: Path, setting: str, block: int, contender: str
) -> None:
    root = out_root / "sync" / setting / contender
    root.mkdir(parents=True, exist_ok=True)
    steps = Steps(root, fresh=setting == "new_dir")
    fsync = setting == "fsync"
    if contender == "fastadapter":
        ck = Checkpointer(root, async_save=False, fsync=fsync)

        def write() -> None:
            ck.save(steps.step, adapter.model)

    elif contender == "peft":

        def write() -> None:
            adapter.model.save_pretrained(str(steps.directory()))

    elif contender == "safetensors":

        def write() -> None:
            steps.directory().mkdir(exist_ok=True)
            target = steps.directory() / SAFETENSORS_NAME
            save_file(adapter.state_dict, str(target), metadata={"format": "pt"})
            if fsync:
                _fsync(target)

    else:

        def write() -> None:
            _raw_write(steps.directory(), adapter.payload, fsync)

    _timed(
        benchmark,
        write,
        steps,
        f"checkpoint sync {adapter.name} ({setting})",
        dict(
            contender=contender,
            adapter=adapter.name,
            setting=setting,
            block=block,
            bytes=adapter.nbytes,
            tensors=adapter.tensors,
        ),
    )
    if contender == "fastadapter" and block == 0:
        # Outside the timing: the checkpoint holds PEFT's exact weights file.
        ours = (steps.directory() / SAFETENSORS_NAME).read_bytes()
        assert ours == adapter.payload, "the checkpoint's adapter_model.safetensors differs from PEFT's"


# -- the sharded full-model save ------------------------------------------------------------------------


class Sharded:
    def __init__(self, model: BenchModel, files: dict[str, bytes], root: Path) -> None:
        self.model, self.files, self.root = model, files, root
        self.state_dict = model.state_dict()
        self.nbytes = sum(len(b) for n, b in files.items() if n.endswith(".safetensors"))
        self.tensors = len(self.state_dict)
        self.name = f"{SHARDED_LAYERS}-layer Llama bf16"


@pytest.fixture(scope="module")
def sharded() -> Iterator[Sharded]:
    model = transformers_base("llama", layers=SHARDED_LAYERS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=gen)  # real bytes: untouched pages would read as zeros
    root = Path(tempfile.mkdtemp(prefix="fastadapter-bench-sharded-"))
    try:
        with Checkpointer(root / "reference", async_save=False, fsync=False, max_shard_size=MAX_SHARD) as ck:
            ck.save(0, model)
        reference = root / "reference" / "checkpoint-0"
        files = {p.name: p.read_bytes() for p in sorted(reference.iterdir()) if "model" in p.name}
        assert sum(n.endswith(".safetensors") for n in files) > 1, "expected several shards"
        yield Sharded(model, files, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("setting", "block", "contender"), schedule(SHARDED_CONTENDERS), ids=ids(schedule(SHARDED_CONTENDERS))
)
def test_sharded(benchmark: Any, sharded: Sharded, setting: str, block: int, contender: str) -> None:
    root = sharded.root / setting / contender
    root.mkdir(parents=True, exist_ok=True)
    steps = Steps(root, fresh=setting == "new_dir")
    fsync = setting == "fsync"
    if contender == "fastadapter":
        ck = Checkpointer(root, async_save=False, fsync=fsync, max_shard_size=MAX_SHARD)

        def write() -> None:
            ck.save(steps.step, sharded.model)

    elif contender == "transformers":

        def write() -> None:
            sharded.model.save_pretrained(str(steps.directory()), max_shard_size=MAX_SHARD)

    elif contender == "torch_save":

        def write() -> None:
            steps.directory().mkdir(exist_ok=True)
            target = steps.directory() / "pytorch_model.bin"
            torch.save(sharded.state_dict, target)
            if fsync:
                _fsync(target)

    else:

        def write() -> None:
            steps.directory().mkdir(exist_ok=True)
            for name, payload in sharded.files.items():
                if name.endswith(".safetensors"):
                    _raw_write(steps.directory(), payload, fsync, name)

    _timed(
        benchmark,
        write,
        steps,
        f"sharded {sharded.name} ({setting})",
        dict(
            contender=contender,
            setting=setting,
            block=block,
            bytes=sharded.nbytes,
            tensors=sharded.tensors,
        ),
    )
    if block == 0 and contender == "fastadapter":
        for name, payload in sharded.files.items():
            assert (steps.directory() / name).read_bytes() == payload, f"{name} differs from the reference"
    if block == 0 and contender == "transformers":
        assert_same_shards(steps.directory(), sharded.root / "reference" / "checkpoint-0")


def assert_same_shards(theirs: Path, ours: Path) -> None:
    """Outside the timing: the Checkpointer's shards are transformers' shards (same file names, the same
    tensors in each)."""
    from safetensors import safe_open

    names = sorted(p.name for p in theirs.glob("model-*.safetensors"))
    assert names == sorted(p.name for p in ours.glob("model-*.safetensors")), names
    for name in names:
        with safe_open(theirs / name, "pt") as f:
            expected = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        with safe_open(ours / name, "pt") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k]) for k in got), name
    assert (theirs / "model.safetensors.index.json").is_file()
