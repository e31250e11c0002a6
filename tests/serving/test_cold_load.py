"""Loads of an adapter whose file is not in the page cache (evicted with `posix_fadvise(DONTNEED)`): the
prefetch reads it on several threads, and what the model ends up with is exactly what a warm load gives;
files that are cut short are refused as before, with the model unchanged; and a read that fails under
the mapping (the file shrank after it was checked) is an `OSError` naming the file, the adapter taken out.

The adapter is 16 MB (five of the prefetch's 4 MiB pieces), so a cold load goes through the parallel path.
On a file system whose pages cannot be evicted (tmpfs) the cold cases are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import fastadapter
from fastadapter import _hotswap, _read
from fastadapter._core import SafetensorsFile
from helpers import SAFETENSORS, assert_same_state, model_state, perturb_trainable

WIDTH, LAYERS, RANK = 1024, 4, 256  # 4 x (A + B) x 256 x 1024 fp32 = 16.8 MB


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def base() -> nn.Module:
    torch.manual_seed(0)
    return Stack().eval()


def config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=r"layers\.\d+")


def saved(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(base(), config())
    perturb_trainable(model, seed)
    model.save_pretrained(str(directory))
    return directory


def evict(path: Path) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_cold(path: Path) -> bool:
    """Evict the file, then prefetch it to the end: whether the prefetch found it out of the cache."""
    evict(path)
    file = SafetensorsFile(str(path))
    file.prefetch()
    return file.stop_prefetch(wait=True)


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    directory = saved(tmp_path / "a", seed=1)
    if not read_cold(directory / SAFETENSORS):
        pytest.skip("the file system here keeps the file's pages in memory (tmpfs?): nothing is cold")
    return directory


INPUT = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0))


def lora_tensors(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    return {
        k.replace(f".{name}", ""): v
        for k, v in model.state_dict().items()
        if "lora_" in k and f".{name}." in k
    }


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in load_file(directory / SAFETENSORS).items()}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_a_warm_file_is_not_read_as_cold(adapter: Path) -> None:
    file = SafetensorsFile(str(adapter / SAFETENSORS))  # read_cold left every page in the cache
    file.prefetch()
    assert file.stop_prefetch(wait=True) is False


@pytest.mark.parametrize("host", ["fastadapter", "peft"])
def test_cold_load_gives_the_files_tensors_and_peft_logits(adapter: Path, host: str) -> None:
    expected = PeftModel.from_pretrained(base(), str(adapter)).eval()
    oracle = expected(INPUT)
    evict(adapter / SAFETENSORS)
    if host == "peft":  # into a PeftModel that holds another adapter: PEFT's layers, a second name
        model: nn.Module = PeftModel.from_pretrained(base(), str(saved(adapter.parent / "b", seed=2)))
        fastadapter.load(model, adapter, adapter_name="cold")
        fastadapter.set_adapter(model, "cold")
        name = "cold"
    else:
        model = fastadapter.load(base(), adapter)
        name = "default"
    got = lora_tensors(model, name)
    assert_same({k.removeprefix("base_model.model."): v for k, v in got.items()}, file_tensors(adapter))
    assert torch.equal(model(INPUT), oracle)


def test_cold_hotswap_gives_the_files_tensors(adapter: Path) -> None:
    other = saved(adapter.parent / "b", seed=2)
    model = fastadapter.load(base(), other)
    pointers = {k: v.data_ptr() for k, v in lora_tensors(model).items()}
    evict(adapter / SAFETENSORS)
    fastadapter.hotswap(model, adapter)
    got = lora_tensors(model)
    assert {k: v.data_ptr() for k, v in got.items()} == pointers  # in place
    assert_same(got, file_tensors(adapter))
    assert torch.equal(model(INPUT), fastadapter.load(base(), adapter)(INPUT))


@pytest.mark.parametrize("cut", ["data", "header"])
def test_cold_file_cut_short_is_refused_and_the_model_unchanged(adapter: Path, cut: str) -> None:
    path = adapter / SAFETENSORS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096] if cut == "data" else data[:100])
    model = PeftModel.from_pretrained(base(), str(saved(adapter.parent / "b", seed=2)))
    before = model_state(model)
    evict(path)
    with pytest.raises(ValueError, match=str(path)):
        fastadapter.load(model, adapter, adapter_name="cold")
    assert model_state(model) == before


def test_prefetch_error_is_an_oserror_naming_the_file(adapter: Path) -> None:
    path = adapter / SAFETENSORS
    file = SafetensorsFile(str(path))
    os.truncate(path, 4096)  # the pages past it vanish from under the mapping
    file.prefetch()
    with pytest.raises(OSError, match="Bad address") as raised:  # EFAULT, where a read would be SIGBUS
        file.stop_prefetch(wait=True)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("host", ["fastadapter", "peft"])
def test_file_shrunk_during_a_load_fails_it_and_takes_the_adapter_out(
    adapter: Path, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is cut after it was opened and checked: the prefetch meets the missing pages, and the load
    raises instead of handing out weights whose first read would kill the process (SIGBUS). The prefetch
    overlaps the building of the layers, so the adapter is in the model by then: it is deleted again, and
    the model is left as it was (active adapter, requires_grad, train/eval flags, every tensor)."""
    path = adapter / SAFETENSORS
    real = _read.read_weights

    def shrinking(directory: str, name: str) -> Any:
        incoming = real(directory, name)
        assert incoming.mapped is not None
        incoming.mapped.stop_prefetch(wait=True)  # the load's own prefetch, finished before the cut
        os.truncate(path, 4096)
        incoming.cold = incoming.mapped.prefetch()
        assert incoming.cold
        return incoming

    monkeypatch.setattr("fastadapter.adapters.read_weights", shrinking)
    if host == "peft":
        model: nn.Module = PeftModel.from_pretrained(base(), str(saved(adapter.parent / "b", seed=2)))
    else:
        model = base()
    model.train()  # the load's eval() and freezing must be undone too
    before, state = model(INPUT), model_state(model)
    with pytest.raises(OSError, match="Bad address") as raised:
        fastadapter.load(model, adapter, adapter_name="cold")
    assert str(path) in str(raised.value)
    assert_same_state(model_state(model), state)
    assert torch.equal(model(INPUT), before)


@pytest.mark.parametrize("weights", ["mapped", "own"])
def test_hotswap_of_a_file_shrunk_under_it_is_refused_with_the_model_unchanged(
    adapter: Path, monkeypatch: pytest.MonkeyPatch, weights: str
) -> None:
    """Weights that are views of a file (mapped over: the length is checked before the mapping) and
    weights of their own (copied into: the prefetch's read fails before the copies)."""
    path = adapter / SAFETENSORS
    model = fastadapter.load(base(), saved(adapter.parent / "b", seed=2))
    if weights == "own":
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.data = p.data.clone()  # same parameters, memory of their own
    before = {k: v.clone() for k, v in lora_tensors(model).items()}
    real = _hotswap._open

    def shrinking(directory: str, name: str) -> Any:
        incoming = real(directory, name)
        assert incoming.mapped is not None
        incoming.mapped.stop_prefetch(wait=True)
        os.truncate(path, 4096)
        evict(path)
        incoming.mapped.prefetch(only_cold=True)
        return incoming

    monkeypatch.setattr("fastadapter._hotswap._open", shrinking)
    error, match = (fastadapter.HeaderError, "resized") if weights == "mapped" else (OSError, "Bad address")
    with pytest.raises(error, match=match) as raised:
        fastadapter.hotswap(model, adapter)
    assert str(path) in str(raised.value)
    assert_same(lora_tensors(model), before)
