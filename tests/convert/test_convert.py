"""`.bin` (torch.save) -> safetensors conversion: torch is the oracle.

Every checkpoint here is written by `torch.save`, converted by fastadapter, and every tensor of the output
is compared with what `torch.load(weights_only=True)` returns for the source: same names, dtypes, shapes,
`torch.equal` values and identical bytes. Also covered: output naming (Hugging Face's conventions), sharded
checkpoints and their index, `convert_dir`, the command line (exit codes, summary, --dry-run, --overwrite,
skips, inspect) and that no conversion path imports torch.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastadapter
from fastadapter import _core, cli
from fastadapter.convert import convert_paths, default_destination

REPO = Path(__file__).resolve().parents[2]

# --- oracle --------------------------------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a loaded checkpoint under the names a state dict gives them (nested keys joined by
    `.`); non-tensor entries are left out, as the conversion leaves them out."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, dict):
            yield from flatten(value, name + ".")


def contiguous_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def read_safetensors(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict


def assert_same_as_torch(src: str | Path, dst: str | Path) -> dict[str, torch.Tensor]:
    """`dst` (our output) holds exactly the tensors `torch.load(src, weights_only=True)` returns."""
    want = dict(flatten(torch.load(src, weights_only=True)))
    metadata, got = read_safetensors(dst)
    assert metadata == {"format": "pt"}
    assert sorted(got) == sorted(want), f"names differ: {sorted(set(got) ^ set(want))}"
    for name, expected in want.items():
        have = got[name]
        assert have.dtype == expected.dtype, f"{name}: {have.dtype} != {expected.dtype}"
        assert have.shape == expected.shape, f"{name}: {tuple(have.shape)} != {tuple(expected.shape)}"
        assert torch.equal(have, expected.detach()), f"{name}: values differ"
        assert contiguous_bytes(have) == contiguous_bytes(expected), f"{name}: bytes differ"
    return want


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def converted(src: Path, dst: Path | None = None, **kwargs: Any) -> fastadapter.Conversion:
    """Convert, check against torch, and check that only `dst` was added beside it (no temp file)."""
    dst = dst or Path(default_destination(src))
    before = set(dst.parent.iterdir())
    source_hash = sha256(src)
    result = fastadapter.convert(src, dst, **kwargs)
    want = assert_same_as_torch(src, dst)
    assert set(dst.parent.iterdir()) - before <= {dst}, "temp files left behind"
    assert sha256(src) == source_hash, "source modified"
    assert result.dst == str(dst)
    assert result.src == str(src)
    assert result.tensors == len(want)
    assert result.bytes == sum(len(contiguous_bytes(t)) for t in want.values())
    return result


# --- checkpoints ---------------------------------------------------------------------------------------

# Every dtype torch.save writes that safetensors can hold.
DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.complex64,
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tensor_of(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> torch.Tensor:
    base = torch.randn(*shape, generator=gen(seed)) * 8
    if dtype.is_complex:
        return torch.complex(base, -base / 3).to(dtype)
    if dtype == torch.bool:
        return base > 0
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return base.abs().to(torch.int64).to(dtype)
    return base.to(dtype)


def every_dtype() -> dict[str, torch.Tensor]:
    out = {f"t_{str(dt).removeprefix('torch.')}": tensor_of(dt, seed=i) for i, dt in enumerate(DTYPES)}
    # Each dtype also as a strided view into a larger storage, and as a 0-d scalar.
    for i, dt in enumerate(DTYPES):
        name = str(dt).removeprefix("torch.")
        out[f"view_{name}"] = tensor_of(dt, (4, 6), seed=100 + i)[1:, ::2]
        out[f"scalar_{name}"] = tensor_of(dt, (1,), seed=200 + i)[0]
    return out


def views() -> dict[str, torch.Tensor]:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    return {
        "base": base,
        "row_slice": base[2:4],  # contiguous, storage offset 20
        "col_slice": base[:, 3:7],  # strided
        "step": base[::2, ::3],
        "transposed": base.t(),  # non-contiguous
        "permuted": torch.arange(24, dtype=torch.int16).reshape(2, 3, 4).permute(2, 0, 1),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "scalar_view": base[1, 2],  # 0-d view with an offset
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "empty_view": base[3:3],
        "expanded": torch.arange(3, dtype=torch.int32).unsqueeze(0).expand(4, 3),  # stride 0
        "tail_offset": torch.arange(100, dtype=torch.bfloat16)[97:],
    }


def shared_storages() -> dict[str, torch.Tensor]:
    w = torch.randn(4, 6, generator=gen(1))
    other = torch.randn(10, generator=gen(2))
    return {
        "a.weight": w,
        "b.weight": w,  # the same tensor under two names (tied weights)
        "first_half": w[:2],
        "second_half": w[2:],
        "t": w.t(),
        "flat": w.view(-1),
        "other_tail": other[5:],  # the only name for a storage, not covering it
        "other_head": other[:3],
    }


def params_nested() -> dict[str, Any]:
    lin = torch.nn.Linear(3, 2)
    inner = collections.OrderedDict(
        [
            ("w", torch.nn.Parameter(torch.randn(2, 2, generator=gen(3)))),
            ("v", torch.ones(3, dtype=torch.bfloat16)),
        ]
    )
    return {
        "param": torch.nn.Parameter(torch.randn(3, generator=gen(4))),
        "frozen": torch.nn.Parameter(torch.randn(3, generator=gen(5)), requires_grad=False),
        "model": lin.state_dict(),  # an OrderedDict carrying `_metadata`
        "nested": {"inner": inner, "deeper": {"x": {"y": torch.zeros(2, dtype=torch.int8)}}, "step": 7},
        "name": "adapter",
        "epoch": 3,
        "none": None,
    }


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()  # lm_head.weight ties transformer.wte.weight


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


CHECKPOINTS = {
    "every_dtype": every_dtype,
    "views": views,
    "shared_storages": shared_storages,
    "params_nested": params_nested,
    "ordered_dict": lambda: collections.OrderedDict(views()),
    "gpt2_state_dict": lambda: tiny_gpt2().state_dict(),
    "llama_state_dict": lambda: tiny_llama().state_dict(),
    "llama_bf16": lambda: tiny_llama().to(torch.bfloat16).state_dict(),
    "llama_fp16_params": lambda: dict(tiny_llama().half().named_parameters()),
    "empty_dict": dict,
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "noverify"])
def test_conversion_equals_torch_load(tmp_path: Path, name: str, verify: bool) -> None:
    src = tmp_path / f"{name}.bin"
    torch.save(CHECKPOINTS[name](), src)
    converted(src, tmp_path / f"{name}.safetensors", verify=verify)


def test_every_dtype_is_covered(tmp_path: Path) -> None:
    src = tmp_path / "dtypes.pt"
    torch.save(every_dtype(), src)
    fastadapter.convert(src)
    _, got = read_safetensors(tmp_path / "dtypes.safetensors")
    assert {t.dtype for t in got.values()} == set(DTYPES)
    header = {
        name: dtype for name, dtype, *_ in _core.SafetensorsFile(tmp_path / "dtypes.safetensors").entries()
    }
    assert header["t_float8_e4m3fn"] == "F8_E4M3"
    assert header["t_uint64"] == "U64"
    assert header["t_complex64"] == "C64"


def test_pickle_protocol_3(tmp_path: Path) -> None:
    # torch.load(weights_only=True) reads protocol 3 too (with a warning); protocol 2 is torch.save's default.
    src = tmp_path / "p3.bin"
    torch.save(views(), src, pickle_protocol=3)
    with pytest.warns(UserWarning, match="pickle protocol 3"):
        converted(src, tmp_path / "p3.safetensors")


def test_non_tensor_entries_are_reported(tmp_path: Path) -> None:
    src = tmp_path / "nested.bin"
    torch.save(params_nested(), src)
    result = converted(src)
    assert set(result.skipped) >= {
        ("model._metadata", "dict"),
        ("nested.step", "int"),
        ("name", "str"),
        ("epoch", "int"),
        ("none", "None"),
    }
    assert not any(name.endswith(("weight", "bias", ".w", ".v", ".y")) for name, _ in result.skipped)


def test_shared_storages_become_separate_tensors(tmp_path: Path) -> None:
    src = tmp_path / "shared.bin"
    torch.save(shared_storages(), src)
    result = converted(src)
    # Every name sharing a storage with an earlier one is copied out (safetensors has no aliasing).
    assert result.aliases_copied >= 5
    entries = _core.SafetensorsFile(tmp_path / "shared.safetensors").entries()
    spans = sorted((start, end) for *_, start, end in entries)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "tensors overlap in the file"

    gpt2 = tmp_path / "pytorch_model.bin"
    torch.save(tiny_gpt2().state_dict(), gpt2)
    tied = converted(gpt2)
    assert tied.aliases_copied == 1  # lm_head.weight ties transformer.wte.weight
    assert tied.skipped == (("_metadata", "dict"),)


def test_output_loads_into_the_model(tmp_path: Path) -> None:
    model = tiny_gpt2()
    src = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), src)
    fastadapter.convert(src)
    _, tensors = read_safetensors(tmp_path / "model.safetensors")
    twin = GPT2LMHeadModel(model.config).eval()
    twin.load_state_dict(tensors)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)


def test_unconvertible_dtype_is_refused(tmp_path: Path) -> None:
    for dtype in (torch.complex128,):
        src = tmp_path / "c128.bin"
        torch.save({"ok": torch.ones(2), "z": torch.ones(2, dtype=dtype)}, src)
        dst = tmp_path / "c128.safetensors"
        with pytest.raises(fastadapter.TensorError, match=r"`z`.*complex128.*no safetensors equivalent"):
            fastadapter.convert(src, dst)
        assert not dst.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c128.bin"]


def test_progress_counts_the_output_bytes(tmp_path: Path) -> None:
    src = tmp_path / "views.bin"
    torch.save(views(), src)
    progress = _core.Progress()
    fastadapter.convert(src, progress=progress)
    assert progress.value == (tmp_path / "views.safetensors").stat().st_size


# --- naming, overwrite, I/O errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        ("adapter_model.bin", "adapter_model.safetensors"),
        ("pytorch_model.bin", "model.safetensors"),
        ("pytorch_model-00001-of-00002.bin", "model-00001-of-00002.safetensors"),
        ("pytorch_model-00012-of-00030.bin", "model-00012-of-00030.safetensors"),
        ("training_args.bin", "training_args.safetensors"),
        ("checkpoint.pt", "checkpoint.safetensors"),
        ("weights.pth", "weights.safetensors"),
        ("my.model.v2.bin", "my.model.v2.safetensors"),
    ],
)
def test_default_destination(source: str, destination: str) -> None:
    assert default_destination(source) == destination
    assert default_destination(os.path.join("some", "dir", source)) == os.path.join(
        "some", "dir", destination
    )
    assert default_destination(Path("d") / source) == os.path.join("d", destination)


@pytest.mark.parametrize("name", ["model.safetensors", "weights.ckpt", "README.md", "bin"])
def test_default_destination_refuses_other_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a torch checkpoint name"):
        default_destination(name)


def test_convert_uses_the_default_destination(tmp_path: Path) -> None:
    for name in ("adapter_model.bin", "pytorch_model.bin", "pytorch_model-00002-of-00003.bin", "ckpt.pth"):
        src = tmp_path / name
        torch.save({"w": torch.randn(3, generator=gen(0))}, src)
        result = fastadapter.convert(src)
        assert result.dst == default_destination(str(src))
        assert_same_as_torch(src, result.dst)


def test_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "adapter_model.bin"
    dst = tmp_path / "adapter_model.safetensors"
    torch.save({"w": torch.zeros(3)}, src)
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError) as info:
        fastadapter.convert(src, overwrite=False)
    assert info.value.filename == str(dst)
    assert dst.read_bytes() == b"old"
    fastadapter.convert(src)  # overwrite=True is the default of convert()
    assert_same_as_torch(src, dst)
    torch.save({"w": torch.ones(4)}, src)
    converted(src, dst, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.bin", "adapter_model.safetensors"]


def test_io_errors_are_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        fastadapter.convert(tmp_path / "absent.bin")
    assert missing.value.filename == str(tmp_path / "absent.bin")
    src = tmp_path / "w.bin"
    torch.save({"w": torch.ones(2)}, src)
    with pytest.raises(FileNotFoundError):
        fastadapter.convert(src, tmp_path / "no" / "such" / "dir.safetensors")
    with pytest.raises(OSError, match=r"\[Errno \d+\]") as directory:  # mmap of a directory: ENODEV today
        fastadapter.convert(tmp_path, tmp_path / "dir.safetensors")
    assert directory.value.filename == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


# --- sharded checkpoints and convert_dir ---------------------------------------------------------------


def write_sharded(model: torch.nn.Module, directory: Path, shards: int = 3) -> dict[str, torch.Tensor]:
    """What `save_pretrained(safe_serialization=False)` wrote before transformers 5 dropped it: numbered
    `pytorch_model-0000i-of-0000n.bin` shards plus `pytorch_model.bin.index.json`, and config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    names = list(state)
    size = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = names[i * size : (i + 1) * size]
        torch.save({k: state[k].contiguous() for k in chunk}, directory / file)
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(directory)
    return state


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model = tiny_llama(seed=1)
    state = write_sharded(model, tmp_path / "ckpt")
    report = fastadapter.convert_dir(tmp_path / "ckpt")
    assert report.ok, report.failed
    assert sorted(os.path.basename(c.dst) for c in report.converted) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    for c in report.converted:
        assert_same_as_torch(c.src, c.dst)
    assert report.bytes == sum(t.numel() * t.element_size() for t in state.values())

    old = json.loads((tmp_path / "ckpt" / "pytorch_model.bin.index.json").read_text())
    new = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert new["weight_map"] == {k: default_destination(v) for k, v in old["weight_map"].items()}
    assert new["metadata"]["total_size"] == old["metadata"]["total_size"] == report.bytes
    for name, file in new["weight_map"].items():
        with safe_open(str(tmp_path / "ckpt" / file), "pt") as f:
            assert torch.equal(f.get_tensor(name), state[name]), name

    # transformers loads the converted folder through the new index: the same model.
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    again = fastadapter.convert_dir(tmp_path / "ckpt")
    assert again.ok
    assert not again.converted
    assert len(again.skipped) == 3
    assert all("exists (pass overwrite=True to replace it)" in why for _, why in again.skipped)
    assert sorted(s for s, _ in again.existing) == sorted(s for s, _ in again.skipped)


