"""The `fastadapter` command as scripts and pipes use it: a closed pipe ends it quietly, messages name
the flags a user can type, `--json` prints one object per file (checked against safetensors' and torch's
own reading of the same files), and `--version` says the package's version."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import fastadapter
from fastadapter import cli

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    return subprocess.run(
        [sys.executable, "-m", "fastadapter", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        **kwargs,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def many_tensors(path: Path, n: int) -> None:
    save_file({f"layer.{i}.weight": np.zeros((2, 3), dtype=np.float32) for i in range(n)}, str(path))


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # 20,000 rows are far more than a pipe buffers, so the command is still writing when the reader leaves.
    src = tmp_path / "big.safetensors"
    many_tensors(src, 20_000)
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    with subprocess.Popen(
        [sys.executable, "-m", "fastadapter", "inspect", str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # what `| head -1` does once it has its line
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == cli.EXIT_BROKEN_PIPE
    assert first.startswith(str(src).encode())
    assert err == b"", err.decode()


class _ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_pipe_during_convert_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "adapter_model.bin")
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["convert", "--dry-run", str(tmp_path)]) == cli.EXIT_BROKEN_PIPE
    assert cli.main(["convert", "--json", str(tmp_path)]) == cli.EXIT_BROKEN_PIPE
    assert (tmp_path / "adapter_model.safetensors").is_file(), "the conversion itself finished"


def test_version_is_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert result.stdout.strip() == f"fastadapter {project['version']}"
    assert fastadapter.__version__ == project["version"]


def test_messages_name_the_flags(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "adapter_model.bin")
    assert run_cli("convert", tmp_path).returncode == 0
    again = run_cli("convert", tmp_path)
    assert again.returncode == 0
    dst = tmp_path / "adapter_model.safetensors"
    assert f"{dst}: destination exists (use --overwrite to replace it)" in again.stdout
    assert "use overwrite" not in again.stdout
    for bad in ("0", "-2", "many"):
        usage = run_cli("convert", "--jobs", bad, tmp_path)
        assert usage.returncode == 2
        assert "argument --jobs/-j:" in usage.stderr, usage.stderr
        assert "Traceback" not in usage.stderr


def test_inspect_json_matches_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "adapter_model.safetensors"
    tensors = {
        "b.10": np.zeros((4, 2), dtype=np.float16),
        "b.2": np.ones(3, dtype=np.int64),
        "a": np.zeros((0, 5), dtype=np.float32),
    }
    save_file(tensors, str(src), metadata={"format": "pt"})
    result = run_cli("inspect", "--json", src)
    assert result.returncode == 0, result.stderr
    [record] = json_lines(result.stdout)
    assert record["path"] == str(src)
    assert record["format"] == "safetensors"
    assert record["metadata"] == {"format": "pt"}
    with safe_open(str(src), framework="numpy") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    got = {t["name"]: t for t in record["tensors"]}
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name]["shape"] == list(array.shape)
        assert got[name]["bytes"] == array.nbytes
    assert {n: t["dtype"] for n, t in got.items()} == {"b.10": "F16", "b.2": "I64", "a": "F32"}
    assert record["total_bytes"] == sum(a.nbytes for a in expected.values())
    assert record["header_bytes"] + record["total_bytes"] == src.stat().st_size  # length prefix included


def test_inspect_json_matches_torch_load_one_object_per_file(tmp_path: Path) -> None:
    sd = {"w": torch.zeros(4, 8, dtype=torch.bfloat16), "z": torch.zeros(2, dtype=torch.complex128)}
    src = tmp_path / "pytorch_model.bin"
    torch.save(sd, src)
    missing = tmp_path / "absent.bin"
    result = run_cli("inspect", "--json", src, missing)
    assert result.returncode == 1, "one file failed"
    good, bad = json_lines(result.stdout)
    assert good["format"] == "torch"
    assert good["converts_to"] == str(tmp_path / "model.safetensors")
    loaded = torch.load(src, weights_only=True)
    got = {t["name"]: t for t in good["tensors"]}
    for name, tensor in loaded.items():
        assert got[name]["shape"] == list(tensor.shape)
        assert got[name]["bytes"] == tensor.numel() * tensor.element_size()
        assert got[name]["torch_dtype"] == str(tensor.dtype)
    assert got["w"]["dtype"] == "BF16"
    assert got["z"]["dtype"] is None, "no safetensors dtype for complex128"
    assert bad["path"] == str(missing)
    assert str(missing) in bad["error"]
    assert str(missing) in result.stderr


def test_convert_json_one_object_per_file(tmp_path: Path) -> None:
    good = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.randn(4, 4), "v": torch.randn(3)}, good)
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"garbage")
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    dry = run_cli("convert", "--json", "--dry-run", tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert {(r["source"], r["status"]) for r in json_lines(dry.stdout)} == {
        (str(good), "planned"),
        (str(bad), "planned"),
    }

    run = run_cli("convert", "--json", tmp_path)
    assert run.returncode == 1, "broken.bin failed"
    assert run.stderr == "", "--json keeps per-file lines off stderr"
    records = {r["source"]: r for r in json_lines(run.stdout)}
    assert set(records) == {str(good), str(bad)}
    ok = records[str(good)]
    dst = tmp_path / "adapter_model.safetensors"
    assert (ok["status"], ok["destination"], ok["tensors"]) == ("converted", str(dst), 2)
    with safe_open(str(dst), framework="pt") as f:
        assert ok["bytes"] == sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118
    failed = records[str(bad)]
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"{bad}: not a valid torch.save zip archive")
    assert not (tmp_path / "broken.safetensors").exists()

    again = json_lines(run_cli("convert", "--json", good).stdout)
    assert again == [
        {
            "source": str(good),
            "destination": str(dst),
            "status": "skipped",
            "reason": "destination exists (use --overwrite to replace it)",
        }
    ]
