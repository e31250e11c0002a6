"""`_fileset.remove_stale_temps`: what a killed writer left beside its target goes on the next write; what a
live writer is writing, and anything not named as a temp of that target, stays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastadapter._fileset import hidden_temp_path, remove_stale_temps


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_writers_temps_go_and_everything_else_stays(tmp_path: Path) -> None:
    name = "adapter_model.safetensors"
    gone = dead_pid()
    stale_file = tmp_path / f".{name}.tmp-{gone}-0123456789abcdef"
    stale_dir = tmp_path / f".{name}.tmp-{gone}-fedcba9876543210"
    live = Path(hidden_temp_path(str(tmp_path), name))  # this process: alive
    kept = [
        live,
        tmp_path / name,  # the published file
        tmp_path / f".{name}.tmp-{gone}-short",  # not our format
        tmp_path / f".other.tmp-{gone}-0123456789abcdef",  # another target's
        tmp_path / f"{name}.tmp-{gone}-0123456789abcdef",  # not hidden
    ]
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    for path in kept:
        path.write_bytes(b"keep")

    remove_stale_temps(str(tmp_path), name)

    assert not stale_file.exists()
    assert not stale_dir.exists()
    assert all(path.read_bytes() == b"keep" for path in kept)
    assert live.name.split("-")[1] == str(os.getpid())
