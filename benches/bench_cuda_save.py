"""Saving a ~1 GB adapter that lives on a GPU: fastadapter vs PEFT vs safetensors, and the
device-to-host staging copy vs torch's own copies.

Skipped with a reason on machines without CUDA. Same adapter as bench_cuda.py (Llama-7B projection
shapes, 32 layers, r=100, fp32 LoRA weights: 448 tensors, 1.0 GB) on a bf16 base that is never
initialised (`to_empty` on the GPU).

`save-cuda 1GB` (files overwritten each round, `settle()` before each):
- `fastadapter`: `fastadapter.save(model, dir)`: the tensors are packed into one reusable pinned host
  buffer with asynchronous copies on a side stream (one synchronisation), then written from it;
- `peft`: `model.save_pretrained(dir)` (one pageable `.cpu()` per tensor inside safetensors);
- `safetensors`: `save_file` of the (CUDA) state dict.
Target: fastadapter at least 3x faster than `peft`.

`d2h 1GB` (every adapter tensor copied to host memory, device synchronised):
- `fastadapter`: `_snapshot.take` into the reused pinned buffer (what the save and the Checkpointer do);
- `per_tensor_cpu`: `t.cpu()` for each tensor (pageable, synchronous);
- `torch_pageable_d2h`: one 1 GB copy from a device buffer into pageable host memory;
- `torch_pinned_d2h`: one 1 GB copy into page-locked host memory: the ceiling.
Target: fastadapter at or above 80% of `torch_pinned_d2h`'s bandwidth.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

import fastadapter
from conftest import LLAMA_TARGETS, SAFETENSORS_NAME, BackgroundLoad, LlamaShaped, randomise_lora, settle
from fastadapter import _snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (GPU benchmarks)")

LAYERS, RANK = 32, 100
ROUNDS = 5
DEVICE = "cuda:0"
SAVE_CONTENDERS = ("fastadapter", "peft", "safetensors")
D2H_CONTENDERS = ("fastadapter", "per_tensor_cpu", "torch_pageable_d2h", "torch_pinned_d2h")


@pytest.fixture(scope="module")
def cuda_model() -> Iterator[PeftModel]:
    base = LlamaShaped(layers=LAYERS).to_empty(device=DEVICE)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=LLAMA_TARGETS)
    model = get_peft_model(base, config)
    randomise_lora(model)
    yield model
    del model, base
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def out_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fastadapter-bench-cuda-save-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sizes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    return sum(t.numel() * t.element_size() for t in state.values()), len(state)


@pytest.mark.parametrize("contender", SAVE_CONTENDERS)
def test_save_cuda(benchmark: Any, cuda_model: PeftModel, out_root: Path, contender: str) -> None:
    out = out_root / contender
    out.mkdir(exist_ok=True)
    state = get_peft_model_state_dict(cuda_model)
    nbytes, tensors = _sizes(state)
    if contender == "fastadapter":

        def run() -> None:
            fastadapter.save(cuda_model, out)

    elif contender == "peft":

        def run() -> None:
            cuda_model.save_pretrained(str(out))

    else:

        def run() -> None:
            save_file(state, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})

    benchmark.group = "save-cuda 1GB"
    benchmark.extra_info.update(
        contender=contender, bytes=nbytes, tensors=tensors, device=torch.cuda.get_device_name(0)
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(run, setup=settle, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["background_cpu"] = load.stop()
    if contender == "fastadapter":  # outside the timing: PEFT's bytes
        reference = out_root / "reference"
        cuda_model.save_pretrained(str(reference))
        assert (out / SAFETENSORS_NAME).read_bytes() == (reference / SAFETENSORS_NAME).read_bytes()


@pytest.mark.parametrize("contender", D2H_CONTENDERS)
def test_d2h(benchmark: Any, cuda_model: PeftModel, contender: str) -> None:
    state = get_peft_model_state_dict(cuda_model)
    nbytes, tensors = _sizes(state)
    buffer = _snapshot.SnapshotBuffer()
    files = [("adapter_model.safetensors", state, {"format": "pt"})]
    device_whole = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    host_whole = torch.empty(nbytes, dtype=torch.uint8, pin_memory=contender == "torch_pinned_d2h")
    host_whole.fill_(0)  # fault the pages in, as a reused buffer would be
    out: list[Any] = []

    def run() -> None:
        if contender == "fastadapter":
            out[:] = [_snapshot.take(buffer, files)]
        elif contender == "per_tensor_cpu":
            out[:] = [t.cpu() for t in state.values()]
        else:
            host_whole.copy_(device_whole, non_blocking=contender == "torch_pinned_d2h")
        torch.cuda.synchronize()

    benchmark.group = "d2h 1GB"
    benchmark.extra_info.update(
        contender=contender, bytes=nbytes, tensors=tensors, device=torch.cuda.get_device_name(0)
    )
    load = BackgroundLoad()
    load.start()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["background_cpu"] = load.stop()
    if contender == "fastadapter":  # outside the timing: the image holds the tensors' exact bytes
        view, (image,) = out[0]
        assert buffer.pinned
        from safetensors.torch import load as load_bytes

        parsed = load_bytes(view[image.start : image.end].numpy().tobytes())
        for key in (next(iter(state)), next(reversed(state))):
            assert torch.equal(parsed[key], state[key].cpu()), key
