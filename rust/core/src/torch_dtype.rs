//! Torch dtypes as they appear in a pickle: `torch.<dtype>` globals (read by `_rebuild_tensor_v3`) and
//! legacy typed-storage classes (`torch.FloatStorage`, ...). The tables list every name that
//! `torch.load(weights_only=True)` accepts, so a checkpoint torch can read is never refused here for a
//! dtype name; whether the dtype can be stored in safetensors is decided later, per tensor.

use safetensors::Dtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TorchDtype {
    /// Torch's name without the `torch.` prefix, e.g. `float32`.
    pub name: &'static str,
    /// Bytes per element (0 for sub-byte dtypes, which cannot be converted anyway).
    pub itemsize: usize,
    /// The safetensors dtype with the same bytes, if there is one.
    pub safetensors: Option<Dtype>,
}

const fn d(name: &'static str, itemsize: usize, st: Option<Dtype>) -> TorchDtype {
    TorchDtype {
        name,
        itemsize,
        safetensors: st,
    }
}

/// Every `torch.<dtype>` global in torch 2.15's weights_only allowlist.
const DTYPES: &[TorchDtype] = &[
    d("float64", 8, Some(Dtype::F64)),
    d("float32", 4, Some(Dtype::F32)),
    d("float16", 2, Some(Dtype::F16)),
    d("bfloat16", 2, Some(Dtype::BF16)),
    d("int64", 8, Some(Dtype::I64)),
    d("int32", 4, Some(Dtype::I32)),
    d("int16", 2, Some(Dtype::I16)),
    d("int8", 1, Some(Dtype::I8)),
    d("uint8", 1, Some(Dtype::U8)),
    d("bool", 1, Some(Dtype::BOOL)),
    d("float8_e4m3fn", 1, Some(Dtype::F8_E4M3)),
    d("float8_e5m2", 1, Some(Dtype::F8_E5M2)),
    d("uint16", 2, Some(Dtype::U16)),
    d("uint32", 4, Some(Dtype::U32)),
    d("uint64", 8, Some(Dtype::U64)),
    d("complex64", 8, Some(Dtype::C64)),
    d("complex128", 16, None),
    d("complex32", 4, None),
    d("bcomplex32", 4, None),
    d("float8_e4m3fnuz", 1, Some(Dtype::F8_E4M3FNUZ)),
    d("float8_e5m2fnuz", 1, Some(Dtype::F8_E5M2FNUZ)),
    d("float8_e8m0fnu", 1, Some(Dtype::F8_E8M0)),
    d("float4_e2m1fn_x2", 1, None),
    d("bits8", 1, None),
    d("bits16", 2, None),
    d("bits1x8", 1, None),
    d("bits2x4", 1, None),
    d("bits4x2", 1, None),
    d("qint8", 1, None),
    d("qint32", 4, None),
    d("quint8", 1, None),
    d("quint4x2", 1, None),
    d("quint2x4", 1, None),
    d("uint1", 0, None),
    d("uint2", 0, None),
    d("uint3", 0, None),
    d("uint4", 0, None),
    d("uint5", 0, None),
    d("uint6", 0, None),
    d("uint7", 0, None),
    d("int1", 0, None),
    d("int2", 0, None),
    d("int3", 0, None),
    d("int4", 0, None),
    d("int5", 0, None),
    d("int6", 0, None),
    d("int7", 0, None),
];

/// Legacy typed storage classes (`torch.<X>Storage`, also under `torch.cuda`) and their dtype.
const STORAGES: &[(&str, &str)] = &[
    ("DoubleStorage", "float64"),
    ("FloatStorage", "float32"),
    ("HalfStorage", "float16"),
    ("BFloat16Storage", "bfloat16"),
    ("LongStorage", "int64"),
    ("IntStorage", "int32"),
    ("ShortStorage", "int16"),
    ("CharStorage", "int8"),
    ("ByteStorage", "uint8"),
    ("BoolStorage", "bool"),
    ("ComplexDoubleStorage", "complex128"),
    ("ComplexFloatStorage", "complex64"),
    ("QInt8Storage", "qint8"),
    ("QInt32Storage", "qint32"),
    ("QUInt8Storage", "quint8"),
    ("QUInt4x2Storage", "quint4x2"),
    ("QUInt2x4Storage", "quint2x4"),
];

/// `torch.float32` -> float32.
pub fn from_name(name: &str) -> Option<TorchDtype> {
    DTYPES.iter().copied().find(|t| t.name == name)
}

/// `FloatStorage` -> float32. CUDA storage classes are only allowed for the dtypes torch has CUDA
/// storage classes for (no quantized ones).
pub fn from_storage_class(name: &str, cuda: bool) -> Option<TorchDtype> {
    if cuda && name.starts_with('Q') {
        return None;
    }
    STORAGES
        .iter()
        .find(|(class, _)| *class == name)
        .and_then(|(_, dtype)| from_name(dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_classes_resolve() {
        for (class, dtype) in STORAGES {
            assert_eq!(from_storage_class(class, false).unwrap().name, *dtype);
        }
        assert!(from_storage_class("QInt8Storage", true).is_none());
        assert_eq!(
            from_storage_class("BFloat16Storage", true)
                .unwrap()
                .safetensors,
            Some(Dtype::BF16)
        );
    }

    #[test]
    fn itemsize_matches_safetensors() {
        for t in DTYPES {
            if let Some(st) = t.safetensors {
                assert_eq!(st.bitsize(), t.itemsize * 8, "{}", t.name);
            }
        }
    }
}
