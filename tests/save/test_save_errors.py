"""How ``fastadapter.save`` fails: the exception, what it names, and that the directory is left as it was.

Where PEFT fails too, the test checks PEFT's behaviour first (the oracle says this input is an error);
where fastadapter promises more than PEFT (nothing written on failure, the old files intact), the test says
so. Privilege dropping for the permission cases happens in a child process, because root ignores
directory permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

import fastadapter
from helpers import (
    SAFETENSORS,
    add_perturbed_adapter,
    assert_same_files,
    leftovers,
    lora_config,
    make_peft,
    save_with_fastadapter,
    save_with_peft,
    snapshot,
    tiny_llama,
    tiny_mlp,
)

TESTS_DIR = Path(__file__).resolve().parents[1]
NOBODY = 65534


def small_model(seed: int = 1) -> PeftModel:
    return make_peft(tiny_llama(), lora_config(), seed=seed)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
        check=False,
    )


# --- bad arguments -------------------------------------------------------------------------------------


def test_existing_file_as_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "not_a_dir"
    target.write_bytes(b"precious")
    model = small_model()
    with pytest.raises(ValueError, match="should be a directory"):  # the oracle
        save_with_peft(model, target)
    with pytest.raises(fastadapter.NotADirectoryPathError) as info:
        save_with_fastadapter(model, target)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, NotADirectoryError)
    assert isinstance(err, fastadapter.FastAdapterError)
    assert str(target) in str(err)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]


@pytest.mark.parametrize(
    "make_model", [tiny_mlp, tiny_llama, lambda: torch.nn.Linear(2, 2)], ids=["mlp", "llama", "linear"]
)
def test_model_without_adapter_is_refused(tmp_path: Path, make_model: Any) -> None:
    target = tmp_path / "out"
    with pytest.raises(fastadapter.AdapterNotFoundError) as info:
        fastadapter.save(make_model(), target)
    assert isinstance(info.value, ValueError)
    assert not target.exists()


@pytest.mark.parametrize("selected", [["nope"], ["default", "nope"], ["other", "Default"]])
def test_unknown_selected_adapter_is_refused(tmp_path: Path, selected: list[str]) -> None:
    model = small_model()
    add_perturbed_adapter(model, "other", lora_config(r=2), seed=5)
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):  # the oracle
        save_with_peft(model, tmp_path / "peft", selected_adapters=selected)
    target = tmp_path / "ours"
    with pytest.raises(fastadapter.AdapterNotFoundError) as info:
        save_with_fastadapter(model, target, selected_adapters=selected)
    unknown = selected[-1]
    assert repr(unknown) in str(info.value) or f"`{unknown}`" in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)
    assert not target.exists()


def test_rslora_with_rank_pattern_cannot_be_converted(tmp_path: Path) -> None:
    config = lora_config(use_rslora=True, rank_pattern={"q_proj": 8}, init_lora_weights="olora")
    model = make_peft(tiny_llama(), config)
    initial = tmp_path / "init" / "initial"
    save_with_peft(model, initial)
    messages = []
    for save, name in [(save_with_peft, "peft"), (save_with_fastadapter, "ours")]:
        with pytest.raises(ValueError, match="not supported when using `rank_pattern`") as info:
            save(model, tmp_path / name, path_initial_model_for_weight_conversion=str(initial))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    # PEFT has already written its model card at this point; fastadapter writes nothing.
    assert not [p for p in (tmp_path / "ours").rglob("*") if p.is_file()]


def olora_model_and_initial(tmp_path: Path, initial_targets: list[str]) -> tuple[PeftModel, Path]:
    """An OLoRA model (q/v targeted) and an initial adapter saved from a model targeting initial_targets."""
    torch.manual_seed(3)
    initial_model = make_peft(tiny_llama(), lora_config(target_modules=initial_targets))
    initial = tmp_path / "initial_adapter" / "initial"
    save_with_peft(initial_model, initial)
    return make_peft(tiny_llama(), lora_config(init_lora_weights="olora")), initial


def test_missing_initial_adapter_is_file_not_found(tmp_path: Path) -> None:
    model, _ = olora_model_and_initial(tmp_path, ["q_proj", "v_proj"])
    missing = tmp_path / "missing" / "initial"
    with pytest.raises(ValueError, match="Repo id"):  # the oracle: PEFT takes the path for a Hub id
        save_with_peft(model, tmp_path / "peft", path_initial_model_for_weight_conversion=str(missing))
    target = tmp_path / "ours"
    with pytest.raises(FileNotFoundError) as info:
        save_with_fastadapter(model, target, path_initial_model_for_weight_conversion=str(missing))
    assert info.value.filename == str(missing)
    assert not [p for p in target.rglob("*") if p.is_file()]


def test_initial_adapter_missing_a_tensor_is_refused(tmp_path: Path) -> None:
    # PEFT rewrites the initial adapter's config with the current targets, loads it, and fills the missing
    # v_proj weights with a fresh random initialisation before subtracting them: a silently wrong adapter.
    # fastadapter refuses instead, naming the tensor, and writes nothing.
    model, initial = olora_model_and_initial(tmp_path, ["q_proj"])
    target = tmp_path / "ours"
    with pytest.raises(KeyError, match=r"v_proj\.lora_A\.weight"):
        save_with_fastadapter(model, target, path_initial_model_for_weight_conversion=str(initial))
    assert not [p for p in target.rglob("*") if p.is_file()]


# --- operating-system failures -------------------------------------------------------------------------

# The interpreter and its standard library live under root's private home here, so the child imports
# everything (including what a save imports lazily, by saving once) before it gives up root.
PERMISSION_CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile
    sys.path.insert(0, {tests!r})
    import fastadapter
    from helpers import make_peft, tiny_mlp
    from peft import LoraConfig

    model = make_peft(tiny_mlp(), LoraConfig(r=2, target_modules=["inp", "out"]))
    with tempfile.TemporaryDirectory() as warm:
        model.save_pretrained(os.path.join(warm, "peft"))
        fastadapter.save(model, os.path.join(warm, "ours"))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid({nobody})
        os.setuid({nobody})
    results = {{}}
    for saver in ("peft", "ours"):
        for target in {targets!r}:
            try:
                if saver == "peft":
                    model.save_pretrained(target)
                else:
                    fastadapter.save(model, target)
                outcome = {{"raised": None}}
            except Exception as e:
                outcome = {{
                    "raised": type(e).__name__,
                    "is_permission_error": isinstance(e, PermissionError),
                    "filename": getattr(e, "filename", None),
                    "message": str(e),
                }}
            results[saver + ":" + target] = outcome
    print(json.dumps({{"uid": os.geteuid(), "results": results}}))
    """
)


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A directory an unprivileged child can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fastadapter-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)  # as root: the read-only directories inside are no obstacle


