"""The native module ``fastadapter._core``, checked against the ``safetensors`` package as the oracle.

Writing: every file ``write_safetensors`` produces must be byte-identical to ``safetensors.torch.save_file``
of the same tensors. Reading: ``SafetensorsFile`` must accept exactly what ``safetensors.safe_open``
accepts, report the same offsets, and refuse malformed files for the same reason.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import fastadapter
from fastadapter import _core

# Every dtype safetensors 0.8 can save from torch, with its on-disk name. 8-bit floats only where this
# torch has them.
DTYPE_NAMES: dict[torch.dtype, str] = {
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
    torch.complex64: "C64",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
}
for _attr, _name in [
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
]:
    if hasattr(torch, _attr):
        DTYPE_NAMES[getattr(torch, _attr)] = _name

PT_METADATA = {"format": "pt"}


# --- helpers -------------------------------------------------------------------------------------------


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Seeded values of any dtype: random bytes reinterpreted, except bool (only 0/1 are valid) and
    floats (random bits could be NaN, fine for bytes but confusing in failure output)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.randn(shape, generator=g).to(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def as_buffer(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a C-contiguous uint8 buffer (how the Python layer hands tensors to Rust)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def core_specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int], np.ndarray]]:
    return [(name, DTYPE_NAMES[t.dtype], list(t.shape), as_buffer(t)) for name, t in tensors.items()]


def write_with_core(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    _core.write_safetensors(path, core_specs(tensors), metadata).commit()
    return path.read_bytes()


def write_with_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> bytes:
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def assert_core_matches_safetensors(
    tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = PT_METADATA
) -> bytes:
    expected = write_with_safetensors(tmp_path / "oracle.safetensors", tensors, metadata)
    got = write_with_core(tmp_path / "core.safetensors", tensors, metadata)
    assert len(got) == len(expected)
    assert got == expected
    return got


def leftover_temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def raw_file(header: bytes, data: bytes = b"", declared_len: int | None = None) -> bytes:
    """A file's bytes from an explicit header, bypassing every writer-side check."""
    n = len(header) if declared_len is None else declared_len
    return struct.pack("<Q", n) + header + data


def compact_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def f32_entry(n: int, start: int, end: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, end]}


