//! Core errors to Python exceptions.
//!
//! I/O failures become the built-in `OSError` subclass for their errno (FileNotFoundError,
//! PermissionError, ...) with `filename` set; format and tensor errors become the classes of
//! `fastadapter.errors`, which subclass both `FastAdapterError` and the built-in that fits.

use std::panic::{catch_unwind, AssertUnwindSafe};

use fastadapter_core::Error;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

fn fastadapter_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let made = py
        .import("fastadapter.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        // Only if the Python package is broken: still raise something that says what went wrong.
        Err(_) => pyo3::exceptions::PyValueError::new_err(message),
    }
}

pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    match err {
        Error::Io { path, source } => {
            let filename = path.to_string_lossy().into_owned();
            match source.raw_os_error() {
                // OSError(errno, strerror, filename) picks the matching subclass itself.
                Some(errno) => {
                    let strerror = std::io::Error::from_raw_os_error(errno).to_string();
                    let strerror = strerror
                        .rsplit_once(" (os error")
                        .map_or(strerror.as_str(), |(s, _)| s)
                        .to_owned();
                    PyOSError::new_err((errno, strerror, filename))
                }
                None => PyOSError::new_err(format!("{filename}: {source}")),
            }
        }
        e @ (Error::Format { .. } | Error::Header { .. }) => {
            fastadapter_error(py, "HeaderError", e.to_string())
        }
        e @ (Error::Tensor { .. } | Error::DuplicateName(_)) => {
            fastadapter_error(py, "TensorError", e.to_string())
        }
        e @ Error::Pattern { .. } => fastadapter_error(py, "KeyPatternError", e.to_string()),
        e @ Error::UnsafePickle { .. } => {
            fastadapter_error(py, "UnsafeCheckpointError", e.to_string())
        }
        e @ (Error::TorchZip { .. }
        | Error::TorchZipEntry { .. }
        | Error::LegacyTorchFormat { .. }
        | Error::BigEndian { .. }
        | Error::Pickle { .. }) => fastadapter_error(py, "CheckpointError", e.to_string()),
    }
}

/// Run `f` (typically with the GIL released) and turn a panic into a `FastAdapterError` instead of
/// pyo3's `PanicException`, which derives from `BaseException` and escapes `except Exception`.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<Result<T, Error>, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned())
    })
}

/// Collapse the result of [`guarded`] into a `PyResult`.
pub fn finish<T>(py: Python<'_>, outcome: Result<Result<T, Error>, String>) -> PyResult<T> {
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(panic) => Err(fastadapter_error(
            py,
            "FastAdapterError",
            format!("internal error in fastadapter's Rust core (please report): {panic}"),
        )),
    }
}
