"""Adapters for the save benchmarks, built once per session without paying for base-weight initialisation.

Base weights are bf16 and never initialised (meta device, then `to_empty`): their pages are not even
touched, so a 3 GB base costs almost no memory or time. LoRA weights are fp32 (PEFT upcasts them on a
bf16 base) and filled from a seeded generator, so the files are reproducible and not trivially zero.
"""

from __future__ import annotations

import os

# No model hub, ever: set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.metadata
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

SAFETENSORS_NAME = "adapter_model.safetensors"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# FASTADAPTER_BENCH_QUICK=1: one round per contender and no warm-up round, fewer worker counts in the
# memory benchmark. For smoke runs of the benchmark code only: the figures mean nothing.
QUICK = os.environ.get("FASTADAPTER_BENCH_QUICK") == "1"


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Module | None:
    # pytest only collects test_*.py by default and the project config is not ours to change.
    # A file named on the command line is collected by pytest itself: returning it too would run it twice.
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    # Recorded in the JSON so that compare.py describes the run that produced it, not the machine it runs on.
    machine_info["cpu_model"] = _cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    packages = ("fastadapter", "torch", "peft", "transformers", "safetensors")
    machine_info["packages"] = {name: _version(name) for name in packages}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def settle() -> None:
    """Untimed, before every save round: the previous round's work is finished and on disk, as it would be
    after the training steps between two saves. That includes freeing the files fastadapter replaced,
    which it does on a background thread (see `fastadapter_core::release`): left running, it would land
    in whichever contender's round comes next."""
    from fastadapter import _core

    _core.wait_released()
    os.sync()


class BackgroundLoad:
    """Share of the machine's CPU time that other user-space processes used between start() and stop().

    The machine is shared (builds and tests may run beside the benchmark); a result taken while others
    kept the cores busy is recorded as such instead of being silently compared. Kernel threads and
    interrupts are not counted: they are mostly the writeback our own saves and `os.sync()` cause."""

    def start(self) -> None:
        self._begin = _user_space_ticks()

    def stop(self) -> float:
        busy0, kthreads0, own0, total0 = self._begin
        busy1, kthreads1, own1, total1 = _user_space_ticks()
        others = (busy1 - busy0) - (kthreads1 - kthreads0) - (own1 - own0)
        return max(0.0, others / max(1, total1 - total0))


def _user_space_ticks() -> tuple[int, int, int, int]:
    """(user+nice+system ticks of all CPUs, ticks of kernel threads, ticks of this process, all ticks)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    kthreads = own = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        ticks = int(stat[11]) + int(stat[12])  # utime, stime
        if int(pid) == os.getpid():
            own = ticks
        elif int(stat[6]) & 0x00200000:  # PF_KTHREAD
            kthreads += ticks
    return sum(fields[:3]), kthreads, own, sum(fields)


def uninitialised_linear(in_features: int, out_features: int) -> nn.Linear:
    # Default init of 1024 Linear(1024) takes ~15 s; the benchmark never reads base weights.
    return nn.Linear(in_features, out_features, bias=False, device="meta", dtype=torch.bfloat16)


class Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = uninitialised_linear(hidden, hidden)
        self.k_proj = uninitialised_linear(hidden, hidden)
        self.v_proj = uninitialised_linear(hidden, hidden)
        self.o_proj = uninitialised_linear(hidden, hidden)


class Mlp(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = uninitialised_linear(hidden, intermediate)
        self.up_proj = uninitialised_linear(hidden, intermediate)
        self.down_proj = uninitialised_linear(intermediate, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.self_attn = Attention(hidden)
        self.mlp = Mlp(hidden, intermediate)


class LlamaBody(nn.Module):
    def __init__(self, layers: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(hidden, intermediate) for _ in range(layers))


class LlamaShaped(nn.Module):
    """Llama-7B's projection names and shapes (`model.layers.N.self_attn.q_proj`, ...), no embeddings."""

    def __init__(self, layers: int = 8, hidden: int = 4096, intermediate: int = 11008) -> None:
        super().__init__()
        self.model = LlamaBody(layers, hidden, intermediate)