def test_unwritable_directory_is_a_permission_error_naming_the_path(world_traversable_dir: Path) -> None:
    locked = world_traversable_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # An existing read-only directory, and a directory that would have to be created inside it.
    targets = [str(locked), str(locked / "new")]
    code = PERMISSION_CHILD.format(nobody=NOBODY, tests=str(TESTS_DIR), targets=targets)
    proc = run_python(code, HOME=str(world_traversable_dir))
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot drop privileges here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["uid"] == 0:
        pytest.skip("the child still runs as root, which ignores directory permissions")
    for target in targets:
        oracle, ours = report["results"][f"peft:{target}"], report["results"][f"ours:{target}"]
        assert oracle["is_permission_error"], oracle  # PEFT fails here too
        assert ours["is_permission_error"], ours
        assert ours["filename"], ours
        assert ours["filename"].startswith(str(locked)), ours
    assert list(locked.iterdir()) == []


class _Blocked(OSError):
    pass


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails loudly (on top of HF_HUB_OFFLINE)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise _Blocked("network access attempted during fastadapter.save")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_auto_embedding_decision_with_a_hub_id_needs_no_network(tmp_path: Path, no_network: None) -> None:
    # base_model_name_or_path looks like a Hub id: PEFT would ask the Hub unless offline; fastadapter
    # never asks.
    base = tiny_llama()
    base.name_or_path = "some-org/some-model"
    model = make_peft(base, lora_config())
    assert model.peft_config["default"].base_model_name_or_path == "some-org/some-model"
    save_with_fastadapter(model, tmp_path / "ours", save_embedding_layers="auto")
    save_with_peft(model, tmp_path / "peft", save_embedding_layers="auto")  # offline: assumes no resize
    assert_same_files(tmp_path / "ours", tmp_path / "peft")


