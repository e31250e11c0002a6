"""A training process killed (SIGKILL) at a random moment of a checkpoint save: the checkpoints on disk
are whole, `latest()` is the newest published one, and what the dead writer left is ignored and then
removed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastadapter import Checkpointer

CHILD = textwrap.dedent(
    """
    import sys, torch
    from fastadapter import Checkpointer
    ck = Checkpointer(sys.argv[1], keep_last=2, fsync=False)
    state = {f"w{i}": torch.empty(1 << 20) for i in range(12)}  # 48 MB a checkpoint
    for step in range(1, 10_000):
        for t in state.values():
            t.fill_(step)
        ck.save(step, state, extra={"step": step})
        ck.wait()
        print(step, flush=True)
    """
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_during_save_leaves_whole_checkpoints(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert child.stdout is not None
        published = int(child.stdout.readline())  # the first checkpoint is on disk
        time.sleep(rng.uniform(0.0, 0.4))  # then die somewhere in a later save
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    hidden_before = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    ck = Checkpointer(tmp_path)  # a restarted job
    latest = ck.latest()
    assert latest is not None
    assert latest >= published
    assert len(ck.steps()) <= 3  # keep_last=2, plus at most one published just before rotation
    for step in ck.steps():
        state = ck.load(step)
        assert sorted(state) == sorted(f"w{i}" for i in range(12))
        assert all(torch.equal(t, torch.full((1 << 20,), float(step))) for t in state.values()), step
        assert ck.extra(step) == {"step": step}
    # The dead writer's temp directory (if the kill hit a write) was cleaned on restart.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert all(name.startswith(".checkpoint-") for name in hidden_before), hidden_before


FULL_DISK_CHILD = textwrap.dedent(
    """
    import errno, resource, signal, sys, torch
    from fastadapter import Checkpointer
    ck = Checkpointer(sys.argv[1], keep_last=1)
    ck.save(1, {"w": torch.ones(1024)})  # 4 KB: fits
    ck.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    ck.save(2, {"w": torch.ones(1 << 20)})  # 4 MB: the write fails in the background thread
    try:
        ck.wait()
    except OSError as e:
        print(e.errno == errno.EFBIG, e.filename)
    else:
        print("no error")
    """
)


def test_file_too_large_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "True", out
    assert "model.safetensors" in out[1]  # the error names the file
    ck = Checkpointer(tmp_path)
    assert ck.steps() == [1]  # no partial checkpoint 2, and keep_last=1 deleted nothing
    assert torch.equal(ck.load(1)["w"], torch.ones(1024))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


SYNC_SHARD_TOO_LARGE_CHILD = textwrap.dedent(
    """
    import errno, resource, signal, sys, torch
    from fastadapter import Checkpointer
    ck = Checkpointer(sys.argv[1], async_save=False, keep_last=1, max_shard_size=300_000)
    ck.save(1, {"w": torch.ones(1024)})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    # Four shards written at once from the tensors: three of 256 KB fit, the 4 MB one (shard 2) fails.
    state = {f"s{i}": torch.full((1 << 16,), float(i)) for i in range(2)}
    state["big"] = torch.ones(1 << 20)
    state["s2"] = torch.ones(1 << 16)
    try:
        ck.save(2, state)
    except OSError as e:
        print(e.errno == errno.EFBIG, e.filename)
    else:
        print("no error")
    """
)


def test_a_shard_failing_among_parallel_writes_publishes_nothing(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SYNC_SHARD_TOO_LARGE_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "True", out
    assert out[1].endswith("model-00002-of-00004.safetensors"), out  # the error names the shard
    ck = Checkpointer(tmp_path)
    assert ck.steps() == [1]  # nothing of checkpoint 2 published, nothing rotated away
    assert torch.equal(ck.load(1)["w"], torch.ones(1024))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # the staging directory is gone


def test_a_replaced_checkpoint_is_deleted_before_the_interpreter_exits(tmp_path: Path) -> None:
    # Replacing a step hands the old directory to the release thread, which dies with the interpreter: a
    # script whose last act is that save must not leave it behind.
    code = (
        "import sys, torch\nfrom fastadapter import Checkpointer\n"
        "ck = Checkpointer(sys.argv[1], async_save=False, fsync=False, max_shard_size=1 << 20)\n"
        "state = {f'w{i}': torch.full((1 << 18,), float(i)) for i in range(64)}\n"
        "ck.save(3, state)\nck.save(3, state)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    assert len(list((tmp_path / "checkpoint-3").glob("model-*.safetensors"))) == 64


def test_pending_save_is_finished_at_interpreter_exit(tmp_path: Path) -> None:
    """A script that never calls wait()/close(): its last checkpoint is still written (the writer
    thread would otherwise die with the interpreter)."""
    code = (
        "import sys, torch\nfrom fastadapter import Checkpointer\n"
        "ck = Checkpointer(sys.argv[1], fsync=False)\n"
        "ck.save(3, {'w': torch.full((1 << 22,), 3.0)})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    ck = Checkpointer(tmp_path)
    assert ck.steps() == [3]
    assert torch.equal(ck.load(3)["w"], torch.full((1 << 22,), 3.0))