def test_index_is_written_when_the_shards_were_converted_before(tmp_path: Path) -> None:
    # e.g. the shards were converted one by one, or a run was interrupted before the index was written:
    # convert_paths' docstring promises the index once all shards are converted "by this run or before it".
    write_sharded(tiny_llama(), tmp_path)
    for shard in sorted(tmp_path.glob("pytorch_model-*.bin")):
        fastadapter.convert(shard)
    report = fastadapter.convert_dir(tmp_path)
    assert report.ok
    assert len(report.skipped) == 3
    assert (tmp_path / "model.safetensors.index.json").is_file()


def test_sharded_checkpoint_with_a_bad_shard(tmp_path: Path) -> None:
    write_sharded(tiny_llama(), tmp_path)
    bad = tmp_path / "pytorch_model-00002-of-00003.bin"
    bad.write_bytes(bad.read_bytes()[:100])
    report = fastadapter.convert_dir(tmp_path)
    assert not report.ok
    failed = dict(report.failed)
    assert set(failed) == {str(bad), str(tmp_path / "pytorch_model.bin.index.json")}
    assert "not a valid torch.save zip archive" in failed[str(bad)]
    assert "shards not converted" in failed[str(tmp_path / "pytorch_model.bin.index.json")]
    assert len(report.converted) == 2, "one bad shard must not stop the others"
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model-00002-of-00003.safetensors").exists()


