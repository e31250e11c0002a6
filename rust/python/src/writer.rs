//! Writing: `write_safetensors` stages a file from Python buffers (GIL released for planning and
//! writing), `stage_bytes` stages a small file, and `PendingFile.commit()` publishes either atomically.
//! Staging everything before committing anything lets the Python layer save several files and leave
//! the old set untouched if any of them fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::thread::JoinHandle;

use fastadapter_core::atomic::{
    stage_bytes as core_stage_bytes, stage_sized as core_stage_sized, PendingFile as CorePending,
};
use fastadapter_core::layout::{parse_dtype, plan, TensorMeta};
use fastadapter_core::writer::{
    write_safetensors_files as core_write_files, NewFile, TensorRef, WriteOptions,
};
use fastadapter_core::Error;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{detached, panic_error, to_py};

/// A staged file: written to a hidden temp file beside its target, published by `commit()`.
/// Dropping it (or `discard()`) removes the temp file.
#[pyclass(module = "fastadapter._core")]
pub struct PendingFile {
    inner: Option<CorePending>,
}

impl PendingFile {
    fn wrap(inner: CorePending) -> Self {
        Self { inner: Some(inner) }
    }

    fn live(&self) -> PyResult<&CorePending> {
        self.inner.as_ref().ok_or_else(|| {
            PyRuntimeError::new_err("this PendingFile was already committed or discarded")
        })
    }
}

#[pymethods]
impl PendingFile {
    #[getter]
    fn target(&self) -> PyResult<PathBuf> {
        Ok(self.live()?.target().to_path_buf())
    }

    #[getter]
    fn temp_path(&self) -> PyResult<PathBuf> {
        Ok(self.live()?.temp_path().to_path_buf())
    }

    /// Rename the temp file over the target (after fsync, if the file was staged with fsync=True).
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        self.live()?;
        let pending = self.inner.take().expect("checked live above");
        detached(py, || pending.commit())
    }

    /// Remove the temp file; the target is untouched. Idempotent.
    fn discard(&mut self) {
        self.inner = None;
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(p) => format!("PendingFile(target={:?})", p.target().display()),
            None => "PendingFile(<done>)".to_owned(),
        }
    }
}

/// A tensor as handed over by Python: (name, safetensors dtype, shape, C-contiguous buffer).
type PyTensor<'py> = (String, String, Vec<usize>, Bound<'py, PyAny>);

fn parse(name: &str, dtype: &str) -> PyResult<safetensors_dtype::Dtype> {
    parse_dtype(dtype).ok_or_else(|| {
        to_py(Error::tensor(
            name,
            format!("unknown safetensors dtype {dtype:?}"),
        ))
    })
}

mod safetensors_dtype {
    pub use fastadapter_core::Dtype;
}

/// Plan and write a safetensors file for `tensors` into a temp file beside `path`; returns the
/// `PendingFile` to commit. Buffers must be C-contiguous; their bytes are written as they are.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None, fsync=false))]
pub fn write_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<PyTensor<'_>>,
    metadata: Option<HashMap<String, String>>,
    fsync: bool,
) -> PyResult<PendingFile> {
    let mut staged = write_files(py, vec![(path, tensors, metadata)], fsync)?;
    Ok(staged.pop().expect("one file in, one out"))
}

/// `write_safetensors` for several files (path, tensors, metadata), written by several threads at once
/// (the shards of a model: separate files, no shared inode lock). Returns one `PendingFile` per file,
/// in order; if any file fails, none is staged.
#[pyfunction]
#[pyo3(signature = (files, fsync=false))]
pub fn write_safetensors_files(
    py: Python<'_>,
    files: Vec<PyFile<'_>>,
    fsync: bool,
) -> PyResult<Vec<PendingFile>> {
    write_files(py, files, fsync)
}

/// A file as handed over by Python: (path, tensors, metadata).
type PyFile<'py> = (PathBuf, Vec<PyTensor<'py>>, Option<HashMap<String, String>>);

/// A tensor's name, dtype and shape, checked; its bytes are in the matching buffer export.
type Spec = (String, safetensors_dtype::Dtype, Vec<usize>);