class ManyLinears(nn.Module):
    """Many small targets: per-tensor overhead dominates, not bandwidth."""

    def __init__(self, count: int = 1024, width: int = 1024) -> None:
        super().__init__()
        self.layers = nn.ModuleList(uninitialised_linear(width, width) for _ in range(count))


class BenchConfig(PretrainedConfig):
    """The transformers config of `BenchModel`: which body (`"llama"`: LlamaShaped, `"many"`: ManyLinears)
    and its constructor's keyword arguments (default: the benchmark's sizes)."""

    model_type = "fastadapter_bench"

    def __init__(self, shape: str = "many", body: dict[str, int] | None = None, **kwargs: Any) -> None:
        self.shape = shape
        self.body = dict(body or {})
        super().__init__(**kwargs)


class BenchModel(PreTrainedModel):
    """A minimal transformers `PreTrainedModel` whose module tree is exactly LlamaShaped's or ManyLinears'
    (`model.layers.N.self_attn.q_proj`, `layers.N`): the same base as the plain-torch contenders, hosted
    by transformers, so that `add_adapter` / `load_adapter` (transformers' PEFT integration) work on it."""

    config_class = BenchConfig

    def __init__(self, config: BenchConfig) -> None:
        super().__init__(config)
        body = bench_body(config.shape, **config.body)
        for name, child in body.named_children():
            self.add_module(name, child)
        self.post_init()


def bench_body(shape: str, **sizes: int) -> nn.Module:
    """The plain-torch base, on the meta device (`to_empty` it)."""
    if shape == "llama":
        return LlamaShaped(**sizes)
    if shape == "many":
        return ManyLinears(**sizes)
    raise ValueError(f"unknown adapter {shape!r}")


def transformers_base(shape: str, **sizes: int) -> BenchModel:
    """A `BenchModel` built on the meta device, then `to_empty`: bf16 base weights never touched."""
    with torch.device("meta"):
        model = BenchModel(BenchConfig(shape, sizes))
    return model.to_empty(device="cpu")


def randomise_lora(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.uniform_(-0.05, 0.05, generator=gen)


def build_peft_model(name: str, **sizes: int) -> PeftModel:
    # A string is a regex over full module names (a list would match name suffixes).
    targets = LLAMA_TARGETS if name == "llama" else r"layers\.\d+"
    base = bench_body(name, **sizes).to_empty(device="cpu")
    config = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(base, config)
    randomise_lora(model)
    return model


@dataclass
class Adapter:
    name: str
    model: PeftModel
    state_dict: dict[str, torch.Tensor]
    reference_dir: Path  # PEFT's own output: the oracle for byte-identity
    payload: bytes  # PEFT's safetensors file; what raw_write writes
    tensors: int

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@pytest.fixture(scope="module", params=["llama", "many"])
def adapter(request: pytest.FixtureRequest) -> Iterator[Adapter]:
    # Module-scoped and parametrised: pytest runs all tests of one adapter, then tears it down before
    # building the next, so the two bases are never resident together.
    model = build_peft_model(request.param)
    reference_dir = Path(tempfile.mkdtemp(prefix=f"fastadapter-bench-ref-{request.param}-"))
    try:
        model.save_pretrained(str(reference_dir))
        state_dict = get_peft_model_state_dict(model)
        payload = (reference_dir / SAFETENSORS_NAME).read_bytes()
        yield Adapter(request.param, model, state_dict, reference_dir, payload, len(state_dict))
    finally:
        shutil.rmtree(reference_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def out_root(adapter: Adapter) -> Iterator[Path]:
    """Holds one directory per contender, kept across the interleaved blocks of one adapter so that every
    round overwrites the same files. Removed with the adapter: runs must not pile up GBs on disk."""
    root = Path(tempfile.mkdtemp(prefix=f"fastadapter-bench-{adapter.name}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
