"""Hostile safetensors files beyond test_core_io's basic corpus: overflowing numbers, offsets past the
file, wrong JSON types, deep nesting, keys listed twice; through the low-level reader and through
`fastadapter.load`. The `safetensors` package is the oracle: where it refuses a file, we refuse it for the
same reason; where it accepts one we refuse (a key listed twice), the test says why.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open
from test_core_io import compact_json, f32_entry, raw_file

import fastadapter
from fastadapter import _core


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


U64_MAX = 2**64 - 1

# Each is refused by safetensors too; the oracle's reason must end our message.
REFUSED: dict[str, bytes] = {
    "shape_dim_u64_max": raw_file(compact_json({"a": entry("F32", [U64_MAX, 4], 0, 8)}), bytes(8)),
    "shape_product_overflow": raw_file(compact_json({"a": entry("F32", [1 << 32, 1 << 32], 0, 8)}), bytes(8)),
    "offset_past_end_of_file": raw_file(
        compact_json({"a": f32_entry(1, 0, 4), "b": f32_entry(1, 4, 8)}), bytes(4)
    ),
    "offsets_u64_max": raw_file(compact_json({"a": entry("U8", [0], U64_MAX, U64_MAX)})),
    "negative_dim": raw_file(compact_json({"a": entry("F32", [-1], 0, 4)}), bytes(4)),
    "negative_offset": raw_file(compact_json({"a": entry("F32", [1], -4, 0)}), bytes(4)),
    "float_dim": raw_file(b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', bytes(4)),
    "three_offsets": raw_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}', bytes(4)),
    "missing_offsets": raw_file(b'{"a":{"dtype":"F32","shape":[1]}}', bytes(4)),
    "metadata_value_not_a_string": raw_file(b'{"__metadata__":{"x":1}}'),
    "metadata_not_an_object": raw_file(b'{"__metadata__":[]}'),
    "metadata_listed_twice": raw_file(b'{"__metadata__":{},"__metadata__":{}}'),
    "nesting_100k_deep": raw_file(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "header_len_u64_max": struct.pack("<Q", U64_MAX) + b"{}",
    "zero_length_header": raw_file(b""),
    "nul_padding_instead_of_spaces": raw_file(b"{}\x00\x00"),
    "sub_byte_dtype_not_ending_on_a_byte": raw_file(compact_json({"a": entry("F4", [3], 0, 2)}), bytes(2)),
    "duplicate_name_different_offsets": raw_file(
        b'{"a":' + compact_json(f32_entry(1, 0, 4)) + b',"a":' + compact_json(f32_entry(1, 4, 8)) + b"}",
        bytes(8),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_for_the_same_reason_as_safetensors(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(REFUSED[case])
    with pytest.raises(SafetensorError) as oracle, safe_open(path, "pt"):
        pass
    start = time.perf_counter()
    with pytest.raises(fastadapter.HeaderError) as info:
        _core.SafetensorsFile(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert message.startswith(f"{path}: invalid safetensors file: "), message
    reason = str(oracle.value).split(": ", 1)[1]
    assert message.endswith(reason), (message, reason)


def test_a_name_listed_twice_is_refused_though_safetensors_keeps_the_last(tmp_path: Path) -> None:
    # JSON readers disagree on duplicates (serde keeps the last, others the first): one file could show
    # a scanner one tensor and a loader another. safetensors accepts it; we refuse it, naming the key.
    first = compact_json({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    second = compact_json({"dtype": "I32", "shape": [1], "data_offsets": [0, 4]})
    path = tmp_path / "dup.safetensors"
    path.write_bytes(raw_file(b'{"w":' + first + b',"w":' + second + b"}", bytes(4)))
    with safe_open(path, "pt") as oracle:
        assert list(oracle.keys()) == ["w"]  # the oracle silently picked one
    with pytest.raises(fastadapter.HeaderError, match=r"dup\.safetensors: .*key `w` appears twice"):
        _core.SafetensorsFile(path)


def test_every_case_through_load_is_a_header_error_naming_the_file(tmp_path: Path) -> None:
    from torch import nn

    for case, data in REFUSED.items():
        adapter = tmp_path / case
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 2, "target_modules": ["lin"]}'
        )
        (adapter / "adapter_model.safetensors").write_bytes(data)
        model = nn.Sequential()
        model.add_module("lin", nn.Linear(4, 4))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        named = re.escape(str(adapter / "adapter_model.safetensors"))
        with pytest.raises(fastadapter.HeaderError, match=named):
            fastadapter.load(model, adapter)
        after = model.state_dict()
        assert before.keys() == after.keys(), case
        assert all(before[k].equal(after[k]) for k in before), case


def test_many_tensors_and_long_names_open_in_bounded_time(tmp_path: Path) -> None:
    # 50,000 zero-size tensors with 200-byte names: a 12 MB header (the limit is 100 MB).
    n = 50_000
    header = {f"{'n' * 192}{i:08d}": entry("F32", [0], 0, 0) for i in range(n)}
    path = tmp_path / "many.safetensors"
    path.write_bytes(raw_file(compact_json(header)))
    start = time.perf_counter()
    f = _core.SafetensorsFile(path)
    assert len(f.entries()) == n
    assert time.perf_counter() - start < 10.0
