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
