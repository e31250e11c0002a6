//! `SafetensorsFile`: a validated, privately mapped file exported to Python as a writable buffer, so
//! `torch.frombuffer(f, dtype=torch.uint8)` gives one tensor over the whole mapping and every adapter
//! weight can be a view of it (no copy; writes stay private to the process).

use std::collections::HashMap;
use std::ffi::c_int;
use std::os::raw::c_void;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;

use fastadapter_core::prefetch::{Prefetch, COLD_THREADS};
use fastadapter_core::reader::{map_file_onto, SafetensorsFile as CoreFile, TensorEntry};
use fastadapter_core::select::KeySelector;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{detached, panic_error, to_py};

/// (name, dtype, shape, start, end): offsets are absolute byte positions in the file.
type Record = (String, String, Vec<usize>, usize, usize);

fn record(name: String, e: &TensorEntry) -> Record {
    (
        name,
        format!("{:?}", e.dtype),
        e.shape.clone(),
        e.start,
        e.end,
    )
}

#[pyclass(module = "fastadapter._core", frozen, weakref)]
pub struct SafetensorsFile {
    // Shared with the prefetch thread, which keeps the mapping alive until it is done even if this
    // object goes first.
    inner: Arc<CoreFile>,
    // Base address and length of the private mapping, taken once at open time so that exporting the
    // buffer needs no mutable borrow of `inner`.
    base: usize,
    len: isize,
    prefetch: Mutex<Option<Running>>,
}

struct Running {
    state: Arc<Prefetch>,
    thread: JoinHandle<fastadapter_core::Result<()>>,
}

impl SafetensorsFile {
    /// End this file's prefetch after the piece in progress, even one reading from disk, and wait for
    /// its thread; its error is not raised (the caller reads the same pages itself and meets it there).
    fn abandon_prefetch(&self, py: Python<'_>) {
        let running = self
            .prefetch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(Running { state, thread }) = running {
            state.abandon.store(true, Ordering::Relaxed);
            let _ = py.detach(|| thread.join());
        }
    }
}

impl Drop for SafetensorsFile {
    /// A prefetch still running for a file nobody holds any more (e.g. a load that failed) is told to
    /// stop, even one reading from disk; its thread keeps the mapping until it has, and is not waited
    /// for here.
    fn drop(&mut self) {
        let prefetch = self
            .prefetch
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = prefetch {
            p.state.abandon.store(true, Ordering::Relaxed);
        }
    }
}

