//! The GLOBAL allowlist of `torch.load(weights_only=True)` (torch 2.15, `_get_allowed_globals` in
//! `torch/_weights_only_unpickler.py`), as symbols. A GLOBAL is only ever classified here, never
//! resolved: the unpickler interprets the few calls a state dict needs and refuses the rest.

use crate::torch_dtype::{self, TorchDtype};

/// Torch refuses these modules outright, with a message of its own; we say the same.
const BLOCKED_MODULES: &[&str] = &["sys", "os", "posix", "nt"];

const TENSOR_CLASSES: &[&str] = &[
    "DoubleTensor",
    "FloatTensor",
    "HalfTensor",
    "BFloat16Tensor",
    "LongTensor",
    "IntTensor",
    "ShortTensor",
    "CharTensor",
    "ByteTensor",
    "BoolTensor",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// `_rebuild_tensor(storage, offset, size, stride)`
    TensorV1,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
    TensorV2,
    /// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`
    TensorV3,
    /// `_rebuild_parameter(data, requires_grad, hooks)`
    Parameter,
    /// `_rebuild_parameter_with_state(data, requires_grad, hooks, state)`
    ParameterWithState,
    /// `torch._tensor._rebuild_from_type_v2(func, new_type, args, state)`
    FromType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict` / `collections.Counter`: called with no arguments, filled by SETITEMS.
    Dict,
    /// `torch.nn.parameter.Parameter`.
    Parameter,
    /// `torch.Tensor` and the legacy `torch.FloatTensor`-style classes: only usable as a type tag.
    TensorClass,
    /// `torch.Size`: a tuple.
    Size,
    /// A storage class in a persistent id; `None` is `torch.storage.UntypedStorage` (bytes).
    Storage(Option<TorchDtype>),
    /// `torch.float32` etc., the dtype argument of `_rebuild_tensor_v3`.
    Dtype(TorchDtype),
    Rebuild(Rebuild),
    /// Harmless value constructors (`torch.device`, `builtins.set`, `_codecs.encode`, ...): their result
    /// is kept as an opaque non-tensor value.
    Opaque,
    /// Allowed by torch, but builds tensors that have no safetensors form (quantized, sparse, meta, ...).
    Unsupported(&'static str),
}

/// Why a GLOBAL is refused, or what it stands for.
pub fn classify(module: &str, name: &str) -> Result<Global, String> {
    if BLOCKED_MODULES.contains(&module) {
        return Err(format!(
            "GLOBAL {module}.{name}: module `{module}` is blocked"
        ));
    }
    lookup(module, name).ok_or_else(|| {
        format!("GLOBAL {module}.{name}: not in torch.load(weights_only=True)'s allowlist")
    })
}

fn lookup(module: &str, name: &str) -> Option<Global> {
    use Global::*;
    Some(match (module, name) {
        ("collections", "OrderedDict" | "Counter") => Dict,
        ("torch.nn.parameter", "Parameter") => Parameter,
        ("torch", "Tensor") => TensorClass,
        ("torch", "Size") => Size,
        ("torch.storage", "UntypedStorage") => Storage(None),
        ("torch", "device")
        | ("torch.storage", "TypedStorage")
        | ("torch.serialization", "_get_layout")
        | ("_codecs", "encode")
        | ("builtins", "bytearray" | "set" | "complex")
        | (
            "torch",
            "per_tensor_affine"
            | "per_tensor_symmetric"
            | "per_channel_affine"
            | "per_channel_symmetric"
            | "per_channel_affine_float_qparams",
        ) => Opaque,
        ("torch._utils", "_rebuild_tensor") => Rebuild(self::Rebuild::TensorV1),
        ("torch._utils", "_rebuild_tensor_v2") => Rebuild(self::Rebuild::TensorV2),
        ("torch._utils", "_rebuild_tensor_v3") => Rebuild(self::Rebuild::TensorV3),
        ("torch._utils", "_rebuild_parameter") => Rebuild(self::Rebuild::Parameter),
        ("torch._utils", "_rebuild_parameter_with_state") => {
            Rebuild(self::Rebuild::ParameterWithState)
        }
        ("torch._tensor", "_rebuild_from_type_v2") => Rebuild(self::Rebuild::FromType),
        ("torch._utils", "_rebuild_qtensor") => Unsupported("quantized tensors"),
        ("torch._utils", "_rebuild_sparse_tensor") => Unsupported("sparse tensors"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage") => {
            Unsupported("meta tensors (no data)")
        }
        ("torch._utils", "_rebuild_wrapper_subclass") => Unsupported("tensor wrapper subclasses"),
        (
            "torch._utils",
            "_rebuild_device_tensor_from_numpy" | "_rebuild_device_tensor_from_cpu_tensor",
        ) => Unsupported("device tensors rebuilt from host copies"),
        ("torch", n) => torch_dtype::from_name(n)
            .map(Dtype)
            .or_else(|| torch_dtype::from_storage_class(n, false).map(|t| Storage(Some(t))))
            .or_else(|| TENSOR_CLASSES.contains(&n).then_some(TensorClass))?,
        ("torch.cuda", n) => torch_dtype::from_storage_class(n, true)
            .map(|t| Storage(Some(t)))
            .or_else(|| TENSOR_CLASSES.contains(&n).then_some(TensorClass))?,
        ("torch.sparse" | "torch.cuda.sparse", n)
            if n != "BoolTensor" && TENSOR_CLASSES.contains(&n) =>
        {
            Unsupported("sparse tensors")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_globals_are_refused() {
        for (m, n) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("builtins", "exec"),
            ("builtins", "getattr"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch", "save"),
            ("torch._utils", "_rebuild_nothing"),
            ("torch.cuda", "QInt8Storage"),
        ] {
            let err = classify(m, n).unwrap_err();
            assert!(err.contains(&format!("{m}.{n}")), "{err}");
        }
        assert!(classify("os", "path").unwrap_err().contains("blocked"));
    }

    #[test]
    fn state_dict_globals_are_allowed() {
        assert_eq!(classify("collections", "OrderedDict"), Ok(Global::Dict));
        assert_eq!(
            classify("torch._utils", "_rebuild_tensor_v2"),
            Ok(Global::Rebuild(Rebuild::TensorV2))
        );
        assert!(
            matches!(classify("torch", "BFloat16Storage"), Ok(Global::Storage(Some(t))) if t.name == "bfloat16")
        );
        assert!(matches!(
            classify("torch", "float8_e5m2"),
            Ok(Global::Dtype(_))
        ));
        assert_eq!(
            classify("torch.storage", "UntypedStorage"),
            Ok(Global::Storage(None))
        );
        assert_eq!(
            classify("torch.cuda", "HalfTensor"),
            Ok(Global::TensorClass)
        );
    }
}