def make_tree(root: Path) -> dict[str, Path]:
    """A folder of checkpoints at two depths, with files that are not checkpoints beside them."""
    files = {
        "top": root / "adapter_model.bin",
        "pt": root / "extra.pt",
        "sub": root / "sub" / "pytorch_model.bin",
        "deep": root / "sub" / "deeper" / "w.pth",
    }
    for i, path in enumerate(files.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.randn(4, 4, generator=gen(i)), "i": torch.tensor(i)}, path)
    (root / "config.json").write_text("{}")
    (root / "sub" / "notes.txt").write_text("not a checkpoint")
    return files


def test_convert_dir(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    plan = fastadapter.convert_dir(tmp_path, dry_run=True)
    assert sorted(plan.planned) == sorted((str(p), default_destination(str(p))) for p in files.values())
    assert not plan.converted
    assert not list(tmp_path.rglob("*.safetensors")), "a dry run writes nothing"

    shallow = fastadapter.convert_dir(tmp_path, recursive=False, jobs=1)
    assert sorted(c.src for c in shallow.converted) == sorted([str(files["top"]), str(files["pt"])])

    report = fastadapter.convert_dir(tmp_path, jobs=4, verify=False)
    assert report.ok
    assert sorted(c.src for c in report.converted) == sorted([str(files["sub"]), str(files["deep"])])
    assert sorted(s for s, _ in report.skipped) == sorted([str(files["top"]), str(files["pt"])])
    for src in files.values():
        assert_same_as_torch(src, default_destination(str(src)))

    everything = fastadapter.convert_dir(tmp_path, overwrite=True)
    assert len(everything.converted) == 4
    assert not everything.skipped


def test_convert_dir_one_failure_does_not_stop_the_others(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    (tmp_path / "tokenizer.bin").write_bytes(b"\x00not a torch file" * 10)
    report = convert_paths([tmp_path, tmp_path / "missing.bin"])
    assert not report.ok
    failed = dict(report.failed)
    assert set(failed) == {str(tmp_path / "tokenizer.bin"), str(tmp_path / "missing.bin")}
    assert "not a valid torch.save zip archive" in failed[str(tmp_path / "tokenizer.bin")]
    assert "no such file" in failed[str(tmp_path / "missing.bin")]
    assert len(report.converted) == len(files)
    assert not (tmp_path / "tokenizer.safetensors").exists()


# --- command line --------------------------------------------------------------------------------------


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    return subprocess.run(
        [sys.executable, "-m", "fastadapter", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_cli_convert(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    dry = run_cli("convert", "--dry-run", tmp_path)
    assert dry.returncode == 0, dry.stderr
    for src in files.values():
        assert f"would convert {src} -> {default_destination(str(src))}" in dry.stdout
    assert "converted 0 file(s)" in dry.stdout
    assert not list(tmp_path.rglob("*.safetensors"))

    done = run_cli("convert", tmp_path, "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "converted 4 file(s)" in done.stdout
    assert "GB/s" in done.stdout
    for src in files.values():
        assert f"{src}: ok" in done.stderr
        assert_same_as_torch(src, default_destination(str(src)))

    again = run_cli("convert", tmp_path)
    assert again.returncode == 0
    assert "converted 0 file(s)" in again.stdout
    assert "skipped 4:" in again.stdout
    assert "destination exists (use --overwrite to replace it)" in again.stdout

    forced = run_cli("convert", "--overwrite", "--no-verify", "--no-recursive", tmp_path)
    assert forced.returncode == 0
    assert "converted 2 file(s)" in forced.stdout


def test_cli_reports_failures_and_exit_code(tmp_path: Path) -> None:
    good = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.ones(3)}, good)
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"garbage")
    result = run_cli("convert", good, bad, tmp_path / "absent.pt")
    assert result.returncode == 1
    assert "converted 1 file(s)" in result.stdout
    assert "FAILED 2:" in result.stdout
    assert f"{bad}: not a valid torch.save zip archive" in result.stdout
    assert f"{tmp_path / 'absent.pt'}: no such file" in result.stdout
    assert "FAILED:" in result.stderr  # the per-file line as it happens
    assert_same_as_torch(good, tmp_path / "adapter_model.safetensors")


def test_cli_lists_left_out_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "nested.bin"
    torch.save(params_nested(), src)
    assert cli.main(["convert", str(src)]) == 0
    out = capsys.readouterr().out
    assert f"{src}: left out non-tensor entries:" in out
    assert "epoch (int)" in out


def test_cli_inspect_bin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "pytorch_model.bin"
    torch.save(
        {"w": torch.zeros(4, 8, dtype=torch.bfloat16), "z": torch.zeros(2, dtype=torch.complex128)}, src
    )
    assert cli.main(["inspect", str(src)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{src}: torch.save checkpoint, 2 tensors"
    assert lines[1] == f"converts to: {tmp_path / 'model.safetensors'}"
    row = next(line.split() for line in lines if line.startswith("w "))
    assert row[:2] == ["w", "BF16"]
    assert "".join(row[2:4]) == "[4,8]"
    assert any("torch.complex128 (no safetensors dtype)" in line for line in lines)
    assert lines[-1] == "total: 96 B"
    assert not (tmp_path / "model.safetensors").exists(), "inspect writes nothing"


def test_cli_inspect_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "adapter_model.bin"
    torch.save(views(), src)
    fastadapter.convert(src)
    result = run_cli("inspect", tmp_path / "adapter_model.safetensors")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        f"{tmp_path / 'adapter_model.safetensors'}: safetensors, {len(views())} tensors"
    )
    assert "metadata: {'format': 'pt'}" in lines
    assert any(line.split()[:2] == ["transposed", "F32"] for line in lines)


def test_cli_inspect_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run_cli("inspect", bad)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {bad}: not a valid torch.save zip archive")
    missing = run_cli("inspect", tmp_path / "absent.safetensors")
    assert missing.returncode == 1
    assert "error:" in missing.stderr
    assert "absent.safetensors" in missing.stderr


def test_cli_usage_errors() -> None:
    assert run_cli().returncode == 2
    assert run_cli("convert").returncode == 2


# --- torch is never imported ---------------------------------------------------------------------------


def poisoned_torch(tmp_path: Path) -> Path:
    """A `torch` package that fails loudly when imported, first on the path: importing torch anywhere in
    the conversion path turns into an error (and -X importtime would list it too)."""
    package = tmp_path / "poison" / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torch was imported by the conversion path')\n")
    return package.parent


NO_TORCH_SCRIPT = """
import sys
import fastadapter
from fastadapter.convert import convert_paths
c = fastadapter.convert(sys.argv[1])
assert c.tensors == 12, c
r = fastadapter.convert_dir(sys.argv[2], jobs=2)
assert r.ok and len(r.converted) == 4, r
r = convert_paths([sys.argv[2]], dry_run=True, overwrite=True)
assert len(r.planned) == 4, r
from fastadapter import _core
assert len(_core.inspect_torch(sys.argv[1])) == 12
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("no torch")
"""


def test_conversion_does_not_import_torch(tmp_path: Path) -> None:
    src = tmp_path / "one" / "adapter_model.bin"
    src.parent.mkdir()
    torch.save(views(), src)
    make_tree(tmp_path / "tree")
    for poison in (False, True):
        path = [str(REPO / "python")] + ([str(poisoned_torch(tmp_path))] if poison else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        result = subprocess.run(
            [sys.executable, "-c", NO_TORCH_SCRIPT, str(src), str(tmp_path / "tree")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "no torch"
        for p in [*(tmp_path / "tree").rglob("*.safetensors")]:
            p.unlink()
        (tmp_path / "one" / "adapter_model.safetensors").unlink()


def test_cli_does_not_import_torch(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "tree")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), str(poisoned_torch(tmp_path))])}
    for args in (["convert", str(tmp_path / "tree")], ["inspect", str(files["top"])]):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "fastadapter", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
        assert "fastadapter.cli" in imported
        assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch was imported"
    assert len(list((tmp_path / "tree").rglob("*.safetensors"))) == 4


def test_safetensors_reads_our_files_without_torch_helpers(tmp_path: Path) -> None:
    # The output is a plain safetensors file: numpy's loader reads it too (no torch-specific layout).
    from safetensors.numpy import load_file

    src = tmp_path / "w.bin"
    state = {"a": torch.randn(3, 4, generator=gen(0)), "b": torch.arange(5, dtype=torch.int64)}
    torch.save(state, src)
    fastadapter.convert(src)
    arrays = load_file(str(tmp_path / "w.safetensors"))
    assert sorted(arrays) == ["a", "b"]
    for name, tensor in state.items():
        assert (arrays[name] == tensor.numpy()).all()


def test_source_zip_layout_is_what_torch_writes(tmp_path: Path) -> None:
    # Guards the premise of the hostile tests: torch.save stores every entry uncompressed under one root.
    src = tmp_path / "w.bin"
    torch.save({"w": torch.ones(3)}, src)
    with zipfile.ZipFile(src) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        assert {i.filename.split("/")[0] for i in z.infolist()} == {"w"}