# --- writing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=lambda d: DTYPE_NAMES[d])
def test_every_dtype_is_byte_identical_to_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": random_tensor((3, 5), dtype, seed=1),
        "scalar": random_tensor((), dtype, seed=2),
        "empty": random_tensor((0, 4), dtype, seed=3),
        "cube": random_tensor((2, 3, 4), dtype, seed=4),
    }
    data = assert_core_matches_safetensors(tmp_path, tensors)
    # Not vacuous: the file holds every tensor with its dtype.
    with safe_open(tmp_path / "core.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert bytes(as_buffer(f.get_tensor(name))) == bytes(as_buffer(t))
    assert len(data) > 8


def test_mixed_dtypes_are_ordered_like_safetensors(tmp_path: Path) -> None:
    # One tensor of every dtype in one file: the order (alignment, then name) must match.
    tensors = {
        f"t{i}.{DTYPE_NAMES[d]}": random_tensor((i + 1, 3), d, seed=i) for i, d in enumerate(DTYPE_NAMES)
    }
    assert_core_matches_safetensors(tmp_path, tensors)


def test_names_sort_as_raw_bytes_including_unicode_and_dots(tmp_path: Path) -> None:
    names = ["b.10", "b.2", "b.1", "B", "a", "é", "ä.weight", "日本.lora_A.weight", "z" * 200, "a.b.c.d"]
    tensors = {n: random_tensor((2,), torch.float32, seed=i) for i, n in enumerate(names)}
    assert_core_matches_safetensors(tmp_path, tensors)
    f = _core.SafetensorsFile(tmp_path / "core.safetensors")
    assert [e[0] for e in f.entries()] == sorted(names, key=lambda n: n.encode())


@pytest.mark.parametrize("metadata", [None, {}, PT_METADATA], ids=["none", "empty", "pt"])
def test_metadata_variants_are_byte_identical(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = {"w": random_tensor((4, 4), torch.float32)}
    assert_core_matches_safetensors(tmp_path, tensors, metadata)


def split_file(data: bytes) -> tuple[dict[str, object], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_several_metadata_keys_give_the_same_header_and_data(tmp_path: Path) -> None:
    # safetensors writes several metadata keys in hash-map order (it differs between runs), so only the
    # parsed header and the data can be compared; with one key (what PEFT writes) the bytes are fixed.
    metadata = {"format": "pt", "note": 'ünïcode "quoted"\n', "a": ""}
    tensors = {"w": random_tensor((4, 4), torch.float32), "v": random_tensor((3,), torch.bfloat16)}
    expected = write_with_safetensors(tmp_path / "o", tensors, metadata)
    got = write_with_core(tmp_path / "c", tensors, metadata)
    assert len(got) == len(expected)
    assert split_file(got) == split_file(expected)
    assert _core.SafetensorsFile(tmp_path / "c").metadata == metadata


def test_no_tensors_is_byte_identical(tmp_path: Path) -> None:
    assert_core_matches_safetensors(tmp_path, {})


def test_large_tensors_written_in_parallel_chunks_are_byte_identical(tmp_path: Path) -> None:
    # Above the core's parallel threshold and its 8 MiB write batch, so chunking and threads are exercised.
    tensors = {
        "big": random_tensor((3 * 1024 * 1024 + 7,), torch.float32, seed=5),
        "mid": random_tensor((1024, 1023), torch.bfloat16, seed=6),
        "small": random_tensor((3,), torch.int8, seed=7),
    }
    assert_core_matches_safetensors(tmp_path, tensors)


def test_more_tensors_than_one_vectored_write_takes(tmp_path: Path) -> None:
    # Linux caps one pwritev at 1024 slices; 1500 tensors need several batches.
    tensors = {f"layer.{i}.w": random_tensor((i % 5 + 1,), torch.float16, seed=i) for i in range(1500)}
    assert_core_matches_safetensors(tmp_path, tensors)


def test_plan_header_matches_the_written_file(tmp_path: Path) -> None:
    tensors = {"b.2": random_tensor((2, 3), torch.float32), "a": random_tensor((5,), torch.bfloat16)}
    data = write_with_safetensors(tmp_path / "o.safetensors", tensors, PT_METADATA)
    specs = [
        (n, DTYPE_NAMES[t.dtype], list(t.shape), t.numel() * t.dtype.itemsize) for n, t in tensors.items()
    ]
    header, offsets, total = _core.plan_header(specs, PT_METADATA)
    assert data[: len(header)] == header
    assert total == len(data)
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        for (name, t), offset in zip(tensors.items(), offsets, strict=True):
            nbytes = t.numel() * t.dtype.itemsize
            assert data[offset : offset + nbytes] == bytes(as_buffer(f.get_tensor(name)))


def test_nothing_is_published_before_commit(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    pending = _core.write_safetensors(
        target, core_specs({"w": random_tensor((3,), torch.float32)}), PT_METADATA
    )
    assert not target.exists()
    temp = Path(pending.temp_path)
    assert temp.parent == tmp_path
    assert temp.exists()
    assert leftover_temp_files(tmp_path) == [temp.name]
    pending.commit()
    assert target.exists()
    assert leftover_temp_files(tmp_path) == []


def test_existing_target_is_unchanged_until_commit(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    old = write_with_safetensors(target, {"w": random_tensor((3,), torch.float32, seed=1)}, PT_METADATA)
    new = {"w": random_tensor((3,), torch.float32, seed=2)}
    pending = _core.write_safetensors(target, core_specs(new), PT_METADATA)
    assert target.read_bytes() == old
    pending.commit()
    assert target.read_bytes() == write_with_safetensors(tmp_path / "o", new, PT_METADATA)


def _held_deleted_files() -> list[str]:
    """Files this process holds open that no longer have a name."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.endswith(" (deleted)"):
            out.append(target)
    return out


def test_a_replaced_large_file_is_released_in_the_background(tmp_path: Path) -> None:
    # Freeing a large replaced file costs as much as writing the new one, so commit leaves it to a
    # background thread; wait_released() shows it is then really gone (not held open, not leaked).
    target = tmp_path / "w.safetensors"
    _core.wait_released()
    before = _held_deleted_files()
    for seed in range(3):
        big = {"w": random_tensor((1 << 20,), torch.float32, seed=seed)}  # 4 MiB
        _core.write_safetensors(target, core_specs(big), PT_METADATA).commit()
        assert target.read_bytes() == write_with_safetensors(tmp_path / "o", big, PT_METADATA)
    _core.wait_released()
    assert _held_deleted_files() == before


def test_discard_leaves_no_temp_file_and_the_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")
    pending = _core.write_safetensors(target, core_specs({"w": random_tensor((3,), torch.float32)}), None)
    pending.discard()
    pending.discard()  # idempotent
    assert target.read_bytes() == b"old"
    assert leftover_temp_files(tmp_path) == []
    with pytest.raises(RuntimeError, match="already committed or discarded"):
        pending.commit()


def test_dropping_an_uncommitted_file_removes_its_temp_file(tmp_path: Path) -> None:
    pending = _core.stage_bytes(tmp_path / "c.json", b"{}")
    assert len(leftover_temp_files(tmp_path)) == 1
    del pending
    assert leftover_temp_files(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_committed_file_mode_follows_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        _core.write_safetensors(tmp_path / "w.safetensors", [], None).commit()
        _core.stage_bytes(tmp_path / "c.json", b"{}").commit()
        # The oracle for "usual permissions": a file created by plain open().
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == expected


def test_stage_bytes_publishes_exact_bytes_on_commit_only(tmp_path: Path) -> None:
    target = tmp_path / "adapter_config.json"
    payload = json.dumps({"r": 8, "ü": [1, 2]}, indent=2, sort_keys=True).encode()
    pending = _core.stage_bytes(target, payload)
    assert not target.exists()
    assert Path(pending.temp_path).read_bytes() == payload
    assert Path(pending.target) == target
    pending.commit()
    assert target.read_bytes() == payload
    assert leftover_temp_files(tmp_path) == []


def test_fsync_option_gives_the_same_bytes(tmp_path: Path) -> None:
    tensors = {"w": random_tensor((4, 2), torch.float32)}
    _core.write_safetensors(tmp_path / "a", core_specs(tensors), PT_METADATA, fsync=True).commit()
    assert (tmp_path / "a").read_bytes() == write_with_safetensors(tmp_path / "b", tensors, PT_METADATA)


# --- writer refusals -----------------------------------------------------------------------------------


def test_duplicate_names_are_a_tensor_error_and_write_nothing(tmp_path: Path) -> None:
    buf = as_buffer(random_tensor((2,), torch.float32))
    with pytest.raises(fastadapter.TensorError, match="duplicate tensor name `a`"):
        _core.write_safetensors(tmp_path / "w", [("a", "F32", [2], buf), ("a", "F32", [2], buf)])
    assert list(tmp_path.iterdir()) == []


def test_buffer_size_must_match_shape_and_dtype(tmp_path: Path) -> None:
    buf = as_buffer(random_tensor((3,), torch.float32))
    with pytest.raises(fastadapter.TensorError, match="tensor `w`") as info:
        _core.write_safetensors(tmp_path / "w", [("w", "F32", [4], buf)])
    assert isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_unknown_dtype_is_a_tensor_error(tmp_path: Path) -> None:
    buf = as_buffer(random_tensor((2,), torch.float32))
    with pytest.raises(fastadapter.TensorError, match="F128"):
        _core.write_safetensors(tmp_path / "w", [("w", "F128", [1], buf)])
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_buffer_is_refused(tmp_path: Path) -> None:
    strided = np.arange(16, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="not C-contiguous"):
        _core.write_safetensors(tmp_path / "w", [("w", "U8", [8], strided)])
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_file_not_found_naming_the_path(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "w.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        _core.write_safetensors(target, [], None)
    assert str(target) in str(info.value.filename)
    with pytest.raises(FileNotFoundError):
        _core.stage_bytes(target, b"x")


# --- reading -------------------------------------------------------------------------------------------


def test_entries_agree_with_safe_open(tmp_path: Path) -> None:
    tensors = {
        "base_model.model.l.0.q.lora_A.weight": random_tensor((4, 16), torch.float32, seed=1),
        "base_model.model.l.0.q.lora_B.weight": random_tensor((16, 4), torch.float32, seed=2),
        "emb": random_tensor((7, 3), torch.bfloat16, seed=3),
        "ids": random_tensor((5,), torch.int64, seed=4),
        "mask": random_tensor((2, 2), torch.bool, seed=5),
        "scalar": random_tensor((), torch.float16, seed=6),
        "empty": random_tensor((0,), torch.float32, seed=7),
    }
    path = tmp_path / "m.safetensors"
    data = write_with_safetensors(path, tensors, PT_METADATA)
    f = _core.SafetensorsFile(path)
    entries = f.entries()
    assert len(f) == len(entries) == len(tensors)
    assert f.metadata == PT_METADATA
    assert Path(f.path) == path
    (header_len,) = struct.unpack("<Q", data[:8])
    assert f.header_len == 8 + header_len
    with safe_open(path, "pt") as oracle:
        assert sorted(e[0] for e in entries) == sorted(oracle.keys())
        for name, dtype, shape, start, end in entries:
            t = oracle.get_tensor(name)
            assert dtype == DTYPE_NAMES[t.dtype]
            assert shape == list(t.shape)
            assert data[start:end] == bytes(as_buffer(t))
    # File (offset) order, back to back from the end of the header to the end of the file.
    starts = [e[3] for e in entries]
    assert starts == sorted(starts)
    assert entries[0][3] == f.header_len
    assert entries[-1][4] == len(data)
    assert all(a[4] == b[3] for a, b in itertools.pairwise(entries))


def test_metadata_is_empty_when_the_file_has_none(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": random_tensor((2,), torch.float32)}, str(path))
    with safe_open(path, "pt") as oracle:
        assert oracle.metadata() is None
    assert _core.SafetensorsFile(path).metadata == {}


def test_frombuffer_sees_the_whole_file_and_writes_stay_private(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    data = write_with_safetensors(path, {"w": random_tensor((8, 8), torch.float32)}, PT_METADATA)
    f = _core.SafetensorsFile(path)
    whole = torch.frombuffer(f, dtype=torch.uint8)
    assert whole.numel() == len(data)
    assert bytes(whole.numpy()) == data
    # A tensor viewed on the mapping, as the loader builds them.
    (name, _, shape, start, end) = f.entries()[0]
    w = whole[start:end].view(torch.float32).reshape(shape)
    with safe_open(path, "pt") as oracle:
        assert torch.equal(w, oracle.get_tensor(name))
    w.fill_(42.0)
    assert bytes(whole[start:end].numpy()) == np.full(64, 42.0, dtype=np.float32).tobytes()
    # Copy-on-write: neither the file nor a fresh mapping of it sees the write.
    assert path.read_bytes() == data
    assert bytes(torch.frombuffer(_core.SafetensorsFile(path), dtype=torch.uint8).numpy()) == data


def test_the_buffer_outlives_the_python_object(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    data = write_with_safetensors(path, {"w": random_tensor((16,), torch.float32)}, PT_METADATA)
    whole = torch.frombuffer(_core.SafetensorsFile(path), dtype=torch.uint8)
    # The exported buffer keeps the mapping alive after the last Python reference is gone.
    assert bytes(whole.numpy()) == data


def _lora_file(tmp_path: Path) -> _core.SafetensorsFile:
    names = [
        "base_model.model.l.0.q.lora_A.weight",
        "base_model.model.l.0.q.lora_B.weight",
        "base_model.model.l.1.q.lora_A.weight",
        "base_model.model.l.0.q.lora_magnitude_vector",
        "base_model.model.score.weight",
        "other.weight",
    ]
    path = tmp_path / "lora.safetensors"
    save_file({n: random_tensor((2,), torch.float32, seed=i) for i, n in enumerate(names)}, str(path))
    return _core.SafetensorsFile(path)


def python_select(
    entries: list[tuple[str, str, list[int], int, int]],
    prefix: str | None,
    pattern: str | None,
    renames: list[tuple[str, str]],
) -> list[tuple[str, str, list[int], int, int]]:
    """The oracle for select(): the same filter and renames with Python's re (patterns used here mean the
    same in both regex dialects; replacements use Python's group syntax)."""
    out = []
    for name, *rest in entries:
        if prefix is not None and not name.startswith(prefix):
            continue
        if pattern is not None and not re.search(pattern, name):
            continue
        for regex, repl in renames:
            name = re.sub(regex, repl, name)
        out.append((name, *rest))
    return out


@pytest.mark.parametrize(
    ("prefix", "pattern", "renames"),
    [
        (None, None, []),
        ("base_model.model.", None, []),
        (None, r"lora_[AB]", []),
        ("base_model.model.l.0", r"lora_", []),
        ("nothing.matches", None, []),
        (
            "base_model.model.",
            r"lora_",
            [
                (r"^base_model\.model\.", ""),
                (r"\.(lora_[AB])\.weight$", (".$1.default.weight", r".\1.default.weight")),
            ],
        ),
    ],
    ids=["all", "prefix", "pattern", "both", "none", "renames"],
)
def test_select_filters_and_renames_like_python_re(
    tmp_path: Path, prefix: str | None, pattern: str | None, renames: list[tuple[str, object]]
) -> None:
    f = _lora_file(tmp_path)
    # Each replacement is either the same in both dialects or a (rust, python) pair.
    rust = [(r, p if isinstance(p, str) else p[0]) for r, p in renames]
    py = [(r, p if isinstance(p, str) else p[1]) for r, p in renames]
    got = f.select(prefix=prefix, pattern=pattern, renames=rust)
    assert got == python_select(f.entries(), prefix, pattern, py)


def test_select_renames_into_module_paths(tmp_path: Path) -> None:
    # The concrete mapping the loader needs, spelled out (guards the oracle above against a shared mistake).
    f = _lora_file(tmp_path)
    got = f.select(
        prefix="base_model.model.",
        pattern="lora_",
        renames=[(r"^base_model\.model\.", ""), (r"\.(lora_[AB])\.weight$", ".$1.default.weight")],
    )
    by_old = {e[0]: e for e in f.entries()}
    assert [g[0] for g in got] == [
        "l.0.q.lora_A.default.weight",
        "l.0.q.lora_B.default.weight",
        "l.0.q.lora_magnitude_vector",
        "l.1.q.lora_A.default.weight",
    ]
    assert got[0][1:] == by_old["base_model.model.l.0.q.lora_A.weight"][1:]


def test_rename_collision_is_a_tensor_error(tmp_path: Path) -> None:
    f = _lora_file(tmp_path)
    with pytest.raises(fastadapter.TensorError, match="duplicate tensor name `x`") as info:
        f.select(pattern=r"lora_A", renames=[(r".*", "x")])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("pattern", "renames"), [("(", None), (None, [("[unclosed", "x")])])
def test_bad_regex_is_a_key_pattern_error(tmp_path: Path, pattern: str | None, renames: list | None) -> None:
    f = _lora_file(tmp_path)
    with pytest.raises(fastadapter.KeyPatternError, match="invalid key pattern") as info:
        f.select(pattern=pattern, renames=renames)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, fastadapter.FastAdapterError)


# --- malformed files -----------------------------------------------------------------------------------

TWO_F32 = {"a": f32_entry(1, 0, 4), "b": f32_entry(1, 4, 8)}
F128 = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}

# Each case differs from the well-formed TWO_F32 file (see the control test below) in one detail.
MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "seven_bytes": b"\x01" * 7,
    "header_len_beyond_file": raw_file(b"{}", declared_len=1000),
    "header_over_limit": raw_file(b"{}", declared_len=100_000_001),
    "invalid_json": raw_file(b"{not json"),
    "invalid_utf8": raw_file(b'{"\xff\xfe":1}'),
    "json_not_an_object": raw_file(b"[]"),
    "unknown_dtype": raw_file(compact_json(F128), bytes(16)),
    "gap": raw_file(compact_json({"a": f32_entry(1, 0, 4), "b": f32_entry(1, 8, 12)}), bytes(12)),
    "overlap": raw_file(compact_json({"a": f32_entry(2, 0, 8), "b": f32_entry(1, 4, 8)}), bytes(8)),
    "not_starting_at_zero": raw_file(compact_json({"a": f32_entry(1, 4, 8)}), bytes(8)),
    "size_not_numel_times_itemsize": raw_file(compact_json({"a": f32_entry(3, 0, 8)}), bytes(8)),
    "trailing_bytes": raw_file(compact_json(TWO_F32), bytes(9)),
    "truncated_data": raw_file(compact_json(TWO_F32), bytes(6)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_a_header_error_for_same_reason_as_safetensors(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(SafetensorError) as oracle, safe_open(path, "pt"):
        pass
    with pytest.raises(fastadapter.HeaderError) as info:
        _core.SafetensorsFile(path)
    message = str(info.value)
    assert str(path) in message
    assert isinstance(info.value, ValueError)
    # safetensors says "Error while deserializing header: <reason>"; we must give the same reason.
    reason = str(oracle.value).split(": ", 1)[1]
    assert message.endswith(reason), (message, reason)


def test_header_over_limit_is_refused_even_when_the_file_is_that_long(tmp_path: Path) -> None:
    # A header of 100,000,008 bytes that really is there: the limit, not the file size, refuses it.
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", 100_000_008) + b"{}")
        fh.truncate(8 + 100_000_008)
    with pytest.raises(SafetensorError, match="header too large"), safe_open(path, "pt"):
        pass
    with pytest.raises(fastadapter.HeaderError, match="header too large"):
        _core.SafetensorsFile(path)


def test_well_formed_control_file_is_accepted_by_both(tmp_path: Path) -> None:
    # The malformed cases differ from this one in a single detail; it must be accepted, or they prove nothing.
    path = tmp_path / "ok.safetensors"
    path.write_bytes(raw_file(compact_json(TWO_F32), bytes(8)))
    with safe_open(path, "pt") as oracle:
        assert sorted(oracle.keys()) == ["a", "b"]
    assert [e[0] for e in _core.SafetensorsFile(path).entries()] == ["a", "b"]


def test_missing_file_is_file_not_found_with_filename(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        _core.SafetensorsFile(path)
    assert info.value.filename == str(path)


def test_directory_is_an_os_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=re.escape(str(tmp_path))) as info:
        _core.SafetensorsFile(tmp_path)
    assert info.value.filename == str(tmp_path)
