"""Property tests (hypothesis): random shapes, dtypes and names (unicode, long, odd characters) round-trip
exactly, with the `safetensors` package and `torch.load` as oracles; and for any bytes, our reader accepts
a file exactly when safetensors does (apart from a key listed twice, which we refuse on purpose).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

import fastadapter
from fastadapter import _core

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# Any Unicode except surrogates (not encodable as UTF-8), up to 300 characters: dots, slashes, NULs,
# spaces, emoji, right-to-left marks...
names = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=300).filter(
    lambda n: n != "__metadata__"
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(list(DTYPES)))
    shape = draw(shapes)
    n = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    if dtype is torch.bool:
        raw = bytes(b & 1 for b in raw)  # a bool byte other than 0/1 is not a bool
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        if n
        else torch.empty(shape, dtype=dtype)
    )


state_dicts = st.dictionaries(names, tensors(), max_size=6)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def records(sd: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int], memoryview]]:
    return [(k, DTYPES[t.dtype], list(t.shape), memoryview(raw(t))) for k, t in sd.items()]


@SETTINGS
# One metadata key at most: safetensors orders several keys by hash, so only then are bytes comparable.
@given(sd=state_dicts, metadata=st.none() | st.dictionaries(names, st.text(max_size=50), max_size=1))
def test_written_files_equal_safetensors_bytes_and_read_back_exactly(
    sd: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        _core.write_safetensors(path, records(sd), metadata).commit()
        if sd or metadata != {}:
            assert path.read_bytes() == st_save(sd, metadata)
        else:  # the one case where safetensors 0.8 writes invalid JSON; we write what it meant
            assert st_save(sd, metadata).startswith(b"\x18" + bytes(7) + b"{},")
            assert path.read_bytes() == struct.pack("<Q", 24) + b'{"__metadata__":{}}' + b" " * 5
        f = _core.SafetensorsFile(path)
        data = bytes(memoryview(f))
        assert f.metadata == (metadata or {})
        entries = f.entries()
        assert sorted(e[0] for e in entries) == sorted(sd)
        for name, dtype, shape, start, end in entries:
            t = sd[name]
            assert (dtype, shape) == (DTYPES[t.dtype], list(t.shape))
            assert data[start:end] == raw(t)


@SETTINGS
@given(sd=state_dicts, transpose=st.booleans())
def test_converted_checkpoints_equal_torch_load(sd: dict[str, torch.Tensor], transpose: bool) -> None:
    if transpose:  # non-contiguous views of the same storages
        sd = {k: (t.t() if t.dim() == 2 else t) for k, t in sd.items()}
    with TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "ckpt.bin", Path(tmp) / "ckpt.safetensors"
        torch.save(sd, src)
        oracle = torch.load(src, weights_only=True)
        fastadapter.convert(src, dst)
        with safe_open(dst, "pt") as f:
            assert sorted(f.keys()) == sorted(oracle)
            for k, t in oracle.items():
                got = f.get_tensor(k)
                assert got.dtype == t.dtype
                assert got.shape == t.shape
                assert raw(got) == raw(t), k


def _valid_file(sd: dict[str, torch.Tensor]) -> bytes:
    return st_save(sd, {"format": "pt"})


@settings(SETTINGS, max_examples=200)
@given(
    sd=st.dictionaries(names, tensors(), min_size=1, max_size=3),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 10_000),
)
def test_any_corruption_is_accepted_exactly_when_safetensors_accepts_it(
    sd: dict[str, torch.Tensor], edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_valid_file(sd))
    for at, value in edits:
        data[at % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(bytes(data))
        try:
            with safe_open(path, "pt") as f:
                oracle: Exception | list[str] = sorted(f.keys())
        except (SafetensorError, ValueError) as e:
            oracle = e
        try:
            ours: Exception | list[str] = sorted(e[0] for e in _core.SafetensorsFile(path).entries())
        except fastadapter.HeaderError as e:
            ours = e
        if isinstance(oracle, Exception):
            assert isinstance(ours, fastadapter.HeaderError), ours
            assert str(ours).endswith(str(oracle).split(": ", 1)[1]), (str(ours), str(oracle))
        elif isinstance(ours, Exception):
            assert "appears twice" in str(ours), ours  # our one deliberate extra rule
        else:
            assert ours == oracle


def test_the_corruption_property_can_see_a_difference() -> None:
    # Guard against a property that passes vacuously: one fixed corruption that both refuse, and the
    # untouched file that both accept.
    sd = {"a": torch.arange(4, dtype=torch.float32)}
    good = _valid_file(sd)
    header_len = struct.unpack("<Q", good[:8])[0]
    assert json.loads(good[8 : 8 + header_len])["a"]["data_offsets"] == [0, 16]
    bad = good[:-1]
    with TemporaryDirectory() as tmp:
        p = Path(tmp) / "f"
        p.write_bytes(good)
        assert [e[0] for e in _core.SafetensorsFile(p).entries()] == ["a"]
        p.write_bytes(bad)
        with pytest.raises(fastadapter.HeaderError, match="file not fully covered"):
            _core.SafetensorsFile(p)
