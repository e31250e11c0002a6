//! `fastadapter._core`: the thin PyO3 layer over `fastadapter-core`.
//!
//! It converts arguments and results and maps errors; file formats, validation and I/O live in the core.
//! Every I/O region runs with the GIL released (`Python::detach`), touching no Python object.

mod checkpoint;
mod convert;
mod errors;
mod gather;
mod positioned;
mod reader;
mod writer;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<reader::SafetensorsFile>()?;
    m.add_class::<writer::PendingFile>()?;
    m.add_class::<writer::WriteJob>()?;
    m.add_class::<convert::Progress>()?;
    m.add_class::<checkpoint::CheckpointJob>()?;
    m.add_class::<positioned::ChunkReads>()?;
    m.add_function(wrap_pyfunction!(checkpoint::publish_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::checkpoint_steps, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::clean_stale_checkpoints, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::rotate_checkpoints, m)?)?;
    m.add_function(wrap_pyfunction!(reader::select_keys, m)?)?;
    m.add_function(wrap_pyfunction!(reader::map_file_over, m)?)?;
    m.add_function(wrap_pyfunction!(writer::write_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(writer::write_safetensors_files, m)?)?;
    m.add_function(wrap_pyfunction!(writer::start_write_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(writer::stage_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(writer::stage_sized, m)?)?;
    m.add_function(wrap_pyfunction!(writer::wait_released, m)?)?;
    m.add_function(wrap_pyfunction!(writer::plan_header, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert_file, m)?)?;
    m.add_function(wrap_pyfunction!(convert::inspect_torch, m)?)?;
    m.add_function(wrap_pyfunction!(gather::copy_ranges, m)?)?;
    m.add_function(wrap_pyfunction!(positioned::write_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(positioned::publish_dir, m)?)?;
    m.add_function(wrap_pyfunction!(positioned::read_chunks, m)?)?;
    Ok(())
}