# --- a failed save leaves the previous save intact ------------------------------------------------------


def _failing_after(real: Any, calls_before_failure: int) -> Any:
    """Wrap a staging function so that it works calls_before_failure times, then raises."""
    count = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] > calls_before_failure:
            raise OSError(28, "No space left on device (simulated)", str(args[0]))
        return real(*args, **kwargs)

    return wrapper


def two_adapter_model(seed: int) -> PeftModel:
    model = small_model(seed)
    add_perturbed_adapter(model, "other", lora_config(r=2, target_modules=["k_proj"]), seed=seed + 10)
    return model


# A save of two adapters stages: README, default config, other config (stage_bytes) and two weight files.
@pytest.mark.parametrize(
    ("function", "calls_before_failure"),
    [
        ("stage_bytes", 0),
        ("stage_bytes", 1),
        ("stage_bytes", 2),
        ("write_safetensors", 0),
        ("write_safetensors", 1),
    ],
)
def test_failed_save_leaves_previous_files_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, calls_before_failure: int
) -> None:
    target = tmp_path / "out"
    save_with_fastadapter(two_adapter_model(seed=1), target)
    before = snapshot(target)
    assert f"other/{SAFETENSORS}" in before
    # Different weights, so a partial overwrite could not go unnoticed.
    changed = two_adapter_model(seed=2)
    real = getattr(fastadapter._core, function)
    monkeypatch.setattr(fastadapter._core, function, _failing_after(real, calls_before_failure))
    with pytest.raises(OSError, match="simulated"):
        save_with_fastadapter(changed, target)
    assert snapshot(target) == before
    assert leftovers(target) == []
    # The same save succeeds without the fault, and does change the files (the failure was not a no-op).
    monkeypatch.setattr(fastadapter._core, function, real)
    save_with_fastadapter(changed, target)
    assert snapshot(target) != before


def test_failed_pickle_save_leaves_previous_files_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    save_with_fastadapter(small_model(seed=1), target, safe_serialization=False)
    before = snapshot(target)
    real_save = torch.save

    def half_written(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(5, "Input/output error (simulated)", str(f))

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="simulated"):
        save_with_fastadapter(small_model(seed=2), target, safe_serialization=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert snapshot(target) == before
    assert leftovers(target) == []


def test_unwritable_dtype_fails_without_touching_the_directory(tmp_path: Path) -> None:
    model = small_model()
    target = tmp_path / "out"
    save_with_fastadapter(model, target)
    before = snapshot(target)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A.default.weight.data = layer.lora_A.default.weight.data.to(torch.complex128)
    with pytest.raises(KeyError):  # the oracle: safetensors has no complex128
        save_with_peft(model, tmp_path / "peft")
    with pytest.raises(fastadapter.TensorError, match="lora_A") as info:
        save_with_fastadapter(model, target)
    assert isinstance(info.value, ValueError)
    assert snapshot(target) == before
    assert leftovers(target) == []


def test_failure_on_a_fresh_directory_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fastadapter._core.write_safetensors
    monkeypatch.setattr(fastadapter._core, "write_safetensors", _failing_after(real, 0))
    target = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        save_with_fastadapter(small_model(), target)
    assert not [p for p in target.rglob("*") if p.is_file()]
    assert leftovers(target) == []


# --- imports -------------------------------------------------------------------------------------------


def test_import_does_not_import_peft() -> None:
    proc = run_python("import sys, fastadapter; assert 'peft' not in sys.modules, 'peft imported'")
    assert proc.returncode == 0, proc.stderr


def test_refusing_a_plain_module_does_not_import_peft(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, torch, fastadapter
        try:
            fastadapter.save(torch.nn.Linear(2, 2), {str(tmp_path / "out")!r})
        except fastadapter.AdapterNotFoundError:
            pass
        else:
            raise SystemExit("no error")
        assert 'peft' not in sys.modules, 'peft imported'
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


def test_offline_environment_is_set_for_the_whole_suite() -> None:
    # conftest.py sets these before transformers/huggingface_hub are imported; the no-network tests
    # rely on it.
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
