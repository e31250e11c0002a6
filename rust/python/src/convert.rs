//! `.bin` checkpoints: conversion to safetensors and header-only inspection, with the GIL released.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fastadapter_core::convert::{convert_file as core_convert, inspect_torch as core_inspect};
use fastadapter_core::ConvertOptions;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::detached;

/// A byte counter the Rust writer increments as it writes; read `.value` from any thread.
#[pyclass(module = "fastadapter._core", frozen)]
#[derive(Default)]
pub struct Progress {
    bytes: Arc<AtomicU64>,
}

#[pymethods]
impl Progress {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    #[getter]
    fn value(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Convert the torch.save checkpoint `src` into the safetensors file `dst` (written atomically, and
/// verified before it is published when `verify`). Returns a report: tensors, bytes, aliases_copied,
/// gathered, skipped [(name, kind)].
#[pyfunction]
#[pyo3(signature = (src, dst, verify=true, check_crc=true, fsync=false, progress=None))]
pub fn convert_file<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    verify: bool,
    check_crc: bool,
    fsync: bool,
    progress: Option<&Progress>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = ConvertOptions {
        verify,
        check_crc,
        fsync,
        progress: progress.map(|p| p.bytes.clone()),
        ..ConvertOptions::default()
    };
    let report = detached(py, || core_convert(&src, &dst, &options))?;
    let out = PyDict::new(py);
    out.set_item("tensors", report.tensors)?;
    out.set_item("bytes", report.bytes)?;
    out.set_item("aliases_copied", report.aliases_copied)?;
    out.set_item("gathered", report.gathered)?;
    let skipped: Vec<(String, &str)> = report
        .skipped
        .into_iter()
        .map(|s| (s.name, s.kind))
        .collect();
    out.set_item("skipped", skipped)?;
    Ok(out)
}

/// The tensors of a torch.save checkpoint as (name, torch dtype, shape, nbytes, safetensors dtype or
/// None), read from the pickle alone (no storage bytes).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn inspect_torch(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<Vec<(String, String, Vec<usize>, usize, Option<String>)>> {
    let infos = detached(py, || core_inspect(&path))?;
    Ok(infos
        .into_iter()
        .map(|t| {
            (
                t.name,
                t.dtype.name.to_owned(),
                t.shape,
                t.nbytes,
                t.dtype.safetensors.map(|d| format!("{d:?}")),
            )
        })
        .collect())
}
