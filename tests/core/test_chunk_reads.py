"""`_core.ChunkReads`: the blocks of `read_chunks` checked and held once, read again and again (a hotswap
plan's reads into weights of their own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastadapter._core import ChunkReads, SafetensorsFile, read_chunks
from fastadapter.errors import TensorError


def _file(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(16, 64 + i, generator=g) for i in range(5)}
    save_file(tensors, str(path))
    return path


def _blocks(path: Path, outs: list[np.ndarray]) -> list[tuple]:
    entries = sorted(SafetensorsFile(str(path)).entries(), key=lambda e: e[0])
    return [
        (key, out.view(np.uint8).data, start, 4, shape, [0] * len(shape), shape)
        for (key, _, shape, start, _), out in zip(entries, outs, strict=True)
    ]


def _expected(path: Path) -> list[np.ndarray]:
    tensors = SafetensorsFile(str(path))
    return [
        np.frombuffer(bytes(memoryview(tensors)[start:end]), np.float32)
        for _, _, _, start, end in sorted(tensors.entries(), key=lambda e: e[0])
    ]


def test_reads_each_file_laid_out_alike_into_the_same_buffers(tmp_path: Path) -> None:
    first, second = _file(tmp_path / "a.safetensors", 1), _file(tmp_path / "b.safetensors", 2)
    outs = [np.full(16 * (64 + i), np.nan, np.float32) for i in range(5)]
    reads = ChunkReads(_blocks(first, outs))
    assert len(reads) == 5
    for path in (first, second, first):
        assert reads.read(str(path)) == sum(o.nbytes for o in outs)
        for out, want in zip(outs, _expected(path), strict=True):
            np.testing.assert_array_equal(out, want)
    # The same as the one-off function.
    again = [np.zeros_like(o) for o in outs]
    read_chunks(str(second), _blocks(second, again))
    reads.read(str(second))
    for a, b in zip(outs, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_destinations_are_checked_once_when_built(tmp_path: Path) -> None:
    path = _file(tmp_path / "a.safetensors", 1)
    shared = np.zeros(16 * 64 * 2, np.float32)
    blocks = _blocks(path, [np.zeros(16 * (64 + i), np.float32) for i in range(5)])
    overlapping = [
        (*blocks[0][:1], shared[: 16 * 64].view(np.uint8).data, *blocks[0][2:]),
        (*blocks[0][:1], shared[100 : 100 + 16 * 64].view(np.uint8).data, *blocks[0][2:]),
    ]
    with pytest.raises(ValueError, match="overlap"):
        ChunkReads(overlapping)
    frozen = np.zeros(16 * 64, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        ChunkReads([(*blocks[0][:1], memoryview(frozen.view(np.uint8)), *blocks[0][2:])])


def test_a_block_that_does_not_fit_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    path = _file(tmp_path / "a.safetensors", 1)
    outs = [np.full(16 * (64 + i), 7.0, np.float32) for i in range(5)]
    blocks = _blocks(path, outs)
    key, data, start, size, _, at, _ = blocks[4]
    blocks[4] = (key, data, start, size, [16, 60], at, [16, 60])  # the buffer holds 16 x 68 floats
    reads = ChunkReads(blocks)
    with pytest.raises(TensorError, match="t4"):
        reads.read(str(path))
    assert all((o == 7.0).all() for o in outs)
