"""Hostile `.bin` files: each is refused quickly, with an error that names the problem, nothing published,
no temp file left, bounded memory, and nothing in it ever run.

The code-execution files are armed: their pickles `touch` a marker file when unpickled for real. Each test
converts first (the marker must not appear), then loads the same file with `torch.load(weights_only=False)`
and checks that the marker *does* appear, so the refusal is proven on a payload that really works.
Files are built at test time in `tmp_path`; the pickle snippets follow rust/core/tests/gen_fixtures.py.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import fastadapter
from fastadapter import _core, cli

REPO = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of the child that converts the resource-exhaustion files
MAXRSS_LIMIT_MB = 384

# --- hand-built torch.save zips and pickles (as in rust/core/tests/gen_fixtures.py) ---------------------


def torch_zip(
    path: Path,
    pkl: bytes,
    storages: tuple[tuple[str, bytes], ...] = (),
    byteorder: bytes = b"little",
    names: list[str] | None = None,
    deflate: tuple[str, ...] = (),
) -> Path:
    """A zip laid out the way torch.save lays it out (stored entries under `archive/`)."""
    entries = names or ["archive/data.pkl", "archive/byteorder"] + [f"archive/data/{k}" for k, _ in storages]
    payloads = [pkl, byteorder] + [v for _, v in storages]
    if names is None:
        entries.append("archive/version")
        payloads.append(b"3\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, payload in zip(entries, payloads, strict=False):
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(name, payload, compress_type=method)
    return path


def proto(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def global_op(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def u32(i: int) -> bytes:
    return struct.pack("<I", i)


def i64(i: int) -> bytes:
    return b"\x8a\x08" + struct.pack("<q", i)  # LONG1 with 8 bytes


def call(module: str, name: str, *args: bytes) -> bytes:
    """GLOBAL module.name, MARK args TUPLE, REDUCE."""
    return global_op(module, name) + b"(" + b"".join(args) + b"tR"


def in_dict(key: str, value: bytes) -> bytes:
    return proto(b"}" + unicode(key) + value + b"s")


def float_storage(key: str, numel: bytes) -> bytes:
    """The persistent id torch.save writes for a float32 storage: ('storage', FloatStorage, key, 'cpu', n)."""
    return (
        b"("
        + unicode("storage")
        + global_op("torch", "FloatStorage")
        + unicode(key)
        + unicode("cpu")
        + numel
        + b"tQ"
    )


def rebuild_tensor(storage: bytes, offset: bytes, shape: bytes, stride: bytes) -> bytes:
    hooks = global_op("collections", "OrderedDict") + b")R"
    return call("torch._utils", "_rebuild_tensor_v2", storage, offset, shape, stride, b"\x89", hooks)


def small_checkpoint(path: Path) -> Path:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"w": base, "v": base[1:, ::2], "b": torch.ones(3, dtype=torch.bfloat16)}, path)
    return path


# --- armed payloads ------------------------------------------------------------------------------------


class ShellTouch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch '{self.marker}'",))


class EvalTouch(ShellTouch):
    def __reduce__(self) -> Any:
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class ExecTouch(ShellTouch):
    def __reduce__(self) -> Any:
        return (builtins.exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


class PopenTouch(ShellTouch):
    def __reduce__(self) -> Any:
        return (subprocess.Popen, (["touch", str(self.marker)],))


class CheckCallTouch(ShellTouch):
    def __reduce__(self) -> Any:
        return (subprocess.check_call, (["touch", str(self.marker)],))


class SetStateTouch:
    """No __reduce__: pickled as GLOBAL <class> + NEWOBJ + BUILD; BUILD calls __setstate__."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, str]) -> None:
        open(state["marker"], "w").close()  # the payload


def tensor_with_state(marker: Path) -> torch.Tensor:
    t = torch.ones(3)
    t.payload = ShellTouch(marker)  # type: ignore[attr-defined]  # pickled via _rebuild_from_type_v2's state
    return t


