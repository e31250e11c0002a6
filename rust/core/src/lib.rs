//! fastadapter-core: the byte-level half of fastadapter, with no Python in it.
//!
//! * [`reader`]: memory-maps a `.safetensors` file and validates its header with the same rules as the
//!   `safetensors` crate (it *is* the crate's validator), handing out offsets and borrowed slices, never copies.
//! * [`select`]: picks tensors by prefix / regex and renames keys, header-only.
//! * [`layout`]: computes the exact header bytes and data order that `safetensors` 0.8 writes.
//! * [`writer`]: writes a file from caller-owned buffers with parallel positional writes, atomically.
//! * [`atomic`]: the temp-file-then-rename primitive the writer (and the Python layer) commit through.

pub mod atomic;
pub mod error;
pub mod layout;
pub mod reader;
pub mod select;
pub mod writer;

pub use error::{Error, Result};
pub use safetensors::Dtype;
