//! `copy_ranges`: copy byte ranges of source buffers (a file's mapping, CPU tensors) into one destination
//! buffer, in parallel, with the GIL released: the pinned staging buffer of a device load, or a
//! checkpoint snapshot. The copying (and the destination checks) is the core's `snapshot::gather`;
//! this layer turns buffers into slices and refuses what only raw pointers can show (a source
//! aliasing the destination). A bad plan is a `ValueError`, never an out-of-bounds write.

use fastadapter_core::snapshot::{gather, Piece};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::detached;

/// (source index, source offset, destination offset, length), all in bytes.
type Range = (usize, usize, usize, usize);

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn bytes_of(b: &PyBuffer<u8>) -> &[u8] {
    match b.len_bytes() {
        // An empty export may carry a null pointer, which a slice must never hold.
        0 => &[],
        // SAFETY: the export `b` pins the memory for as long as the returned borrow of `b` lives.
        len => unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, len) },
    }
}

/// Copy `ranges` (source index, source offset, destination offset, length) from `sources` into `dst`.
/// `dst` must be a writable C-contiguous byte buffer, each source a C-contiguous byte buffer, no
/// destination ranges may overlap, and no source may share memory with `dst`. Everything is checked
/// before any byte moves (ValueError). Returns the bytes copied.
#[pyfunction]
pub fn copy_ranges(
    py: Python<'_>,
    dst: PyBuffer<u8>,
    sources: Vec<PyBuffer<u8>>,
    ranges: Vec<Range>,
) -> PyResult<usize> {
    if dst.readonly() {
        return Err(PyValueError::new_err("the destination buffer is read-only"));
    }
    if !dst.is_c_contiguous() || sources.iter().any(|s| !s.is_c_contiguous()) {
        return Err(PyValueError::new_err("buffers must be C-contiguous"));
    }
    let dst_span = (dst.buf_ptr() as usize, dst.len_bytes());
    // A source aliasing the destination would make the `&mut` below overlap a `&`: refuse it here,
    // where the raw pointers are.
    if let Some(i) = sources
        .iter()
        .position(|s| overlaps((s.buf_ptr() as usize, s.len_bytes()), dst_span))
    {
        return Err(PyValueError::new_err(format!(
            "source {i} shares memory with the destination"
        )));
    }
    let names: Vec<String> = (0..ranges.len()).map(|k| format!("range {k}")).collect();
    let mut pieces = Vec::with_capacity(ranges.len());
    for (k, &(src, src_off, dst_off, len)) in ranges.iter().enumerate() {
        let Some(source) = sources.get(src) else {
            return Err(PyValueError::new_err(format!(
                "range {k}: source {src} does not exist ({} sources)",
                sources.len()
            )));
        };
        let whole = bytes_of(source);
        let Some(data) = src_off
            .checked_add(len)
            .and_then(|end| whole.get(src_off..end))
        else {
            return Err(PyValueError::new_err(format!(
                "range {k}: bytes {src_off}+{len} are outside source {src} ({} bytes)",
                whole.len()
            )));
        };
        pieces.push(Piece {
            name: &names[k],
            offset: dst_off,
            data,
        });
    }
    let total: usize = pieces.iter().map(|p| p.data.len()).sum();
    detached(py, || {
        let dest: &mut [u8] = match dst_span.1 {
            0 => &mut [],
            // SAFETY: `dst` is a writable export held until this function returns, and no source
            // shares memory with it (checked above).
            len => unsafe { std::slice::from_raw_parts_mut(dst_span.0 as *mut u8, len) },
        };
        gather(dest, &pieces).map(|()| total)
    })
}
