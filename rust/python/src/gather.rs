//! `copy_ranges`: copy byte ranges of source buffers (a file's mapping, CPU tensors) into one destination
//! buffer (the pinned staging buffer of a device load), in parallel, with the GIL released.
//!
//! This is the only host-side copy a load to a GPU makes: the bytes must sit in page-locked memory for the
//! DMA engine, and reading them out of the page cache with one thread is far below the copy engine's
//! bandwidth. Every range is checked against its buffers before any byte moves, so a bad plan is a
//! `ValueError`, never an out-of-bounds write.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::errors::{finish, guarded};

/// Work unit: a large tensor is split so that it still spreads over every thread.
const PIECE: usize = 1 << 20;
/// Below this, handing work to other threads costs more than it saves.
const PARALLEL_MIN_BYTES: usize = 8 << 20;

/// (source index, source offset, destination offset, length), all in bytes.
type Range = (usize, usize, usize, usize);

fn check(dst_len: usize, src_lens: &[usize], ranges: &[Range]) -> Result<(), String> {
    let mut written: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (k, &(src, src_off, dst_off, len)) in ranges.iter().enumerate() {
        let Some(&src_len) = src_lens.get(src) else {
            return Err(format!(
                "range {k}: source {src} does not exist ({} sources)",
                src_lens.len()
            ));
        };
        if src_off.checked_add(len).is_none_or(|end| end > src_len) {
            return Err(format!(
                "range {k}: bytes {src_off}+{len} are outside source {src} ({src_len} bytes)"
            ));
        }
        if dst_off.checked_add(len).is_none_or(|end| end > dst_len) {
            return Err(format!(
                "range {k}: bytes {dst_off}+{len} are outside the destination ({dst_len} bytes)"
            ));
        }
        if len > 0 {
            written.push((dst_off, dst_off + len));
        }
    }
    // Disjoint destinations are what makes the parallel writes race-free.
    written.sort_unstable();
    if let Some(w) = written.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(format!(
            "destination ranges {:?} and {:?} overlap",
            w[0], w[1]
        ));
    }
    Ok(())
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// Copy `ranges` (source index, source offset, destination offset, length) from `sources` into `dst`.
/// `dst` must be a writable C-contiguous byte buffer, each source a C-contiguous byte buffer, no
/// destination ranges may overlap, and no source may share memory with `dst`. Returns the bytes copied.
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
    let spans: Vec<(usize, usize)> = sources
        .iter()
        .map(|s| (s.buf_ptr() as usize, s.len_bytes()))
        .collect();
    if let Some(i) = spans.iter().position(|&s| overlaps(s, dst_span)) {
        return Err(PyValueError::new_err(format!(
            "source {i} shares memory with the destination"
        )));
    }
    let lens: Vec<usize> = spans.iter().map(|s| s.1).collect();
    check(dst_span.1, &lens, &ranges).map_err(PyValueError::new_err)?;

    // Addresses as integers: raw pointers are not Send. Every job is in bounds and the destination
    // pieces are disjoint (checked above).
    let jobs: Vec<(usize, usize, usize)> = ranges
        .iter()
        .flat_map(|&(src, src_off, dst_off, len)| {
            let from = spans[src].0 + src_off;
            let to = dst_span.0 + dst_off;
            (0..len)
                .step_by(PIECE)
                .map(move |k| (from + k, to + k, PIECE.min(len - k)))
        })
        .collect();
    let total: usize = ranges.iter().map(|r| r.3).sum();
    let copy = |&(from, to, len): &(usize, usize, usize)| {
        // SAFETY: `check` proved both ranges lie inside their buffers, which `dst` and `sources` keep
        // exported (and so alive and unmoved) until this function returns; destination pieces are
        // disjoint from each other and from every source.
        unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) }
    };
    let outcome = py.detach(|| {
        guarded(|| {
            if total < PARALLEL_MIN_BYTES {
                jobs.iter().for_each(copy);
            } else {
                jobs.par_iter().for_each(copy);
            }
            Ok(total)
        })
    });
    finish(py, outcome)
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_disjoint_ranges_and_refuses_the_rest() {
        assert!(check(16, &[8], &[(0, 0, 0, 8), (0, 0, 8, 8)]).is_ok());
        assert!(check(16, &[8], &[(0, 0, 0, 8), (0, 0, 7, 8)])
            .unwrap_err()
            .contains("overlap"));
        assert!(check(16, &[8], &[(1, 0, 0, 1)])
            .unwrap_err()
            .contains("does not exist"));
        assert!(check(16, &[8], &[(0, 4, 0, 5)])
            .unwrap_err()
            .contains("outside source"));
        assert!(check(16, &[8], &[(0, 0, 12, 5)])
            .unwrap_err()
            .contains("outside the destination"));
        assert!(check(16, &[8], &[(0, usize::MAX, 0, 2)]).is_err());
        // Empty ranges anywhere inside the buffers are fine and never count as overlapping.
        assert!(check(16, &[8], &[(0, 0, 4, 0), (0, 0, 0, 8)]).is_ok());
    }
}
