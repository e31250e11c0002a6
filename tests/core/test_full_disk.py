"""A real full disk: a small file system is mounted (tmpfs, and ext4 with `data=writeback` on a loop
device, where `rename` over a file is not ordered after that file's data), filled, and then every writer
is run into it: `save`, `convert`, `convert_dir` and an async `Checkpointer` save.

Each must fail with `OSError(ENOSPC)` naming the file it could not write, leave the previous version
byte for byte as it was (and readable), publish nothing half-written, remove its temp files, and succeed
once space is freed. The oracle is the bytes of the same writer's output on a file system with room.
Mounting needs root (CAP_SYS_ADMIN): elsewhere these tests are skipped, saying so.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastadapter
from fastadapter import Checkpointer
from fastadapter.convert import default_destination

FS_BYTES = 24 << 20
# Left free after filling: room for configs, model cards and an index, not for any tensor file below.
ROOM = 96 << 10


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _mount_tmpfs(where: Path, _scratch: Path) -> str | None:
    done = _run("mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(where))
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


def _mount_ext4_writeback(where: Path, scratch: Path) -> str | None:
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed (e2fsprogs)"
    image = scratch / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(FS_BYTES)
    made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if made.returncode != 0:
        return f"mkfs.ext4 failed: {made.stderr.strip()}"
    done = _run("mount", "-o", "loop,data=writeback", str(image), str(where))
    return None if done.returncode == 0 else f"cannot loop-mount ext4 here: {done.stderr.strip()}"


MOUNTS = {"tmpfs": _mount_tmpfs, "ext4-data=writeback": _mount_ext4_writeback}


@pytest.fixture(params=sorted(MOUNTS))
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt"
    where.mkdir()
    why_not = MOUNTS[request.param](where, tmp_path)
    if why_not is not None:
        pytest.skip(why_not)
    try:
        yield where
    finally:
        fastadapter._core.wait_released()  # replaced files held open by the release thread
        _run("umount", "-l", str(where))


def fill(fs: Path, leave: int = ROOM) -> Path:
    """Take all free space but `leave` bytes with one file (blocks really allocated, not sparse).

    ext4 gives back blocks it had preallocated for files closed earlier some time after they close, so
    the free space is measured again after a sync and the filler grown until it stays taken."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(10):
            os.sync()
            st = os.statvfs(fs)
            extra = st.f_bavail * st.f_frsize - leave
            if extra <= 0:
                break
            os.posix_fallocate(fd, os.fstat(fd).st_size, extra)
    finally:
        os.close(fd)
    return filler


def contents(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included, so a leftover temp file shows), but the filler."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "filler"
    }


def hidden(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def assert_enospc_naming(e: OSError, path: Path) -> None:
    assert e.errno == errno.ENOSPC, e
    assert e.filename == str(path), e


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(512, 512) for _ in range(8)])


def adapter(version: int) -> nn.Module:
    """8 x Linear(512) with rank-64 LoRA: 2 MiB of fp32 weights, all equal to `version`."""
    torch.manual_seed(0)
    model = fastadapter.inject(Net(), {"r": 64, "lora_alpha": 16, "target_modules": r"layers\.\d+"})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(float(version))
    return model


def test_save_on_a_full_disk(small_fs: Path, tmp_path: Path) -> None:
    expected = tmp_path / "expected"
    fastadapter.save(adapter(2), expected)  # the oracle: the same save with room
    target, fresh = small_fs / "adapter", small_fs / "new"
    fastadapter.save(adapter(1), target)
    before = contents(target)
    filler = fill(small_fs)

    for where in (target, fresh):
        with pytest.raises(OSError, match="No space left on device") as failed:
            fastadapter.save(adapter(2), where)
        assert_enospc_naming(failed.value, where / "adapter_model.safetensors")
        assert hidden(where) == [], "temp files removed"
    assert contents(target) == before, "previous version intact"
    assert load_file(target / "adapter_model.safetensors")  # and readable
    assert contents(fresh) == {}, "nothing published"

    filler.unlink()
    fastadapter.save(adapter(2), fresh)
    fastadapter.save(adapter(2), target)
    assert contents(fresh) == contents(target) == contents(expected)