#[pymethods]
impl SafetensorsFile {
    #[new]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let mut inner = detached(py, || CoreFile::open(&path))?;
        let (base, len) = inner.raw_parts();
        Ok(Self {
            inner: Arc::new(inner),
            base: base as usize,
            len: len as isize,
            prefetch: Mutex::new(None),
        })
    }

    /// Start bringing the file's pages in on a background thread (`prefetch` in the core: one thread
    /// mapping them in while they are all in the page cache; 2 reading at once when some are not), so
    /// that the caller's own work overlaps it; `stop_prefetch` ends it. Pages it does not reach
    /// are faulted in on first use as usual. Does nothing while one runs. `only_cold`: nothing at all
    /// when every page is in the page cache (for callers that `pread` the bytes instead of mapping them),
    /// asked of the kernel here, so that a warm file costs no thread.
    /// Returns whether the file was found cold (a sampled page not in memory: one `mincore` per 4 MiB),
    /// asked of the kernel before the thread starts; a failed check is left to the thread to report.
    #[pyo3(signature = (only_cold=false))]
    fn prefetch(&self, only_cold: bool) -> bool {
        let mut slot = self.prefetch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slot.as_ref() {
            return running.state.is_cold();
        }
        if only_cold && self.inner.all_resident().unwrap_or(false) {
            return false;
        }
        let file = Arc::clone(&self.inner);
        let state = Arc::new(if only_cold {
            Prefetch::only_cold()
        } else {
            Prefetch::new()
        });
        let cold = file.sample_cold(&state).unwrap_or(false);
        let shared = Arc::clone(&state);
        *slot = std::thread::Builder::new()
            .name("fastadapter-prefetch".into())
            .spawn(move || file.prefetch(COLD_THREADS, &shared))
            .ok()
            .map(|thread| Running { state, thread });
        cold
    }

    /// End a prefetch started by `prefetch` and wait for its thread; returns at once if none runs.
    /// While the pages are in the page cache it stops after the 4 MiB piece in progress (`wait=True`:
    /// once the whole file is mapped in); once it is reading from disk it always finishes, since the
    /// caller is about to use those pages and faulting them in one by one is the slowest way to read
    /// them. Returns whether it read from disk. An error of the prefetch (the file shrank under the
    /// mapping, a disk error) is raised here as `OSError` naming the file.
    #[pyo3(signature = (wait=false))]
    fn stop_prefetch(&self, py: Python<'_>, wait: bool) -> PyResult<bool> {
        let running = self
            .prefetch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(Running { state, thread }) = running else {
            return Ok(false);
        };
        if !wait {
            state.stop.store(true, Ordering::Relaxed);
        }
        let result = py.detach(|| thread.join());
        match result {
            Ok(done) => done.map_err(to_py)?,
            Err(payload) => return Err(panic_error(&*payload)),
        }
        Ok(state.is_cold())
    }

    /// Map this file over `target`'s memory, in place (the core's `map_onto`): every tensor viewing
    /// `target` reads this file from then on, at the same addresses, with no byte copied; the pages are
    /// brought in before it returns, from disk where the file is cold. This file's prefetch is abandoned
    /// after its current piece (what it read is in the page cache; the rest is read into `target`'s
    /// mapping, not into this one's, which is dropped), `target`'s ended. `target`'s header (`entries`, `path`) still describes the file it was opened on: for
    /// files laid out alike (a hotswap checks it). `OSError` / `ValueError` naming this file when it is no
    /// longer the file validated, or another length than `target`; then `target` is unchanged.
    fn map_over(&self, py: Python<'_>, target: &SafetensorsFile) -> PyResult<()> {
        self.abandon_prefetch(py);
        target.stop_prefetch(py, false)?;
        let (base, len) = (target.base, target.len as usize);
        let inner = Arc::clone(&self.inner);
        // SAFETY: `target`'s mapping is its own private map_copy of `len` bytes at `base`, unmapped only
        // when `target` is dropped (the caller holds it); its prefetch has ended, and nothing else
        // borrows it as a Rust reference.
        py.detach(|| unsafe { inner.map_onto(base as *mut u8, len) })
            .map_err(to_py)
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// The `__metadata__` map (empty when the file has none).
    #[getter]
    fn metadata(&self) -> std::collections::HashMap<String, String> {
        self.inner.metadata().cloned().unwrap_or_default()
    }

    #[getter]
    fn header_len(&self) -> usize {
        self.inner.header_len()
    }

    /// The header as stored (its 8-byte length and JSON): equal headers list the same tensors at the
    /// same places, so a caller that selected from one need not select again from the other.
    #[getter]
    fn header<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.header_bytes())
    }

    fn __len__(&self) -> usize {
        self.inner.entries().len()
    }

    /// Every tensor as (name, dtype, shape, start, end), in file order.
    fn entries(&self) -> Vec<Record> {
        self.inner
            .entries()
            .iter()
            .map(|e| record(e.name.clone(), e))
            .collect()
    }

    /// Tensors whose key starts with `prefix` and matches the regex `pattern`, renamed by each
    /// `(regex, replacement)` of `renames` in turn. Header-only: no tensor byte is read.
    #[pyo3(signature = (prefix=None, pattern=None, renames=None))]
    fn select(
        &self,
        prefix: Option<String>,
        pattern: Option<&str>,
        renames: Option<Vec<(String, String)>>,
    ) -> PyResult<Vec<Record>> {
        let selector = cached_selector(prefix, pattern, renames.unwrap_or_default())?;
        let selected = selector.apply(self.inner.entries()).map_err(to_py)?;
        Ok(selected.into_iter().map(|(n, e)| record(n, e)).collect())
    }

    fn __repr__(&self) -> String {
        format!(
            "SafetensorsFile({:?}, tensors={})",
            self.inner.path().display(),
            self.inner.entries().len()
        )
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("View is null"));
        }
        let (base, len) = {
            let this = slf.get();
            (this.base, this.len)
        };
        // SAFETY: `view` is a valid Py_buffer supplied by the interpreter. The mapping lives as long as
        // `slf`, which the view keeps alive through `obj`; shape and strides point into the view itself,
        // which stays put until released.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = base as *mut c_void;
            (*view).len = len;
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// `SafetensorsFile.map_over` for the file at `path`, not opened as a `SafetensorsFile`: mapped over
/// `target` when its length is `target`'s and its header is `header` byte for byte (a header validated
/// before: `SafetensorsFile.header`), refused with `ValueError` / `OSError` naming `path` otherwise,
/// `target` unchanged. A hotswap of a file laid out like the last one saves the header parse.
#[pyfunction]
pub fn map_file_over(
    py: Python<'_>,
    path: PathBuf,
    header: &[u8],
    target: &SafetensorsFile,
) -> PyResult<()> {
    target.stop_prefetch(py, false)?;
    let (base, len) = (target.base, target.len as usize);
    // SAFETY: as in `SafetensorsFile::map_over`.
    py.detach(|| unsafe { map_file_onto(&path, header, base as *mut u8, len) })
        .map_err(to_py)
}

/// `SafetensorsFile.select` for bare keys (e.g. a state dict read by torch): the selected keys as
/// (original, renamed), in input order. Same rules, same collision check.
#[pyfunction]
#[pyo3(signature = (keys, prefix=None, pattern=None, renames=None))]
pub fn select_keys(
    keys: Vec<String>,
    prefix: Option<String>,
    pattern: Option<&str>,
    renames: Option<Vec<(String, String)>>,
) -> PyResult<Vec<(String, String)>> {
    let selector = cached_selector(prefix, pattern, renames.unwrap_or_default())?;
    let selected = selector
        .apply_names(keys.iter().map(String::as_str))
        .map_err(to_py)?;
    Ok(selected
        .into_iter()
        .map(|(i, name)| (keys[i].clone(), name))
        .collect())
}

type SelectorKey = (Option<String>, Option<String>, Vec<(String, String)>);

/// Selectors compiled before, by their arguments: compiling the renames' regexes took longer than
/// selecting an adapter's keys with them, and a server selects with the same few again and again.
/// Bounded: cleared when it reaches [`SELECTOR_CACHE`] entries (one per adapter name in use).
static SELECTORS: LazyLock<Mutex<HashMap<SelectorKey, Arc<KeySelector>>>> =
    LazyLock::new(Default::default);
const SELECTOR_CACHE: usize = 256;

fn cached_selector(
    prefix: Option<String>,
    pattern: Option<&str>,
    renames: Vec<(String, String)>,
) -> PyResult<Arc<KeySelector>> {
    let key = (prefix, pattern.map(str::to_owned), renames);
    let mut cache = SELECTORS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(found) = cache.get(&key) {
        return Ok(Arc::clone(found));
    }
    let selector = Arc::new(KeySelector::new(key.0.clone(), pattern, &key.2).map_err(to_py)?);
    if cache.len() >= SELECTOR_CACHE {
        cache.clear();
    }
    cache.insert(key, Arc::clone(&selector));
    Ok(selector)
}
