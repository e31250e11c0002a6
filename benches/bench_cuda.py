"""Loading a ~1 GB adapter onto a GPU: fastadapter vs PEFT, and the staging copy vs torch's own copies.

Skipped with a reason on machines without CUDA; on a GPU machine `make bench` (or
`pytest benches/bench_cuda.py --benchmark-only --benchmark-json=...` then `benches/compare.py`) runs it.

Adapter: Llama-7B's projection shapes (32 layers, q/k/v/o/gate/up/down), r=100, fp32: 448 tensors, 1.0 GB.
The base is bf16 and never initialised (`to_empty` on the GPU), so rounds pay for the adapter only. The file
stays in the page cache (written just before; every round starts after `os.sync()`).

`load-cuda 1GB` (a round ends when every weight is on the GPU and the device is synchronised):
- `fastadapter`: `fastadapter.load(base, dir)` on the plain model on cuda:0 (pinned staging);
- `fastadapter_per_tensor`: the same with staging turned off (one pageable `.to(cuda)` per tensor, the
  route PEFT and safetensors take): what the staging itself is worth;
- `peft`: `PeftModel.from_pretrained(base, dir)` (random init on the GPU, then overwrite);
- `peft_low_cpu_mem`: the same with `low_cpu_mem_usage=True`.
Target: fastadapter at least 20x faster than `peft`.

`h2d 1GB` (the file's tensors, already mapped, onto cuda:0):
- `fastadapter`: `_device_load.to_devices`: parallel packing into the pinned buffer + chunked async copies;
- `per_tensor_to`: `t.to("cuda")` for each tensor (pageable, synchronous);
- `torch_pageable_h2d`: one 1 GB copy from pageable memory;
- `torch_pinned_h2d`: one 1 GB copy from page-locked memory into a preallocated device tensor: the ceiling.

The save side (device-to-host staging vs torch's pinned D2H bandwidth) is in bench_cuda_save.py.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fastadapter
from conftest import LLAMA_TARGETS, SAFETENSORS_NAME, BackgroundLoad, LlamaShaped, randomise_lora
from fastadapter import _device_load
from fastadapter._core import SafetensorsFile
from fastadapter._tensors import mapped_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (GPU benchmarks)")

LAYERS, RANK = 32, 100  # ~1.0 GB of fp32 LoRA weights on Llama-7B shapes
ROUNDS = 5
DEVICE = "cuda:0"
LOAD_CONTENDERS = ("fastadapter", "fastadapter_per_tensor", "peft", "peft_low_cpu_mem")
H2D_CONTENDERS = ("fastadapter", "per_tensor_to", "torch_pageable_h2d", "torch_pinned_h2d")


@dataclass
class BigAdapter:
    directory: Path
    nbytes: int
    tensors: int
    expected: dict[str, torch.Tensor]  # two of the file's tensors, for the check after the timing


@pytest.fixture(scope="module")
def big_adapter() -> Iterator[BigAdapter]:
    base = LlamaShaped(layers=LAYERS).to_empty(device="cpu")  # never touched: costs no memory
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=LLAMA_TARGETS)
    model = get_peft_model(base, config)
    randomise_lora(model)
    directory = Path(tempfile.mkdtemp(prefix="fastadapter-bench-cuda-"))
    try:
        model.save_pretrained(str(directory))
        file = SafetensorsFile(directory / SAFETENSORS_NAME)
        entries = file.entries()
        mapped = mapped_tensors(file, entries)
        expected = {name: mapped[name].clone() for name, *_ in (entries[0], entries[-1])}
        del model, base, mapped, file
        gc.collect()
        yield BigAdapter(directory, (directory / SAFETENSORS_NAME).stat().st_size, len(entries), expected)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def fresh_base() -> nn.Module:
    return LlamaShaped(layers=LAYERS).to_empty(device=DEVICE)


def lora_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


class LoadRound:
    def __init__(self, contender: str, adapter: BigAdapter) -> None:
        self.contender, self.directory = contender, str(adapter.directory)
        self.model: Any = None

    def setup(self) -> None:
        self.model = None
        gc.collect()
        torch.cuda.synchronize()
        os.sync()
        self.model = fresh_base()
        torch.cuda.synchronize()

    def run(self) -> int:
        c, d = self.contender, self.directory
        if c in ("fastadapter", "fastadapter_per_tensor"):
            loaded = fastadapter.load(self.model, d)
        elif c == "peft":
            loaded = PeftModel.from_pretrained(self.model, d)
        elif c == "peft_low_cpu_mem":
            loaded = PeftModel.from_pretrained(self.model, d, low_cpu_mem_usage=True)
        else:
            raise ValueError(f"unknown contender {c!r}")
        torch.cuda.synchronize()
        self.model = loaded
        return len(lora_weights(loaded))


@pytest.mark.parametrize("contender", LOAD_CONTENDERS)
def test_load_cuda(
    benchmark: Any, big_adapter: BigAdapter, contender: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if contender == "fastadapter_per_tensor":
        monkeypatch.setattr(_device_load, "STAGED_DEVICE_TYPES", frozenset())
    r = LoadRound(contender, big_adapter)
    benchmark.group = "load-cuda 1GB"
    benchmark.extra_info.update(
        contender=contender, bytes=big_adapter.nbytes, tensors=big_adapter.tensors, device=_device_name()
    )
    load = BackgroundLoad()
    load.start()
    run: Callable[[], int] = r.run
    benchmark.pedantic(run, setup=r.setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["background_cpu"] = load.stop()
    # Outside the timing: every weight on the GPU; ours with the file's exact values (PEFT's
    # low_cpu_mem_usage path on a bf16 base rounds fp32 adapter weights through bf16: not compared).
    weights = dict(r.model.named_parameters())
    for key, value in big_adapter.expected.items():
        name = next(n for n in weights if n.endswith(_module_key(key)))
        assert weights[name].device == torch.device(DEVICE)
        if contender.startswith("fastadapter"):
            assert torch.equal(weights[name].cpu(), value)
    r.model = None
    gc.collect()


def _module_key(file_key: str) -> str:
    return file_key.removeprefix("base_model.model.").replace(".weight", ".default.weight")


def _device_name() -> str:
    return torch.cuda.get_device_name(0)


class H2DRound:
    def __init__(self, contender: str, adapter: BigAdapter) -> None:
        self.contender = contender
        self.file = SafetensorsFile(adapter.directory / SAFETENSORS_NAME)
        self.tensors = list(mapped_tensors(self.file, self.file.entries()).values())
        self.out: Any = None
        self.host: torch.Tensor | None = None
        self.device_buffer: torch.Tensor | None = None
        if contender in ("torch_pinned_h2d", "torch_pageable_h2d"):
            whole = torch.frombuffer(self.file, dtype=torch.uint8)
            pinned = contender == "torch_pinned_h2d"
            self.host = torch.empty(whole.numel(), dtype=torch.uint8, pin_memory=pinned)
            self.host.copy_(whole)
            self.device_buffer = torch.empty(whole.numel(), dtype=torch.uint8, device=DEVICE)

    def setup(self) -> None:
        self.out = None
        gc.collect()
        torch.cuda.synchronize()

    def run(self) -> int:
        c = self.contender
        cuda = torch.device(DEVICE)
        if c == "fastadapter":
            self.out = _device_load.to_devices([(t, cuda, t.dtype) for t in self.tensors])
        elif c == "per_tensor_to":
            self.out = [t.to(cuda) for t in self.tensors]
        else:
            assert self.device_buffer is not None
            assert self.host is not None
            self.device_buffer.copy_(self.host, non_blocking=c == "torch_pinned_h2d")
        torch.cuda.synchronize()
        return 0


@pytest.mark.parametrize("contender", H2D_CONTENDERS)
def test_h2d(benchmark: Any, big_adapter: BigAdapter, contender: str) -> None:
    r = H2DRound(contender, big_adapter)
    benchmark.group = "h2d 1GB"
    benchmark.extra_info.update(
        contender=contender, bytes=big_adapter.nbytes, tensors=big_adapter.tensors, device=_device_name()
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(r.run, setup=r.setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["background_cpu"] = load.stop()
    if contender == "fastadapter":
        assert torch.equal(r.out[0].cpu(), r.tensors[0])
        assert torch.equal(r.out[-1].cpu(), r.tensors[-1])


# Save side: bench_cuda_save.py (save of a 1 GB CUDA adapter, device-to-host staging vs torch's pinned D2H).