def parameter_with_state(marker: Path) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.ones(3))
    p.payload = ShellTouch(marker)  # type: ignore[attr-defined]  # _rebuild_parameter_with_state
    return p


def saved(build: Callable[[Path], Any], **kwargs: Any) -> Callable[[Path, Path], None]:
    return lambda path, marker: torch.save(build(marker), path, **kwargs)


def crafted(body: Callable[[str], bytes]) -> Callable[[Path, Path], None]:
    return lambda path, marker: torch_zip(path, proto(body(f"touch '{marker}'")))


CODE_EXECUTION: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "os_system": (
        saved(lambda m: {"x": ShellTouch(m)}),
        r"refused GLOBAL posix\.system: module `posix` is blocked",
    ),
    "builtins_eval": (saved(lambda m: {"x": EvalTouch(m)}), r"refused GLOBAL builtins\.eval: not in"),
    "builtins_exec": (saved(lambda m: {"x": ExecTouch(m)}), r"refused GLOBAL builtins\.exec: not in"),
    "subprocess_popen": (
        saved(lambda m: {"x": PopenTouch(m)}),
        r"refused GLOBAL (subprocess|commands)\.Popen",
    ),
    "subprocess_check_call": (
        saved(lambda m: {"x": CheckCallTouch(m)}),
        r"refused GLOBAL (subprocess|commands)\.check_call",
    ),
    "setstate_class": (saved(lambda m: {"x": SetStateTouch(m)}), r"refused GLOBAL \S*SetStateTouch: not in"),
    "after_real_tensors": (
        saved(lambda m: collections.OrderedDict(w=torch.ones(4, 4), b=torch.zeros(4), z=ShellTouch(m))),
        r"refused GLOBAL posix\.system",
    ),
    "nested_in_state_dict": (
        saved(lambda m: {"model": {"layer": {"weight": torch.ones(2), "hook": [1, (2, ShellTouch(m))]}}}),
        r"refused GLOBAL posix\.system",
    ),
    "tensor_state": (saved(lambda m: {"t": tensor_with_state(m)}), r"refused GLOBAL posix\.system"),
    "parameter_state": (saved(lambda m: {"p": parameter_with_state(m)}), r"refused GLOBAL posix\.system"),
    "protocol_4": (
        saved(lambda m: {"x": ShellTouch(m)}, pickle_protocol=4),
        r"refused opcode FRAME \(0x95\)",
    ),
    "crafted_os_system": (
        crafted(lambda cmd: b"}" + unicode("x") + call("os", "system", unicode(cmd)) + b"s"),
        r"refused GLOBAL os\.system: module `os` is blocked",
    ),
    "stack_global": (
        crafted(
            lambda cmd: (
                b"}" + unicode("x") + unicode("os") + unicode("system") + b"\x93" + unicode(cmd) + b"\x85Rs"
            )
        ),
        r"refused opcode STACK_GLOBAL \(0x93\)",
    ),
    "inst_opcode": (
        crafted(lambda cmd: b"}" + unicode("x") + b"(" + unicode(cmd) + b"ios\nsystem\ns"),
        r"refused opcode INST \(0x69\)",
    ),
    "obj_opcode": (
        crafted(lambda cmd: b"}" + unicode("x") + b"(" + global_op("os", "system") + unicode(cmd) + b"os"),
        r"refused GLOBAL os\.system",
    ),
    "getattr_import": (
        # getattr(__import__('os'), 'system')(cmd): every callable reached through allowed-looking builtins.
        crafted(
            lambda cmd: (
                b"}"
                + unicode("x")
                + global_op("builtins", "getattr")
                + global_op("builtins", "__import__")
                + unicode("os")
                + b"\x85R"
                + unicode("system")
                + b"\x86R"
                + unicode(cmd)
                + b"\x85Rs"
            )
        ),
        r"refused GLOBAL builtins\.getattr: not in",
    ),
    "allowed_callable_wrapping_evil": (
        # OrderedDict([('k', os.system(cmd))]): the outer call is allowed, its argument is not.
        crafted(
            lambda cmd: (
                b"}"
                + unicode("x")
                + global_op("collections", "OrderedDict")
                + b"]("
                + unicode("k")
                + call("os", "system", unicode(cmd))
                + b"\x86a\x85Rs"
            )
        ),
        r"refused GLOBAL os\.system",
    ),
}


