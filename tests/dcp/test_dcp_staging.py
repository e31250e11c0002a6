"""Device chunks in `fastadapter.dcp.StorageWriter.write_data` go through one reusable host staging buffer
(pinned for CUDA) instead of a `.to("cpu")` each: the files are still exactly `save_file`'s bytes of the
full tensors, strided and empty tensors included. Without a GPU the same path runs on CPU tensors (the
staged device types are widened for the test); the CUDA case needs a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from fastadapter.dcp import StorageWriter, writer

# One process, no process group: DCP warns that it saves alone, which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def state(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 48, generator=g).to(device),
        "b.weight": torch.randn(48, 64, generator=g).to(device=device, dtype=torch.bfloat16).t(),  # strided
        "c.bias": torch.arange(7, dtype=torch.int64).to(device),
        "d.empty": torch.empty(0, 5).to(device),
    }


def check_staged_save(tmp_path: Path, device: str) -> None:
    tensors = state(device)
    dcp.save(tensors, storage_writer=StorageWriter(tmp_path / "ckpt", sync_files=False), no_dist=True)
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, reference, metadata={"format": "pt"})
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == reference.read_bytes()


def test_cpu_tensors_through_the_staging_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "STAGED_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    check_staged_save(tmp_path, "cpu")
    check_staged_save(tmp_path / "again", "cpu")  # the buffer is reused
    assert writer._STAGING_BUFFER is not None
    assert writer._STAGING_BUFFER.capacity > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_tensors_through_pinned_staging(tmp_path: Path) -> None:
    check_staged_save(tmp_path, "cuda")
    assert writer._STAGING_BUFFER.pinned
