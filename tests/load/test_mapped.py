"""Tensors as views of a mapped safetensors file (`_tensors.mapped_tensors`) and the background prefetch
that maps the file's pages in while a load builds its layers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastadapter import _core
from fastadapter._tensors import load_safetensors, mapped_tensors


def test_views_equal_safetensors_for_every_shape(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "matrix": torch.randn(64, 32, generator=g),
        "cube": torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
        "vector": torch.randn(7, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    loaded = load_safetensors(str(path))
    oracle = load_file(str(path))
    assert loaded.keys() == oracle.keys()
    for name, expected in oracle.items():
        got = loaded[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert got.is_contiguous(), name
        assert torch.equal(got, expected), name


def test_a_tensor_not_aligned_to_its_dtype_in_the_file_is_read_correctly(tmp_path: Path) -> None:
    # safetensors does not require alignment: a 1-byte tensor first puts the f32 one at an odd offset,
    # where no typed view of the mapping can reach it.
    values = torch.tensor([1.5, -2.25], dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + values.numpy().tobytes())
    loaded = load_safetensors(str(path))
    assert torch.equal(loaded["a"], torch.tensor([7], dtype=torch.uint8))
    assert torch.equal(loaded["b"], values)
    assert torch.equal(loaded["b"], load_file(str(path))["b"])


def _mapped_kib(file: _core.SafetensorsFile) -> int:
    """How much of the file's mapping is in this process's page tables (`Rss` of its /proc/self/smaps
    entry): what a read would no longer have to fault in."""
    address = torch.frombuffer(file, dtype=torch.uint8).data_ptr()
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "Rss:":
                return int(line.split()[1])
    raise AssertionError("mapping not found in /proc/self/smaps")


def _big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(2048, 1024)}, str(path))  # 8 MiB
    return path


def test_a_finished_prefetch_maps_the_whole_file(tmp_path: Path) -> None:
    path = _big_file(tmp_path)
    file = _core.SafetensorsFile(path)
    file.prefetch()
    file.stop_prefetch(wait=True)
    assert _mapped_kib(file) * 1024 >= path.stat().st_size - 4096
    (w,) = mapped_tensors(file, file.entries()).values()
    assert torch.equal(w, load_file(str(path))["w"])


def test_without_prefetch_the_file_is_mapped_only_as_it_is_read(tmp_path: Path) -> None:
    # The control for the test above: opening reads the header, not the data.
    path = _big_file(tmp_path)
    file = _core.SafetensorsFile(path)
    assert _mapped_kib(file) * 1024 < path.stat().st_size // 4


def test_stopping_a_prefetch_early_or_twice_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(256, 256)}, str(path))
    file = _core.SafetensorsFile(path)
    file.stop_prefetch()  # none running
    file.prefetch()
    file.prefetch()  # one is running: no second thread
    file.stop_prefetch()
    file.stop_prefetch()
    (w,) = mapped_tensors(file, file.entries()).values()
    assert torch.equal(w, load_file(str(path))["w"])


def test_the_mapping_outlives_a_dropped_file_with_a_running_prefetch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(1024, 1024)}, str(path))
    file = _core.SafetensorsFile(path)
    file.prefetch()
    del file  # the prefetch thread holds the mapping until it is done: no crash, nothing leaked
    assert torch.equal(load_safetensors(str(path))["w"], load_file(str(path))["w"])
