//! Core errors to Python exceptions.
//!
//! I/O failures become the built-in `OSError` subclass for their errno (FileNotFoundError,
//! PermissionError, ...) with `filename` set; format and tensor errors become the classes of
//! `fastadapter.errors`, which subclass both `FastAdapterError` and the built-in that fits.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fastadapter_core::Error;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

// The classes of python/fastadapter/errors.py this layer raises, bound by name at compile time: a
// misspelt class is a build error here, not a silent fallback at run time.
pyo3::import_exception!(fastadapter.errors, FastAdapterError);
pyo3::import_exception!(fastadapter.errors, HeaderError);
pyo3::import_exception!(fastadapter.errors, TensorError);
pyo3::import_exception!(fastadapter.errors, KeyPatternError);
pyo3::import_exception!(fastadapter.errors, CheckpointError);
pyo3::import_exception!(fastadapter.errors, UnsafeCheckpointError);

pub fn to_py(err: Error) -> PyErr {
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
        e @ (Error::Format { .. } | Error::Header { .. }) => HeaderError::new_err(e.to_string()),
        e @ (Error::Tensor { .. } | Error::DuplicateName(_)) => TensorError::new_err(e.to_string()),
        e @ Error::Pattern { .. } => KeyPatternError::new_err(e.to_string()),
        e @ Error::UnsafePickle { .. } => UnsafeCheckpointError::new_err(e.to_string()),
        e @ (Error::TorchZip { .. }
        | Error::TorchZipEntry { .. }
        | Error::LegacyTorchFormat { .. }
        | Error::BigEndian { .. }
        | Error::Pickle { .. }) => CheckpointError::new_err(e.to_string()),
    }
}

/// A panic in the Rust core as a `FastAdapterError`, instead of pyo3's `PanicException`, which
/// derives from `BaseException` and escapes `except Exception`.
pub fn panic_error(payload: &(dyn Any + Send)) -> PyErr {
    let panic = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    FastAdapterError::new_err(format!(
        "internal error in fastadapter's Rust core (please report): {panic}"
    ))
}

/// Run `f` with the GIL released; its error becomes the Python exception of [`to_py`] and a panic
/// in it the `FastAdapterError` of [`panic_error`].
pub fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(outcome) => outcome.map_err(to_py),
        Err(payload) => Err(panic_error(&*payload)),
    }
}