/// Export every tensor's buffer (C-contiguous) and parse its dtype. The exports pin the memory for as
/// long as they are held.
fn exports(tensors: Vec<PyTensor<'_>>) -> PyResult<(Vec<PyUntypedBuffer>, Vec<Spec>)> {
    let mut buffers = Vec::with_capacity(tensors.len());
    let mut specs = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, obj) in tensors {
        let buffer = PyUntypedBuffer::get(&obj)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "tensor `{name}`: buffer is not C-contiguous"
            )));
        }
        let dtype = parse(&name, &dtype)?;
        specs.push((name, dtype, shape));
        buffers.push(buffer);
    }
    Ok((buffers, specs))
}

/// The bytes at `ptr` (an exported buffer's address) as a slice.
///
/// # Safety
/// The export must be held, and the memory not written, for as long as the slice is used.
unsafe fn exported<'a>(ptr: usize, len: usize) -> &'a [u8] {
    match len {
        // An empty export may carry a null pointer, which a slice must never hold.
        0 => &[],
        // SAFETY: as the caller promises.
        len => unsafe { std::slice::from_raw_parts(ptr as *const u8, len) },
    }
}

fn write_files(py: Python<'_>, files: Vec<PyFile<'_>>, fsync: bool) -> PyResult<Vec<PendingFile>> {
    // Hold every buffer export until the writes are done: that is what keeps the memory valid while
    // the GIL is released.
    let mut buffers: Vec<Vec<PyUntypedBuffer>> = Vec::with_capacity(files.len());
    let mut specs = Vec::with_capacity(files.len());
    for (path, tensors, metadata) in files {
        let (held, named) = exports(tensors)?;
        specs.push((path, named, metadata));
        buffers.push(held);
    }
    let new_files: Vec<NewFile<'_>> = specs
        .into_iter()
        .zip(&buffers)
        .map(|((target, named, metadata), held)| NewFile {
            target,
            tensors: named
                .into_iter()
                .zip(held)
                .map(|((name, dtype, shape), buffer)| TensorRef {
                    name,
                    dtype,
                    shape,
                    // SAFETY: `buffers` holds the export until after the writes; it is only read.
                    data: unsafe { exported(buffer.buf_ptr() as usize, buffer.len_bytes()) },
                })
                .collect(),
            metadata,
        })
        .collect();
    let options = WriteOptions {
        fsync,
        ..WriteOptions::default()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let staged = detached(py, || core_write_files(&new_files, &options, threads))?;
    drop(new_files);
    drop(buffers);
    Ok(staged.into_iter().map(PendingFile::wrap).collect())
}

/// A safetensors file being written on a thread of its own (`start_write_safetensors`).
#[pyclass(module = "fastadapter._core")]
pub struct WriteJob {
    handle: Option<JoinHandle<Result<CorePending, Error>>>,
    // Released only once the thread has been joined (`wait`, or Drop: fields drop after it).
    buffers: Vec<PyUntypedBuffer>,
}

impl Drop for WriteJob {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join(); // a staged file is dropped with the result: its temp file goes
        }
    }
}

#[pymethods]
impl WriteJob {
    /// Block until the file is staged and return its `PendingFile`; raises the writer's error (an
    /// `OSError` naming the file, ...). Once only.
    fn wait(&mut self, py: Python<'_>) -> PyResult<PendingFile> {
        let handle = self
            .handle
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this WriteJob was already waited for"))?;
        let joined = py.detach(|| handle.join());
        self.buffers.clear(); // the thread is gone: the tensors' memory is free again
        match joined {
            Ok(Ok(pending)) => Ok(PendingFile::wrap(pending)),
            Ok(Err(e)) => Err(to_py(e)),
            Err(p) => Err(panic_error(&*p)),
        }
    }
}

