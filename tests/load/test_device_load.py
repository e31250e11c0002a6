"""Loading to a device through the staging buffer (`fastadapter._device_load`): layout, packing, views.

The staging path does not care whether the destination is a GPU, so on CPU it runs with CPU destinations
(staging forced on for "cpu"): the same layout, Rust packing, chunked copies and views, checked bit for bit
against `safetensors.torch.load_file` and against PEFT's loaded weights. The tests marked `cuda` run the
real thing and are skipped with a reason on machines without a GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

import fastadapter
from fastadapter import _device_load
from fastadapter._core import SafetensorsFile, copy_ranges
from fastadapter._device_load import ALIGN, Placement, chunk_ranges, plan_layout, to_devices
from fastadapter._tensors import mapped_tensors
from fastadapter.layers import LoraLinear
from helpers import LLAMA_LINEARS, SAFETENSORS, lora_config, make_peft, tiny_llama

CPU = torch.device("cpu")
requires_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture
def stage_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Stage CPU destinations too, through a small buffer: tensors straddle chunks and the ring wraps."""
    monkeypatch.setattr(_device_load, "STAGED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(_device_load, "CHUNK", 4096)
    monkeypatch.setattr(_device_load, "MAX_STAGING", 3 * 4096)  # three 4 KiB slots, reused in turn
    _device_load.STAGING.release()
    yield
    _device_load.STAGING.release()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so that the comparison is bit for bit (NaN payloads, -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _odd_file(tmp_path: Path) -> Path:
    """Mixed dtypes and odd sizes: most tensors start at offsets no dtype is aligned to."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(37, 129, generator=g),
        "b.bf16": torch.randn(7, 3001, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.f64": torch.randn(11, generator=g, dtype=torch.float64),
        "e.empty": torch.zeros(0, 4),
        "f.special": torch.tensor([float("nan"), -0.0, float("inf"), 1e-45]),
        "g.big": torch.randn(4, 5000, generator=g),  # 80 KB: many chunks, the ring wraps
    }
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    return path


# --- the layout ------------------------------------------------------------------------------------------


def _items() -> list[Placement]:
    f32, bf16 = torch.float32, torch.bfloat16
    return [
        Placement(0, (3,), f32, f32, 12, 0, 100),
        Placement(1, (7, 2), bf16, f32, 28, 0, 2),
        Placement(2, (0,), f32, f32, 0, 0, 50),
        Placement(3, (300,), f32, f32, 1200, 1, 0),
        Placement(4, (1,), bf16, f32, 2, 0, 31),
    ]


def test_layout_aligns_every_tensor_and_groups_conversions() -> None:
    layout = plan_layout(CPU, _items())
    placed = layout.placements()
    assert sorted(p.index for p in placed) == [0, 1, 2, 3, 4]
    spans = sorted((p.offset, p.offset + p.nbytes) for p in placed)
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
    assert layout.nbytes >= spans[-1][1]
    assert layout.nbytes % ALIGN == 0
    # One run per (source dtype, target dtype); every run starts aligned and holds only its own kind.
    kinds = [(r.source_dtype, r.target_dtype) for r in layout.runs]
    assert len(kinds) == len(set(kinds)) == 2
    for run in layout.runs:
        assert run.start % ALIGN == 0
        for p in run.placements:
            assert (p.source_dtype, p.target_dtype) == (run.source_dtype, run.target_dtype)
            assert run.start <= p.offset
            assert p.offset + p.nbytes <= run.end
    # Within a run, file order (sequential reads): bf16 at source offset 2 before the one at 31.
    bf16_run = next(r for r in layout.runs if r.source_dtype == torch.bfloat16)
    assert [p.index for p in bf16_run.placements] == [1, 4]


@pytest.mark.parametrize("chunk", [1, 100, ALIGN, 1000, 1 << 20])
def test_chunk_ranges_copy_every_byte_once(chunk: int) -> None:
    layout = plan_layout(CPU, _items())
    expected = {
        p.offset + k: (p.source, p.source_offset + k) for p in layout.placements() for k in range(p.nbytes)
    }
    got: dict[int, tuple[int, int]] = {}
    for piece, ranges in enumerate(chunk_ranges(layout, chunk)):
        for source, source_offset, at, n in ranges:
            assert at >= 0
            assert at + n <= chunk
            for k in range(n):
                assert piece * chunk + at + k not in got
                got[piece * chunk + at + k] = (source, source_offset + k)
    assert got == expected


# --- packing: the Rust copy -------------------------------------------------------------------------------


def test_copy_ranges_copies_exactly_the_ranges() -> None:
    src = torch.arange(200, dtype=torch.uint8).numpy()
    other = torch.full((64,), 7, dtype=torch.uint8).numpy()
    dst = torch.zeros(300, dtype=torch.uint8)
    copied = copy_ranges(dst.numpy(), [src, other], [(0, 10, 0, 50), (1, 0, 100, 64), (0, 199, 299, 1)])
    assert copied == 115
    expected = torch.zeros(300, dtype=torch.uint8)
    expected[0:50] = torch.arange(10, 60)
    expected[100:164] = 7
    expected[299] = 199
    assert torch.equal(dst, expected)


def test_copy_ranges_large_parallel_copy_matches() -> None:
    src = torch.randint(0, 256, (24 << 20,), dtype=torch.uint8)  # above the parallel threshold
    dst = torch.zeros(src.numel() + 4096, dtype=torch.uint8)
    copy_ranges(dst.numpy(), [src.numpy()], [(0, 3, 4093, src.numel() - 3)])
    assert torch.equal(dst[4093 : 4093 + src.numel() - 3], src[3:])
    assert not dst[:4093].any()


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([(0, 0, 0, 9)], "outside source"),
        ([(0, 0, 10, 8)], "outside the destination"),
        ([(1, 0, 0, 1)], "does not exist"),
        ([(0, 0, 0, 4), (0, 0, 3, 4)], "overlap"),
        ([(0, 2**63, 0, 2**63)], "outside source"),
    ],
)
def test_copy_ranges_refuses_bad_plans(ranges: list[tuple[int, int, int, int]], message: str) -> None:
    src = torch.arange(8, dtype=torch.uint8).numpy()
    dst = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        copy_ranges(dst.numpy(), [src], ranges)
    assert not dst.any()  # checked before any byte moved


def test_copy_ranges_refuses_read_only_and_aliased_destinations() -> None:
    with pytest.raises(ValueError, match="read-only"):
        copy_ranges(b"\0" * 8, [b"abcd"], [(0, 0, 0, 4)])
    buf = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="shares memory"):
        copy_ranges(buf.numpy(), [buf[8:].numpy()], [(0, 0, 0, 4)])


# --- staging end to end, CPU destination -----------------------------------------------------------------


@pytest.mark.usefixtures("stage_on_cpu")
def test_staged_tensors_equal_the_file_bit_for_bit(tmp_path: Path) -> None:
    path = _odd_file(tmp_path)
    oracle = load_file(str(path))
    file = SafetensorsFile(path)
    mapped = mapped_tensors(file, file.entries())
    names = sorted(mapped)
    out = to_devices([(mapped[n], CPU, mapped[n].dtype) for n in names])
    mapping = torch.frombuffer(file, dtype=torch.uint8)
    for name, got in zip(names, out, strict=True):
        assert got.dtype == oracle[name].dtype, name
        assert got.shape == oracle[name].shape, name
        assert torch.equal(_bits(got), _bits(oracle[name])), name
        # Staged: a copy in the destination allocation, not the mapping.
        if got.numel():  # an empty tensor's data_ptr() is 0, whatever its offset
            assert got.untyped_storage().data_ptr() != mapping.data_ptr(), name
            assert (got.data_ptr() - got.untyped_storage().data_ptr()) % ALIGN == 0, name


@pytest.mark.usefixtures("stage_on_cpu")
def test_staged_conversions_equal_torch_conversions(tmp_path: Path) -> None:
    path = _odd_file(tmp_path)
    oracle = load_file(str(path))
    file = SafetensorsFile(path)
    mapped = mapped_tensors(file, file.entries())
    names = sorted(mapped)
    targets = [torch.float32 if n != "d.f64" else torch.float16 for n in names]
    out = to_devices([(mapped[n], CPU, dt) for n, dt in zip(names, targets, strict=True)])
    for name, dt, got in zip(names, targets, out, strict=True):
        expected = oracle[name].to(dt)
        assert got.dtype == dt, name
        assert torch.equal(_bits(got), _bits(expected)), name


@pytest.mark.usefixtures("stage_on_cpu")
def test_strided_and_unstaged_requests_keep_their_routes() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    strided = base.t()  # not contiguous: staged from a contiguous copy
    meta = torch.empty(2, 3, device="meta")
    got_strided, got_meta = to_devices(
        [(strided, CPU, torch.float32), (meta, torch.device("meta"), torch.float32)]
    )
    assert torch.equal(got_strided, strided)
    assert got_strided.is_contiguous()
    assert got_meta is meta  # nothing to do: same device, same dtype


def test_without_staging_cpu_targets_stay_views() -> None:
    source = torch.arange(6, dtype=torch.float32)
    (same,) = to_devices([(source, CPU, torch.float32)])
    assert same is source  # the zero-copy route: a view of the mapping stays one


@pytest.mark.usefixtures("stage_on_cpu")
def test_staging_buffer_is_reused_and_grows_only_when_needed() -> None:
    src = torch.arange(1000, dtype=torch.float32)
    to_devices([(src[:10], CPU, torch.float32)])
    small = _device_load.STAGING.tensor
    assert small is not None
    to_devices([(src[10:20], CPU, torch.float32)])
    assert _device_load.STAGING.tensor is small  # same buffer, no new allocation
    (big,) = to_devices([(src, CPU, torch.float32)])  # 4000 bytes: grows to the cap
    grown = _device_load.STAGING.tensor
    assert grown is not None
    assert grown.numel() > small.numel()
    assert torch.equal(big, src)
    to_devices([(src, CPU, torch.float32)])
    assert _device_load.STAGING.tensor is grown


# --- through fastadapter.load, CPU destination -------------------------------------------------------------


def _peft_dir(tmp_path: Path, base: nn.Module, **overrides: object) -> Path:
    directory = tmp_path / "peft"
    autocast = bool(overrides.pop("autocast_adapter_dtype", True))
    config = lora_config(target_modules=LLAMA_LINEARS, **overrides)
    make_peft(base, config, autocast_adapter_dtype=autocast).save_pretrained(str(directory))
    return directory


def _peft_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items() if "lora_" in k}


def _assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        got = ours[key]
        assert got.dtype == expected.dtype, key
        assert got.device == expected.device, key
        assert torch.equal(_bits(got.cpu()), _bits(expected.cpu())), key


@pytest.mark.usefixtures("stage_on_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_through_staging_equals_peft(tmp_path: Path, dtype: torch.dtype) -> None:
    # bf16: a bf16 file (no autocast on save) on a bf16 base: PEFT's policy upcasts, on the device here.
    directory = _peft_dir(tmp_path, tiny_llama().to(dtype), autocast_adapter_dtype=dtype == torch.float32)
    assert {t.dtype for t in load_file(str(directory / SAFETENSORS)).values()} == {dtype}
    theirs = _peft_lora(PeftModel.from_pretrained(tiny_llama().to(dtype), str(directory)))
    model = fastadapter.load(tiny_llama().to(dtype), directory)
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    _assert_same_weights(ours, theirs)
    # Staged: all weights live in one allocation (one per conversion run), none in the file's mapping.
    assert len({v.untyped_storage().data_ptr() for v in ours.values()}) == 1


@pytest.mark.usefixtures("stage_on_cpu")
def test_peft_model_load_through_staging_equals_peft(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama())
    theirs = PeftModel.from_pretrained(tiny_llama(), str(directory))
    theirs.load_adapter(str(directory), "other")
    ours = PeftModel.from_pretrained(tiny_llama(), str(directory))
    fastadapter.load(ours, directory, "other")
    pick = {k: v for k, v in ours.state_dict().items() if ".other." in k}
    _assert_same_weights(pick, {k: v for k, v in theirs.state_dict().items() if ".other." in k})


# --- CUDA (skipped with a reason without a GPU) ------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _assert_equals_file(model: nn.Module, directory: Path) -> int:
    """Every LoRA weight equals the file's tensor bit for bit (fp32 file, fp32 base: no conversion) and sits
    on its base layer's device. Returns how many were checked."""
    oracle = load_file(str(directory / SAFETENSORS))
    params = dict(model.named_parameters())
    checked = 0
    for key, expected in oracle.items():
        name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        got = params[name]
        layer = model.get_submodule(name.split(".lora_", 1)[0])
        assert isinstance(layer, LoraLinear)
        assert got.device == layer.base_layer.weight.device, name
        assert torch.equal(_bits(got.cpu()), _bits(expected)), name
        checked += 1
    return checked


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_load_equals_peft(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = _peft_dir(tmp_path, tiny_llama().to(dtype), autocast_adapter_dtype=dtype == torch.float32)
    theirs = _peft_lora(PeftModel.from_pretrained(tiny_llama().to(dtype).to("cuda:0"), str(directory)))
    model = fastadapter.load(tiny_llama().to(dtype).to("cuda:0"), directory)
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    _assert_same_weights(ours, theirs)
    assert len({v.untyped_storage().data_ptr() for v in ours.values()}) == 1  # one device allocation


@pytest.mark.cuda
@cuda_only
def test_cuda_peft_model_load_equals_peft(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama())
    theirs = PeftModel.from_pretrained(tiny_llama().to("cuda:0"), str(directory))
    theirs.load_adapter(str(directory), "other")
    ours = PeftModel.from_pretrained(tiny_llama().to("cuda:0"), str(directory))
    fastadapter.load(ours, directory, "other")
    pick = {k: v for k, v in ours.state_dict().items() if ".other." in k}
    _assert_same_weights(pick, {k: v for k, v in theirs.state_dict().items() if ".other." in k})


@pytest.mark.cuda
@cuda_only
def test_cpu_and_cuda_split_puts_each_weight_on_its_base_device(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama())
    model = tiny_llama()
    model.model.layers[1].to("cuda:0")
    fastadapter.load(model, directory)
    assert _assert_equals_file(model, directory) == 2 * 2 * len(LLAMA_LINEARS)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    on_cpu = [p for p in lora if p.device.type == "cpu"]
    on_cuda = [p for p in lora if p.device.type == "cuda"]
    assert on_cpu
    assert on_cuda
    # CPU weights keep the zero-copy route (views of the file's mapping), GPU ones share one allocation.
    assert len({p.untyped_storage().data_ptr() for p in on_cpu}) == 1
    assert on_cpu[0].untyped_storage().nbytes() == (directory / SAFETENSORS).stat().st_size
    assert len({p.untyped_storage().data_ptr() for p in on_cuda}) == 1


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_devices_each_weight_on_its_base_device(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama())
    model = tiny_llama()
    model.model.layers[0].to("cuda:0")
    model.model.layers[1].to("cuda:1")
    fastadapter.load(model, directory)
    assert _assert_equals_file(model, directory) == 2 * 2 * len(LLAMA_LINEARS)
    devices = {p.device for n, p in model.named_parameters() if "lora_" in n}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}


@pytest.mark.cuda
@cuda_only
def test_cuda_staging_buffer_is_pinned_and_reused(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path, tiny_llama())
    fastadapter.load(tiny_llama().to("cuda:0"), directory)
    first = _device_load.STAGING.tensor
    assert first is not None
    assert first.is_pinned()
    model = fastadapter.load(tiny_llama().to("cuda:0"), directory)
    second = _device_load.STAGING.tensor
    assert second is not None
    assert second.data_ptr() == first.data_ptr()
    assert _assert_equals_file(model, directory) == 2 * 2 * len(LLAMA_LINEARS)
