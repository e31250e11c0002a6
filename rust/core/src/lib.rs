//! fastadapter-core: the byte-level half of fastadapter, with no Python in it.
//!
//! * [`reader`]: memory-maps a `.safetensors` file and validates its header with the same rules as the
//!   `safetensors` crate (it *is* the crate's validator), handing out offsets and borrowed slices, never copies.
//! * [`prefetch`]: brings a mapped file's pages in before use, with parallel reads when they are not cached.
//! * [`select`]: picks tensors by prefix / regex and renames keys, header-only.
//! * [`layout`]: computes the exact header bytes and data order that `safetensors` 0.8 writes.
//! * [`writer`]: writes a file from caller-owned buffers with parallel positional writes, atomically;
//!   several files at once through [`parallel`].
//! * [`atomic`]: the temp-file-then-rename primitive the writer (and the Python layer) commit through;
//!   [`release`] frees the file it replaces off the caller's thread.
//! * [`torch_zip`], [`pickle`], [`state_dict`]: a reader for `torch.save` checkpoints that parses the zip
//!   container over a mapping and interprets `data.pkl` with exactly what `torch.load(weights_only=True)`
//!   allows; globals are recorded, never resolved, so nothing in a hostile file can run.
//! * [`convert`]: `.bin` to safetensors, tensor bytes going from the source mapping to the output file.
//! * [`positioned`]: chunks of tensors written by several processes straight to their offsets in shared
//!   files (the distributed checkpoint plugin), and the directory publish that ends such a checkpoint.

pub mod atomic;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod layout;
pub mod parallel;
pub mod pickle;
pub mod pickle_globals;
pub mod positioned;
pub mod prefetch;
pub mod reader;
pub mod release;
pub mod select;
pub mod snapshot;
pub mod state_dict;
pub mod torch_dtype;
pub mod torch_zip;
pub mod writer;

pub use convert::{convert_file, inspect_torch, ConvertOptions, ConvertReport, TorchTensorInfo};
pub use error::{Error, Result};
pub use safetensors::Dtype;