/// `write_safetensors` on a new thread: the buffers are exported (and the arguments checked) here, then
/// the file is planned and written without the GIL while the caller goes on; `wait()` gives the
/// `PendingFile`. Dropping the job waits for the thread and discards the file.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None, fsync=false))]
pub fn start_write_safetensors(
    path: PathBuf,
    tensors: Vec<PyTensor<'_>>,
    metadata: Option<HashMap<String, String>>,
    fsync: bool,
) -> PyResult<WriteJob> {
    let (buffers, specs) = exports(tensors)?;
    let places: Vec<(usize, usize)> = buffers
        .iter()
        .map(|b| (b.buf_ptr() as usize, b.len_bytes()))
        .collect();
    let handle = std::thread::Builder::new()
        .name("fastadapter-write".into())
        .spawn(move || {
            let refs: Vec<TensorRef<'_>> = specs
                .into_iter()
                .zip(places)
                .map(|((name, dtype, shape), (ptr, len))| TensorRef {
                    name,
                    dtype,
                    shape,
                    // SAFETY: the job holds every export until this thread has been joined (wait()
                    // or Drop); the bytes are only read.
                    data: unsafe { exported(ptr, len) },
                })
                .collect();
            let options = WriteOptions {
                fsync,
                ..WriteOptions::default()
            };
            core_write_files(
                &[NewFile {
                    target: path,
                    tensors: refs,
                    metadata,
                }],
                &options,
                1,
            )
            .map(|mut staged| staged.pop().expect("one file in, one out"))
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a writer thread: {e}")))?;
    Ok(WriteJob {
        handle: Some(handle),
        buffers,
    })
}

/// Wait until the files replaced by earlier commits are freed and replaced checkpoint directories
/// deleted (both run on a background thread, see `fastadapter_core::release`). For benchmarks, callers
/// that need the space back now, and the interpreter's exit.
#[pyfunction]
pub fn wait_released(py: Python<'_>) {
    py.detach(fastadapter_core::release::wait_released);
}

/// Stage `data` (bytes, or any C-contiguous buffer, e.g. a range of a snapshot buffer) as the new
/// content of `path`: configs, model cards, files packed from device tensors.
#[pyfunction]
#[pyo3(signature = (path, data, fsync=false))]
pub fn stage_bytes(
    py: Python<'_>,
    path: PathBuf,
    data: &Bound<'_, PyAny>,
    fsync: bool,
) -> PyResult<PendingFile> {
    let buffer = PyUntypedBuffer::get(data)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("data must be a C-contiguous buffer"));
    }
    let (ptr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
    let pending = detached(py, || {
        let bytes: &[u8] = match len {
            0 => &[],
            // SAFETY: `buffer` (an export) pins the memory until this function returns.
            len => unsafe { std::slice::from_raw_parts(ptr as *const u8, len) },
        };
        core_stage_bytes(&path, bytes, fsync)
    })?;
    drop(buffer);
    Ok(PendingFile::wrap(pending))
}

/// Stage `path` as a new file at `temp_path` (the caller's name for it, created exclusively) that
/// holds `header` and is `length` bytes long; other processes write the rest (the ranks of a
/// distributed save, through `write_chunks`) before `commit()`.
#[pyfunction]
#[pyo3(signature = (path, temp_path, header, length, fsync=false))]
pub fn stage_sized(
    py: Python<'_>,
    path: PathBuf,
    temp_path: PathBuf,
    header: &Bound<'_, PyAny>,
    length: u64,
    fsync: bool,
) -> PyResult<PendingFile> {
    let buffer = PyUntypedBuffer::get(header)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "header must be a C-contiguous buffer",
        ));
    }
    let (ptr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
    let pending = detached(py, || {
        let head: &[u8] = match len {
            0 => &[],
            // SAFETY: `buffer` (an export) pins the memory until this function returns.
            len => unsafe { std::slice::from_raw_parts(ptr as *const u8, len) },
        };
        core_stage_sized(&path, &temp_path, head, length, fsync)
    })?;
    drop(buffer);
    Ok(PendingFile::wrap(pending))
}

/// The header bytes and per-tensor absolute offsets a file of these tensors would have, without
/// writing anything: (header, [offset per input tensor], total length). Used to pre-size buffers.
#[pyfunction]
#[pyo3(signature = (tensors, metadata=None))]
pub fn plan_header<'py>(
    py: Python<'py>,
    tensors: Vec<(String, String, Vec<usize>, usize)>,
    metadata: Option<HashMap<String, String>>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<u64>, u64)> {
    let metas = tensors
        .into_iter()
        .map(|(name, dtype, shape, nbytes)| {
            let dtype = parse(&name, &dtype)?;
            Ok(TensorMeta {
                name,
                dtype,
                shape,
                nbytes,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let layout = plan(&metas, metadata).map_err(to_py)?;
    Ok((
        PyBytes::new(py, &layout.header),
        layout.offsets,
        layout.total_len,
    ))
}