def wait_for(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


def assert_refused(
    src: Path,
    out: Path,
    error: type[Exception],
    pattern: str,
    *,
    names_file: bool = True,
) -> Exception:
    """Converting `src` into the empty directory `out` fails fast with `error` matching `pattern`, and
    leaves `out` empty (no output, no temp file)."""
    out.mkdir(exist_ok=True)
    dst = out / "out.safetensors"
    start = time.perf_counter()
    with pytest.raises(error, match=pattern) as info:
        fastadapter.convert(src, dst)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{src.name}: refused after {elapsed:.2f} s"
    assert isinstance(info.value, fastadapter.FastAdapterError)
    assert isinstance(info.value, ValueError)
    if names_file:
        assert str(src) in str(info.value), f"message names no file: {info.value}"
    assert not list(out.iterdir()), f"left behind: {list(out.iterdir())}"
    return info.value


@pytest.mark.parametrize("case", list(CODE_EXECUTION))
def test_code_execution_is_refused_and_never_runs(tmp_path: Path, case: str) -> None:
    build, pattern = CODE_EXECUTION[case]
    marker = tmp_path / "PWNED"
    src = tmp_path / "pytorch_model.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickling tensor attributes
        build(src, marker)
    assert not marker.exists()

    err = assert_refused(src, tmp_path / "out", fastadapter.UnsafeCheckpointError, pattern)
    assert "data.pkl byte" in str(err)
    with pytest.raises(fastadapter.UnsafeCheckpointError, match=pattern):
        _core.inspect_torch(src)
    report = fastadapter.convert_dir(tmp_path)
    assert [s for s, _ in report.failed] == [str(src)]
    assert not (tmp_path / "model.safetensors").exists()
    time.sleep(0.05)  # a spawned process would have had time to run
    assert not marker.exists(), "the payload ran"

    # The control: unpickled for real, the same file does run its payload.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):  # the payload runs before whatever fails after it
            torch.load(src, weights_only=False)
    assert wait_for(marker), f"{case}: the payload is not armed, so its refusal proves nothing"


def test_torch_refuses_them_too(tmp_path: Path) -> None:
    # Every code-execution file is one torch.load(weights_only=True) refuses as well: we refuse nothing
    # torch would load, and load nothing it would refuse.
    for case, (build, _) in CODE_EXECUTION.items():
        marker = tmp_path / f"{case}.marker"
        src = tmp_path / f"{case}.bin"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(src, marker)
            with pytest.raises(pickle.UnpicklingError):
                torch.load(src, weights_only=True)
        assert not marker.exists()


def test_cli_refuses_and_exits_1(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for i, (build, _) in enumerate(CODE_EXECUTION.values()):
        build(tmp_path / f"evil{i}.bin", marker)
    good = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.ones(2)}, good)
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    result = subprocess.run(
        [sys.executable, "-m", "fastadapter", "convert", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"FAILED {len(CODE_EXECUTION)}:" in result.stdout
    assert result.stdout.count("refused") == len(CODE_EXECUTION)
    assert "converted 1 file(s)" in result.stdout
    inspect = subprocess.run(
        [sys.executable, "-m", "fastadapter", "inspect", str(tmp_path / "evil0.bin")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert inspect.returncode == 1
    assert "refused GLOBAL" in inspect.stderr
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["adapter_model.safetensors"]
    time.sleep(0.05)
    assert not marker.exists()


# --- malformed pickles and zips ------------------------------------------------------------------------


def ok_pickle(tmp_path: Path) -> bytes:
    """A real data.pkl whose storages live under `archive/`."""
    src = tmp_path / "archive.bin"  # torch.save names the zip's root folder after the file
    small_checkpoint(src)
    with zipfile.ZipFile(src) as z:
        return z.read("archive/data.pkl")


def real_entries(tmp_path: Path) -> dict[str, bytes]:
    src = tmp_path / "archive.bin"
    small_checkpoint(src)
    with zipfile.ZipFile(src) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def rezip(path: Path, entries: dict[str, bytes], deflate: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(
                name, data, compress_type=zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            )
    return path


def with_storage_entry_size(src: Path, dst: Path, size: int) -> Path:
    """`src` with the central directory's sizes of its first storage entry replaced by `size`."""
    data = bytearray(src.read_bytes())
    i = 0
    while (i := data.find(b"PK\x01\x02", i)) >= 0:
        name_len = struct.unpack("<H", data[i + 28 : i + 30])[0]
        if b"/data/" in data[i + 46 : i + 46 + name_len]:
            data[i + 20 : i + 28] = u32(size) * 2
            break
        i += 4
    dst.write_bytes(bytes(data))
    return dst


def flip_storage_byte(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0x40
    dst.write_bytes(bytes(data))
    return dst


def legacy(path: Path) -> Path:
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    return path


CHECKPOINT_ERROR = fastadapter.CheckpointError
UNSAFE = fastadapter.UnsafeCheckpointError

# name -> (build(path, tmp_path), error, pattern)
MALFORMED: dict[str, tuple[Callable[[Path, Path], Path], type[Exception], str]] = {
    "zip_slip": (
        lambda p, t: torch_zip(p, ok_pickle(t), names=["archive/data.pkl", "archive/../evil"]),
        CHECKPOINT_ERROR,
        r"zip entry `archive/\.\./evil`: unsafe name: contains `\.\.`",
    ),
    "absolute_entry": (
        lambda p, t: torch_zip(p, ok_pickle(t), names=["archive/data.pkl", "/etc/evil"]),
        CHECKPOINT_ERROR,
        r"zip entry `/etc/evil`: unsafe name: is absolute",
    ),
    "other_root": (
        lambda p, t: torch_zip(p, ok_pickle(t), names=["archive/data.pkl", "elsewhere/byteorder"]),
        CHECKPOINT_ERROR,
        r"outside the archive's root folder `archive/`",
    ),
    "deflated_pickle": (
        lambda p, t: rezip(p, real_entries(t), deflate=("archive/data.pkl",)),
        CHECKPOINT_ERROR,
        r"zip entry `archive/data\.pkl`: compressed \(method 8\)",
    ),
    "deflated_storage": (
        lambda p, t: rezip(p, real_entries(t), deflate=("archive/data/0",)),
        CHECKPOINT_ERROR,
        r"zip entry `archive/data/0`: compressed \(method 8\)",
    ),
    "duplicate_entry": (
        lambda p, t: _append_entry(rezip(p, real_entries(t)), "archive/data.pkl", proto(b"}")),
        CHECKPOINT_ERROR,
        r"zip entry `archive/data\.pkl`: duplicate entry",
    ),
    "entry_size_past_the_file": (
        lambda p, t: with_storage_entry_size(small_checkpoint(t / "archive.bin"), p, 0xFFFFFFF0),
        CHECKPOINT_ERROR,
        r"\+4294967280 bytes\) lies outside the \d+-byte file",
    ),
    "crc_flip": (
        lambda p, t: flip_storage_byte(small_checkpoint(t / "archive.bin"), p),
        CHECKPOINT_ERROR,
        r"zip entry `archive/data/0`: CRC-32 mismatch",
    ),
    "missing_storage": (
        lambda p, t: torch_zip(p, ok_pickle(t)),
        CHECKPOINT_ERROR,
        r"storage `0` has no `archive/data/0` entry",
    ),
    "no_data_pkl": (
        lambda p, t: torch_zip(p, b"", names=["archive/byteorder", "archive/version"]),
        CHECKPOINT_ERROR,
        r"data\.pkl|byte order",
    ),
    "big_endian": (
        lambda p, t: torch_zip(p, ok_pickle(t), byteorder=b"big"),
        CHECKPOINT_ERROR,
        r"saved big-endian",
    ),
    "legacy_format": (
        lambda p, t: legacy(p),
        CHECKPOINT_ERROR,
        r"legacy \(pre-1\.6, non-zip\).*torch\.save\(torch\.load\(f, weights_only=True\), f\)",
    ),
    "empty_file": (lambda p, t: _write(p, b""), CHECKPOINT_ERROR, r"not a valid torch\.save zip archive"),
    "not_a_zip": (
        lambda p, t: _write(p, b"\x00\x01garbage" * 100),
        CHECKPOINT_ERROR,
        r"no zip signature at the start of the file",
    ),
    "truncated_zip": (
        lambda p, t: _write(p, small_checkpoint(t / "archive.bin").read_bytes()[:-200]),
        CHECKPOINT_ERROR,
        r"no end-of-central-directory record",
    ),
    "truncated_pickle": (
        lambda p, t: torch_zip(p, proto(b"}(" + unicode("x"))[:-3]),
        CHECKPOINT_ERROR,
        r"truncated: BINUNICODE needs 4 bytes, 3 left",
    ),
    "stack_underflow": (lambda p, t: torch_zip(p, proto(b"u")), CHECKPOINT_ERROR, r"SETITEMS without a MARK"),
    "top_level_int": (
        lambda p, t: torch_zip(p, proto(b"K\x05")),
        CHECKPOINT_ERROR,
        r"top-level object is a int, not a dict",
    ),
    "top_level_list": (
        lambda p, t: torch_zip(p, proto(b"]")),
        CHECKPOINT_ERROR,
        r"top-level object is a list, not a dict",
    ),
    "ext1_opcode": (
        lambda p, t: torch_zip(p, in_dict("x", b"\x82\x01")),
        UNSAFE,
        r"refused opcode EXT1 \(0x82\)",
    ),
    "persistent_id_not_storage": (
        lambda p, t: torch_zip(p, in_dict("x", b"(" + unicode("module") + unicode("0") + b"tQ")),
        UNSAFE,
        r"refused persistent id other than \('storage', \.\.\.\)",
    ),
    "storage_type_os_system": (
        lambda p, t: torch_zip(
            p,
            in_dict(
                "x",
                b"("
                + unicode("storage")
                + global_op("os", "system")
                + unicode("0")
                + unicode("cpu")
                + b"K\x04tQ",
            ),
            storages=(("0", bytes(16)),),
        ),
        UNSAFE,
        r"refused GLOBAL os\.system",
    ),
    "tensor_subclass": (
        lambda p, t: _save_subclass(p),
        UNSAFE,
        r"refused GLOBAL \S*Subclass: not in",
    ),
}


class Subclass(torch.Tensor):
    pass


def _save_subclass(path: Path) -> Path:
    torch.save({"x": torch.ones(2).as_subclass(Subclass)}, path)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _append_entry(path: Path, name: str, data: bytes) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(path, "a") as z:
            z.writestr(name, data)
    return path


# `inspect` reads the pickle and the zip's directory only: damaged storage data is the converter's to find.
HEADER_ONLY_MISSES = {"crc_flip", "missing_storage"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_refused(tmp_path: Path, case: str) -> None:
    build, error, pattern = MALFORMED[case]
    src = build(tmp_path / f"{case}.bin", tmp_path)
    err = assert_refused(src, tmp_path / "out", error, pattern)
    if error is CHECKPOINT_ERROR:
        assert not isinstance(err, fastadapter.UnsafeCheckpointError), "a malformed file is not an attack"
    if case not in HEADER_ONLY_MISSES:
        with pytest.raises(error, match=pattern):
            _core.inspect_torch(src)
    assert not (tmp_path.parent / "evil").exists()


def test_views_past_their_storage_are_refused(tmp_path: Path) -> None:
    # {'w': 4 floats at offset 2 of a 4-float storage}: reads 8 bytes past the end.
    view = rebuild_tensor(float_storage("0", b"K\x04"), b"K\x02", b"K\x04\x85", b"K\x01\x85")
    src = torch_zip(
        tmp_path / "oob.bin", in_dict("w", view), storages=(("0", struct.pack("<4f", 1, 2, 3, 4)),)
    )
    # TensorError messages name the tensor but not the file (the other errors name the file).
    assert_refused(
        src,
        tmp_path / "out",
        fastadapter.TensorError,
        r"tensor `w`: view \(offset 2, shape \[4\], stride \[1\]\) of torch\.float32 reaches past "
        r"storage `0`",
        names_file=False,
    )
    negative = rebuild_tensor(float_storage("0", b"K\x04"), b"K\x00", b"K\x02\x85", i64(-1) + b"\x85")
    src = torch_zip(tmp_path / "neg.bin", in_dict("w", negative), storages=(("0", bytes(16)),))
    with pytest.raises(fastadapter.CheckpointError, match=r"neg\.bin: .*stride: -1 is negative"):
        fastadapter.convert(src, tmp_path / "neg.safetensors")
    assert not (tmp_path / "neg.safetensors").exists()


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    data = small_checkpoint(tmp_path / "archive.bin").read_bytes()
    src, out = tmp_path / "cut.bin", tmp_path / "out"
    out.mkdir()
    step = max(1, len(data) // 60)
    for length in [*range(0, len(data), step), len(data) - 1]:
        src.write_bytes(data[:length])
        start = time.perf_counter()
        with pytest.raises(fastadapter.CheckpointError, match=re.escape(str(src))):
            fastadapter.convert(src, out / "cut.safetensors")
        assert time.perf_counter() - start < TIME_LIMIT_S
        assert not list(out.iterdir()), f"prefix {length}: left {list(out.iterdir())}"


def test_every_pickle_byte_corruption_agrees_with_torch(tmp_path: Path) -> None:
    """Corrupt each byte of a real data.pkl in turn (CRC recomputed): never a crash; whatever we accept,
    torch.load(weights_only=True) accepts too and reads the same tensors."""
    from test_convert import assert_same_as_torch

    entries = real_entries(tmp_path)
    pkl = entries["archive/data.pkl"]
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "archive.bin"
    disagreements = []
    for i in range(len(pkl)):
        bad = bytearray(pkl)
        bad[i] ^= 0x5A
        rezip(src, {**entries, "archive/data.pkl": bytes(bad)})
        try:
            fastadapter.convert(src, out / "flip.safetensors")
        except (fastadapter.FastAdapterError, OSError):
            assert not list(out.iterdir())
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(src, weights_only=True)
        except Exception as e:
            disagreements.append((i, f"torch refuses: {type(e).__name__}: {str(e)[:200]}"))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert_same_as_torch(src, out / "flip.safetensors")
        (out / "flip.safetensors").unlink()
    assert not disagreements, disagreements


# --- resource exhaustion: bounded time and memory --------------------------------------------------------


def memo_bomb_list() -> bytes:
    # Level i+1 is a list holding level i twice: 60 levels are 2^60 leaves when walked.
    keys = unicode("x0") + b"j" + u32(0)
    for i in range(60):
        keys += unicode(f"x{i + 1}") + b"](j" + u32(i) + b"j" + u32(i) + b"er" + u32(i + 1)
    return proto(b"}(" + unicode("l") + b"]r" + u32(0) + keys + b"u")


def memo_bomb_dicts() -> dict[str, Any]:
    # A real torch.save: {'a': d, 'b': d} nested 64 times over one tensor is 2^64 flattened names.
    d: dict[str, Any] = {"w": torch.ones(2)}
    for _ in range(64):
        d = {"a": d, "b": d}
    return d


def huge_storage() -> bytes:
    numel = i64(1 << 61)
    return in_dict("w", rebuild_tensor(float_storage("0", numel), b"K\x00", numel + b"\x85", b"K\x01\x85"))


def shape_overflow() -> bytes:
    big = i64(1 << 62)
    return in_dict(
        "w", rebuild_tensor(float_storage("0", b"K\x04"), b"K\x00", big + big + b"\x86", b"K\x00K\x00\x86")
    )


# name -> (build(path), error class name or None for success, message pattern)
RESOURCE: dict[str, tuple[Callable[[Path], Any], str | None, str]] = {
    "memo_bomb_list": (lambda p: torch_zip(p, memo_bomb_list()), "CheckpointError", r"shared-reference bomb"),
    "memo_bomb_dicts": (
        lambda p: torch.save(memo_bomb_dicts(), p),
        "CheckpointError",
        r"shared-reference bomb",
    ),
    "huge_binunicode": (
        lambda p: torch_zip(p, proto(b"X" + u32(0xFFFFFFF0) + b"abc")),
        "CheckpointError",
        r"BINUNICODE needs 4294967280 bytes, 4 left",
    ),
    "huge_binbytes": (
        lambda p: torch_zip(p, proto(b"B" + u32(0xFFFFFFF0) + b"abc")),
        "UnsafeCheckpointError",
        r"refused opcode BINBYTES \(0x42\)",
    ),
    "huge_binunicode8": (
        lambda p: torch_zip(p, b"\x80\x04}\x8d" + struct.pack("<Q", 1 << 62) + b"abc."),
        "UnsafeCheckpointError",
        r"refused opcode BINUNICODE8 \(0x8d\)",
    ),
    "huge_memo_index": (
        # LONG_BINPUT at index 2^32-16: legal (torch's memo is a dict); must not allocate a 2^32 table.
        lambda p: torch_zip(p, in_dict("x", b"]r" + u32(0xFFFFFFF0))),
        None,
        r"",
    ),
    "memo_get_never_stored": (
        lambda p: torch_zip(p, in_dict("x", b"j" + u32(0xFFFFFFF0))),
        "CheckpointError",
        r"memo entry 4294967280 was never stored",
    ),
    "huge_storage_numel": (
        lambda p: torch_zip(p, huge_storage(), storages=(("0", bytes(16)),)),
        "TensorError",
        r"storage `0` declares 2305843009213693952 elements but its entry `archive/data/0` holds 16 bytes",
    ),
    "shape_overflow": (
        lambda p: torch_zip(p, shape_overflow(), storages=(("0", bytes(16)),)),
        "TensorError",
        r"tensor `w`: shape \[4611686018427387904, 4611686018427387904\] overflows",
    ),
    "expand_bomb": (
        # A real torch.save of one float expanded (stride 0) to 2^40 elements: gathering it used to abort.
        lambda p: torch.save({"w": torch.ones(1).expand(1 << 40)}, p),
        "TensorError",
        r"tensor `w`: non-contiguous views would need 4398046511104 bytes in memory",
    ),
    "huge_zip_entry_size": (
        lambda p: with_storage_entry_size(small_checkpoint(p.with_name("archive.bin")), p, 0xFFFFFFF0),
        "CheckpointError",
        r"lies outside the \d+-byte file",
    ),
    "deep_marks": (
        lambda p: torch_zip(p, proto(b"(" * 100_000 + b"}")),
        "CheckpointError",
        r"more than 1000 nested MARKs",
    ),
    "deep_lists": (
        lambda p: torch_zip(p, proto(b"}(" + unicode("x") + b"]" * 100_000 + b"a" * 99_999 + b"u")),
        "CheckpointError",
        r"nesting deeper than 1000",
    ),
    "deep_dicts": (
        lambda p: torch_zip(p, proto(b"}" + (unicode("a") + b"}") * 100_000 + b"s" * 100_000)),
        "CheckpointError",
        r"nesting deeper than 1000 at `a\.a\.a",
    ),
    "deep_tuples": (
        lambda p: torch_zip(p, proto(b"}" + unicode("x") + b")" + b"\x85" * 100_000 + b"s")),
        "CheckpointError",
        r"nesting deeper than 1000",
    ),
}

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import fastadapter
    def hwm_kb():  # VmHWM is per address space; ru_maxrss would carry the parent's over fork+exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    baseline = hwm_kb()
    results = {}
    for name, src, dst in json.loads(sys.argv[2]):
        start = time.perf_counter()
        try:
            fastadapter.convert(src, dst)
            kind, message = None, ""
        except Exception as e:
            kind, message = type(e).__name__, str(e)
        results[name] = [kind, message, time.perf_counter() - start, os.path.exists(dst)]
    peak = hwm_kb()
    torch_imported = "torch" in sys.modules
    print(json.dumps({"results": results, "baseline_kb": baseline, "peak_kb": peak, "torch": torch_imported}))
    """
)


def test_resource_exhaustion_is_bounded(tmp_path: Path) -> None:
    jobs = []
    for name, (build, _, _) in RESOURCE.items():
        (tmp_path / name).mkdir()
        src = tmp_path / name / "in.bin"
        build(src)
        jobs.append((name, str(src), str(tmp_path / name / "out.safetensors")))
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(MEMORY_LIMIT), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, (
        f"child died ({child.returncode}) under RLIMIT_AS=1 GiB: {child.stderr[-2000:]}"
    )
    report = json.loads(child.stdout)
    assert not report["torch"]
    for name, (_, kind, pattern) in RESOURCE.items():
        got_kind, message, elapsed, published = report["results"][name]
        assert got_kind == kind, f"{name}: {got_kind}: {message}"
        if kind is not None:
            assert re.search(pattern, message), f"{name}: `{message[:300]}` lacks /{pattern}/"
            assert not published, name
            src_dir = tmp_path / name
            assert sorted(p.name for p in src_dir.iterdir() if p.name != "archive.bin") == ["in.bin"], name
        assert elapsed < TIME_LIMIT_S, f"{name}: {elapsed:.2f} s"
    peak_mb = report["peak_kb"] / 1024
    assert peak_mb < MAXRSS_LIMIT_MB, (
        f"peak RSS {peak_mb:.0f} MB (baseline {report['baseline_kb'] / 1024:.0f} MB)"
    )


def test_cli_on_a_folder_of_hostile_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scratch = tmp_path / "scratch"  # builders leave helper checkpoints there
    scratch.mkdir()
    tree = tmp_path / "tree"
    for case in ("zip_slip", "deflated_pickle", "truncated_zip", "legacy_format", "top_level_int"):
        build, _, _ = MALFORMED[case]
        (tree / case).mkdir(parents=True)
        build(tree / case / f"{case}.bin", scratch)
    torch.save({"ok": torch.ones(2)}, tree / "fine.pt")
    assert cli.main(["convert", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "converted 1 file(s)" in out
    assert "FAILED 5:" in out
    for case in ("zip_slip", "deflated_pickle", "truncated_zip", "legacy_format", "top_level_int"):
        assert f"{tree / case / case}.bin:" in out
    assert sorted(p.name for p in tree.rglob("*.safetensors")) == ["fine.safetensors"]
