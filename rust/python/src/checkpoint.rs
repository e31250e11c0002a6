//! Checkpoints: `publish_checkpoint` writes the snapshot's files and publishes the directory on a Rust thread of
//! its own, so the caller (a training loop) gets control back at once. The job keeps the snapshot's
//! buffer export alive until the thread is done with it.

use std::path::PathBuf;
use std::thread::JoinHandle;

use fastadapter_core::checkpoint::{self, CheckpointFile, PublishOptions};
use fastadapter_core::Error;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::{detached, panic_error, to_py};

/// A checkpoint being written by a background thread. `wait()` joins it (GIL released) and returns
/// the published directory or raises what went wrong; dropping an unfinished job joins it first, so
/// the snapshot buffer it reads is never released under it.
#[pyclass(module = "fastadapter._core")]
pub struct CheckpointJob {
    handle: Option<JoinHandle<Result<PathBuf, Error>>>,
    outcome: Option<Result<PathBuf, PyErr>>,
    // Declared after `handle`, and only dropped once the thread has been joined (see Drop).
    snapshot: Option<PyUntypedBuffer>,
    step: u64,
}

impl Drop for CheckpointJob {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[pymethods]
impl CheckpointJob {
    #[getter]
    fn step(&self) -> u64 {
        self.step
    }

    /// Whether the thread has finished (successfully or not); never blocks.
    fn done(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Block until the checkpoint is published; returns its directory. Raises the thread's error (an
    /// `OSError` naming the file, ...) every time it is called after a failure.
    fn wait(&mut self, py: Python<'_>) -> PyResult<PathBuf> {
        if let Some(h) = self.handle.take() {
            let joined = py.detach(|| h.join());
            self.snapshot = None; // the thread is gone: the buffer may be reused or freed
            self.outcome = Some(match joined {
                Ok(Ok(path)) => Ok(path),
                Ok(Err(e)) => Err(to_py(e)),
                Err(p) => Err(panic_error(&*p)),
            });
        }
        match self.outcome.as_ref().expect("set above") {
            Ok(p) => Ok(p.clone()),
            Err(e) => Err(e.clone_ref(py)),
        }
    }

    fn __repr__(&self) -> String {
        let state = if self.handle.is_some() {
            "writing"
        } else {
            match &self.outcome {
                Some(Ok(_)) => "published",
                _ => "failed",
            }
        };
        format!("CheckpointJob(step={}, {state})", self.step)
    }
}

/// Start writing checkpoint `step` under `root` on a background thread. `files` are
/// `(relative name, start, end)` ranges of `snapshot` (each a complete file image) and `small` are
/// `(relative name, bytes)`. The thread writes them into a hidden temp directory, fsyncs when asked,
/// renames it to `checkpoint-<step>` (or `checkpoint-<step>/<part>`), then rotates to `keep_last`.
#[pyfunction]
#[pyo3(signature = (root, step, snapshot, files, small, fsync=true, parallel=true, keep_last=None, part=None))]
#[allow(clippy::too_many_arguments)]
pub fn publish_checkpoint(
    root: PathBuf,
    step: u64,
    snapshot: &Bound<'_, PyAny>,
    files: Vec<(String, usize, usize)>,
    small: Vec<(String, Vec<u8>)>,
    fsync: bool,
    parallel: bool,
    keep_last: Option<usize>,
    part: Option<String>,
) -> PyResult<CheckpointJob> {
    let buffer = PyUntypedBuffer::get(snapshot)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "snapshot buffer must be C-contiguous",
        ));
    }
    let len = buffer.len_bytes();
    for (name, start, end) in &files {
        if start > end || *end > len {
            return Err(PyValueError::new_err(format!(
                "checkpoint file `{name}`: range {start}..{end} is outside the {len}-byte snapshot"
            )));
        }
    }
    let ptr = buffer.buf_ptr() as usize;
    let options = PublishOptions {
        fsync,
        parallel,
        keep_last,
        part,
    };
    let handle = std::thread::Builder::new()
        .name(format!("fastadapter-checkpoint-{step}"))
        .spawn(move || {
            let whole: &[u8] = match len {
                0 => &[],
                // SAFETY: the job holds the export of this buffer until the thread has been joined
                // (wait() or Drop), and the Python side does not write to a snapshot buffer while a
                // job reading it is pending.
                len => unsafe { std::slice::from_raw_parts(ptr as *const u8, len) },
            };
            let mut list: Vec<CheckpointFile<'_>> = files
                .iter()
                .map(|(name, s, e)| CheckpointFile {
                    name,
                    data: &whole[*s..*e],
                })
                .collect();
            list.extend(
                small
                    .iter()
                    .map(|(name, data)| CheckpointFile { name, data }),
            );
            checkpoint::publish(&root, step, &list, &options)
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a writer thread: {e}")))?;
    Ok(CheckpointJob {
        handle: Some(handle),
        outcome: None,
        snapshot: Some(buffer),
        step,
    })
}

/// Steps of the complete checkpoints under `root`, ascending (hidden leftovers ignored).
#[pyfunction]
pub fn checkpoint_steps(py: Python<'_>, root: PathBuf) -> PyResult<Vec<u64>> {
    detached(py, || checkpoint::steps(&root))
}

/// Remove temp/trash directories left under `root` by writers that are no longer running.
#[pyfunction]
pub fn clean_stale_checkpoints(py: Python<'_>, root: PathBuf) -> PyResult<usize> {
    detached(py, || checkpoint::clean_stale(&root))
}

/// Delete complete checkpoints under `root` so that `keep` remain, oldest first, never `protect` (the
/// step just written). For checkpoints published by another writer (the distributed checkpoint
/// plugin); `publish_checkpoint` rotates its own. Returns the deleted steps.
#[pyfunction]
pub fn rotate_checkpoints(
    py: Python<'_>,
    root: PathBuf,
    keep: usize,
    protect: u64,
) -> PyResult<Vec<u64>> {
    detached(py, || checkpoint::rotate(&root, keep, protect))
}
