//! The one error type of the core. Every variant names the file, key or tensor it is about, so the
//! binding layer can turn it into a Python exception with a useful message without adding context.

use std::io;
use std::path::{Path, PathBuf};

use safetensors::SafeTensorError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system failure on `path` (open, map, write, rename, fsync, ...).
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid safetensors file (the `safetensors` crate's validation rules).
    #[error("{path}: invalid safetensors file: {source}", path = .path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    /// A safetensors header the `safetensors` crate accepts but we refuse (e.g. a key listed twice).
    #[error("{path}: invalid safetensors file: {reason}", path = .path.display())]
    Header { path: PathBuf, reason: String },
    /// A tensor handed to the writer, or selected from a file, is inconsistent.
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    /// A key pattern given by the caller does not compile.
    #[error("invalid key pattern `{pattern}`: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    /// Two tensors end up with the same name (after renaming, or as given to the writer).
    #[error("duplicate tensor name `{0}`")]
    DuplicateName(String),
    /// A torch.save zip container is malformed: no end record, offsets out of the file, bad signatures.
    #[error("{path}: not a valid torch.save zip archive: {reason}", path = .path.display())]
    TorchZip { path: PathBuf, reason: String },
    /// One zip entry is refused: compressed, encrypted, unsafe name, outside the root, bad CRC-32.
    #[error("{path}: zip entry `{entry}`: {reason}", path = .path.display())]
    TorchZipEntry {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    /// A pre-1.6 torch.save file (a bare pickle stream, not a zip).
    #[error(
        "{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a \
         current torch: `torch.save(torch.load(f, weights_only=True), f)`",
        path = .path.display()
    )]
    LegacyTorchFormat { path: PathBuf },
    /// The checkpoint was written on a big-endian machine.
    #[error(
        "{path}: checkpoint was saved big-endian (`byteorder` = big); only little-endian is supported",
        path = .path.display()
    )]
    BigEndian { path: PathBuf },
    /// `data.pkl` uses an opcode, global or call that `torch.load(weights_only=True)` would not run.
    #[error("{path}: data.pkl byte {offset}: refused {what}", path = .path.display())]
    UnsafePickle {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    /// `data.pkl` is malformed, exceeds a limit, or does not describe a state dict of tensors.
    #[error("{path}: data.pkl byte {offset}: {reason}", path = .path.display())]
    Pickle {
        path: PathBuf,
        offset: usize,
        reason: String,
    },
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn zip(path: &Path, reason: impl Into<String>) -> Self {
        Error::TorchZip {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn entry(path: &Path, entry: &str, reason: impl Into<String>) -> Self {
        Error::TorchZipEntry {
            path: path.to_path_buf(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Attach a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::io(path, source))
    }
}
