"""Regenerate the committed seed corpus: `.venv/bin/python rust/fuzz/make_seeds.py`.

torch_zip: small torch.save fixtures of rust/core/tests (normal and hostile, each under 8 KiB).
pickle: the `data.pkl` of each of those that is a zip archive.
safetensors_header: small files written by the `safetensors` package itself, plus a few malformed ones.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "core" / "tests" / "fixtures"
SEEDS = HERE / "seeds"
MAX_SEED = 8 << 10


def torch_zip_seeds() -> None:
    out = SEEDS / "torch_zip"
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(FIXTURES.glob("*.bin")) + sorted(FIXTURES.glob("hostile/*.bin")):
        if src.stat().st_size <= MAX_SEED:
            prefix = "hostile_" if src.parent.name == "hostile" else ""
            shutil.copyfile(src, out / f"{prefix}{src.name}")


def pickle_seeds() -> None:
    out = SEEDS / "pickle"
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted((SEEDS / "torch_zip").iterdir()):
        if not zipfile.is_zipfile(src):
            continue
        try:
            with zipfile.ZipFile(src) as z:
                pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
                if pkl:
                    (out / f"{src.stem}.pkl").write_bytes(z.read(pkl[0]))
        except (zipfile.BadZipFile, UnicodeDecodeError):
            continue  # a hostile container Python's zipfile cannot read either


def raw(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    n = len(header) if declared is None else declared
    return struct.pack("<Q", n) + header + data


def safetensors_seeds() -> None:
    out = SEEDS / "safetensors_header"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "two_f32_meta": save(
            {"a": rng.random((2, 3), dtype=np.float32), "b.weight": np.arange(4, dtype=np.float32)},
            metadata={"format": "pt"},
        ),
        "mixed_dtypes": save(
            {
                "i8": np.arange(3, dtype=np.int8),
                "f16": np.ones((2, 2), dtype=np.float16),
                "u64": np.arange(2, dtype=np.uint64),
                "b": np.array([True, False]),
                "scalar": np.array(1.5, dtype=np.float64),
                "empty": np.zeros((0, 4), dtype=np.float32),
            }
        ),
        "no_tensors": save({}),
        "unicode_names": save(
            {"é/ü.层": np.ones(1, dtype=np.float32), "a" * 200: np.ones(1, dtype=np.int32)}
        ),
        "gap": raw(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}',
            bytes(12),
        ),
        "shape_overflow": raw(
            b'{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,8]}}', bytes(8)
        ),
        "header_beyond_file": raw(b"{}", declared=1000),
        "dup_key": raw(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            bytes(4),
        ),
    }
    for name, data in files.items():
        (out / f"{name}.safetensors").write_bytes(data)


if __name__ == "__main__":
    torch_zip_seeds()
    pickle_seeds()
    safetensors_seeds()