def state_dict(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {f"layer.{i}.weight": torch.randn(256, 1024, generator=g) for i in range(2)}  # 2 MiB


def test_convert_on_a_full_disk(small_fs: Path, tmp_path: Path) -> None:
    src = tmp_path / "v2.bin"
    torch.save(state_dict(2), src)
    expected = fastadapter.convert(src, tmp_path / "expected.safetensors").dst
    dst = small_fs / "model.safetensors"
    fastadapter.convert(src, dst)
    dst.write_bytes(b"previous")  # any previous content, as long as it is kept
    filler = fill(small_fs)

    with pytest.raises(OSError, match="No space left on device") as failed:
        fastadapter.convert(src, dst)
    assert_enospc_naming(failed.value, dst)
    assert dst.read_bytes() == b"previous"
    assert hidden(small_fs) == []

    filler.unlink()
    fastadapter.convert(src, dst)
    assert dst.read_bytes() == Path(expected).read_bytes()


def test_convert_dir_on_a_full_disk(small_fs: Path) -> None:
    folder = small_fs / "ckpt"
    folder.mkdir()
    sources = [folder / "pytorch_model-00001-of-00002.bin", folder / "pytorch_model-00002-of-00002.bin"]
    for i, src in enumerate(sources):
        torch.save(state_dict(i), src)
    before = contents(small_fs)
    filler = fill(small_fs)

    errors: dict[str, BaseException] = {}

    def on_done(src: str, result: object) -> None:
        if isinstance(result, BaseException):
            errors[src] = result

    report = fastadapter.convert_dir(folder, jobs=2, on_done=on_done)
    assert not report.ok
    assert sorted(src for src, _ in report.failed) == sorted(map(str, sources))
    for src in sources:
        e = errors[str(src)]
        assert isinstance(e, OSError)
        assert_enospc_naming(e, Path(default_destination(src)))
        assert "No space left on device" in dict(report.failed)[str(src)]
    assert contents(small_fs) == before, "sources intact, no output published"
    assert hidden(small_fs) == []

    filler.unlink()
    again = fastadapter.convert_dir(folder, jobs=2)
    assert again.ok, again.failed
    for i, src in enumerate(sources):
        got = load_file(default_destination(src))
        assert got.keys() == state_dict(i).keys()
        assert all(torch.equal(got[k], v) for k, v in state_dict(i).items())


def test_async_checkpoint_on_a_full_disk(small_fs: Path) -> None:
    ck = Checkpointer(small_fs / "run", keep_last=1)
    ck.save(1, state_dict(1))
    ck.wait()
    before = contents(small_fs / "run")
    filler = fill(small_fs)

    ck.save(2, state_dict(2))  # returns after the copy: the write fails in the background
    with pytest.raises(OSError, match="No space left on device") as failed:
        ck.wait()
    e = failed.value
    assert e.errno == errno.ENOSPC, e
    assert e.filename is not None
    # The checkpoint's files are written in parallel: whichever finds the disk full first is named.
    assert Path(e.filename).name in {"model.safetensors", "fastadapter_checkpoint.json"}, e.filename
    assert Path(e.filename).is_relative_to(small_fs / "run"), e.filename
    assert ck.steps() == [1], "no partial checkpoint 2, and keep_last=1 rotated nothing away"
    assert contents(small_fs / "run") == before
    assert hidden(small_fs / "run") == []
    assert all(torch.equal(ck.load(1)[k], v) for k, v in state_dict(1).items())

    filler.unlink()
    ck.save(3, state_dict(3))
    ck.wait()
    assert ck.steps() == [3]
    assert all(torch.equal(ck.load(3)[k], v) for k, v in state_dict(3).items())
    ck.close()


# --- a power cut on ext4 data=writeback -------------------------------------------------------------------


def test_fsync_save_survives_a_power_cut_on_ext4_data_writeback(tmp_path: Path) -> None:
    """With `data=writeback` ext4 may commit a rename before the renamed file's data, so only an fsynced
    save is guaranteed to be there after a power cut. The power cut: a copy of the loop device's backing
    file taken right after `save(fsync=True)` returns (what reached the "disk"), its journal replayed by
    mounting the copy. Without the fsyncs, the rename is not yet committed when the copy is taken."""
    mnt, image = tmp_path / "mnt", tmp_path / "ext4.img"
    mnt.mkdir()
    why_not = _mount_ext4_writeback(mnt, tmp_path)
    if why_not is not None:
        pytest.skip(why_not)
    after = tmp_path / "after"
    after.mkdir()
    try:
        target = mnt / "adapter"
        fastadapter.save(adapter(1), target, fsync=True)
        fastadapter.save(adapter(2), target, fsync=True)
        expected = contents(target)
        shutil.copyfile(image, tmp_path / "cut.img")  # the power cut, while still mounted
    finally:
        fastadapter._core.wait_released()
        _run("umount", "-l", str(mnt))
    done = _run("mount", "-o", "loop", str(tmp_path / "cut.img"), str(after))
    assert done.returncode == 0, done.stderr
    try:
        assert contents(after / "adapter") == expected
    finally:
        _run("umount", "-l", str(after))
