"""torch dtypes <-> safetensors dtype names (the strings the Rust core and the file header use)."""

from __future__ import annotations

import torch

_PAIRS: list[tuple[str, str]] = [
    ("float64", "F64"),
    ("float32", "F32"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int64", "I64"),
    ("int32", "I32"),
    ("int16", "I16"),
    ("int8", "I8"),
    ("uint64", "U64"),
    ("uint32", "U32"),
    ("uint16", "U16"),
    ("uint8", "U8"),
    ("bool", "BOOL"),
    ("complex64", "C64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
]

# Built from names so that dtypes an older torch lacks are simply absent.
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    getattr(torch, t): s for t, s in _PAIRS if isinstance(getattr(torch, t, None), torch.dtype)
}
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {s: t for t, s in TORCH_TO_SAFETENSORS.items()}
