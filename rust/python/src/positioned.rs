//! The distributed checkpoint plugin's I/O: `write_chunks` writes a rank's chunks of tensors (and, on
//! the coordinator, the headers) straight to their offsets in files every rank writes at once, with
//! the GIL released; `publish_dir` renames the finished checkpoint directory into place; `read_chunks`
//! reads blocks of stored tensors straight into the caller's tensors.

use std::path::PathBuf;

use fastadapter_core::positioned::{
    publish_dir as core_publish, read_chunks as core_read, write_files, Chunk, FileWrites,
    ReadChunk,
};
use pyo3::buffer::{PyBuffer, PyUntypedBuffer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::detached;

/// (tensor name, C-contiguous buffer of the chunk, absolute file offset of the whole tensor,
/// item size, whole shape, chunk offsets, chunk sizes).
type PyChunk<'py> = (
    String,
    Bound<'py, PyAny>,
    u64,
    usize,
    Vec<usize>,
    Vec<usize>,
    Vec<usize>,
);

fn contiguous(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<PyUntypedBuffer> {
    let buffer = PyUntypedBuffer::get(obj)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "`{name}`: buffer is not C-contiguous"
        )));
    }
    Ok(buffer)
}

fn bytes_of(b: &PyUntypedBuffer) -> &[u8] {
    match b.len_bytes() {
        // An empty export may carry a null pointer, which a slice must never hold.
        0 => &[],
        // SAFETY: the export `b` pins the memory for as long as the returned borrow of `b` lives.
        len => unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, len) },
    }
}

/// Write `files`, each `(path, header or None, [chunk, ...])`, opened without truncation (other
/// processes write the rest of them); files in parallel. A chunk outside its tensor, or whose buffer
/// does not hold exactly its bytes, is a `TensorError` raised before anything is written. Returns the
/// bytes written.
#[pyfunction]
#[pyo3(signature = (files, fsync=false))]
pub fn write_chunks(
    py: Python<'_>,
    files: Vec<(PathBuf, Option<Bound<'_, PyAny>>, Vec<PyChunk<'_>>)>,
    fsync: bool,
) -> PyResult<u64> {
    // Every buffer export is held until the write is done: that keeps the memory valid while the GIL
    // is released.
    let mut exported = Vec::with_capacity(files.len());
    for (path, header, chunks) in files {
        let header = header
            .map(|h| contiguous(&path.to_string_lossy(), &h))
            .transpose()?;
        let mut held = Vec::with_capacity(chunks.len());
        for (name, obj, tensor_offset, itemsize, shape, offsets, sizes) in chunks {
            let buffer = contiguous(&name, &obj)?;
            held.push((name, buffer, tensor_offset, itemsize, shape, offsets, sizes));
        }
        exported.push((path, header, held));
    }
    let plan: Vec<FileWrites<'_>> = exported
        .iter()
        .map(|(path, header, held)| FileWrites {
            path,
            header: header.as_ref().map(bytes_of),
            chunks: held
                .iter()
                .map(
                    |(name, buffer, tensor_offset, itemsize, shape, offsets, sizes)| Chunk {
                        name,
                        data: bytes_of(buffer),
                        tensor_offset: *tensor_offset,
                        itemsize: *itemsize,
                        shape,
                        offsets,
                        sizes,
                    },
                )
                .collect(),
        })
        .collect();
    detached(py, || write_files(&plan, fsync))
}

/// Rename the finished checkpoint directory `staging` to `target`, atomically replacing a previous
/// one; with `fsync`, the files and directories are flushed around the rename.
#[pyfunction]
#[pyo3(signature = (staging, target, fsync=false))]
pub fn publish_dir(
    py: Python<'_>,
    staging: PathBuf,
    target: PathBuf,
    fsync: bool,
) -> PyResult<PathBuf> {
    detached(py, || core_publish(&staging, &target, fsync))
}

/// (tensor name, writable C-contiguous byte buffer, absolute file offset of the stored tensor, item
/// size, stored shape, block offsets, block sizes).
type PyReadChunk = (
    String,
    PyBuffer<u8>,
    u64,
    usize,
    Vec<usize>,
    Vec<usize>,
    Vec<usize>,
);

/// Read each block of `path` into its buffer with positional reads (GIL released): a block outside
/// its tensor, or a buffer not exactly its size, is a `TensorError` before anything is read; buffers
/// must be writable, C-contiguous and not overlap. Returns the bytes read.
/// `replace_pages`: discard the destinations' whole pages first (see the core's `read_chunks`): for
/// destinations that are views of a private file mapping.
#[pyfunction]
#[pyo3(signature = (path, chunks, replace_pages=false))]
pub fn read_chunks(
    py: Python<'_>,
    path: PathBuf,
    chunks: Vec<PyReadChunk>,
    replace_pages: bool,
) -> PyResult<u64> {
    ChunkReads::new(chunks)?.read(py, path, replace_pages)
}

/// The blocks of [`read_chunks`], checked and held once, for a caller that reads files laid out alike
/// into the same buffers again and again (a hotswap plan): taking 128 chunk tuples apart cost about as
/// much as reading their 8 MiB from the page cache. Holds each buffer's export, so the memory stays
/// valid while it lives.
#[pyclass(module = "fastadapter._core", frozen)]
pub struct ChunkReads {
    chunks: Vec<PyReadChunk>,
    // Held while reading: two reads into the same buffers at once (the GIL is released) would hand out
    // two `&mut` slices of one memory.
    reading: std::sync::Mutex<()>,
}

#[pymethods]
impl ChunkReads {
    #[new]
    fn new(chunks: Vec<PyReadChunk>) -> PyResult<Self> {
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(chunks.len());
        for (name, buffer, ..) in &chunks {
            if buffer.readonly() || !buffer.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "`{name}`: the destination must be a writable C-contiguous buffer"
                )));
            }
            spans.push((buffer.buf_ptr() as usize, buffer.len_bytes()));
        }
        // Two `&mut` slices of one memory would be undefined behaviour: refuse overlapping destinations.
        spans.retain(|s| s.1 > 0);
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(PyValueError::new_err("destination buffers overlap"));
        }
        Ok(Self {
            chunks,
            reading: std::sync::Mutex::new(()),
        })
    }

    /// Read every block from `path` (see [`read_chunks`]); reads of one object from several threads
    /// take turns.
    #[pyo3(signature = (path, replace_pages=false))]
    fn read(&self, py: Python<'_>, path: PathBuf, replace_pages: bool) -> PyResult<u64> {
        detached(py, || {
            let _turn = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            let mut plan: Vec<ReadChunk<'_>> = self
                .chunks
                .iter()
                .map(
                    |(name, buffer, tensor_offset, itemsize, shape, offsets, sizes)| ReadChunk {
                        name,
                        data: match buffer.len_bytes() {
                            // An empty export may carry a null pointer, which a slice must never hold.
                            0 => &mut [],
                            // SAFETY: each export is held by `self` (the memory stays valid), is
                            // writable, and no two of them overlap (checked in `new`).
                            len => unsafe {
                                std::slice::from_raw_parts_mut(buffer.buf_ptr() as *mut u8, len)
                            },
                        },
                        tensor_offset: *tensor_offset,
                        itemsize: *itemsize,
                        shape,
                        offsets,
                        sizes,
                    },
                )
                .collect();
            core_read(&path, &mut plan, replace_pages)
        })
    }

    fn __len__(&self) -> usize {
        self.chunks.len()
    }
}
