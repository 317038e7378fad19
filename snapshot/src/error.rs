//! The crate's error type: every variant names the file (or checkpoint) it is about.

use std::path::PathBuf;

/// Why an operation on the checkpoint store failed. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("{path}: {op}: {source}", path = .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done (`open`, `read`, `fsync`, ...).
        op: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// The file does not start with the expected magic: not a file of this kind.
    #[error("{path}: bad magic {found:02x?}: not a Strata {kind}", path = .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The bytes found where the magic belongs.
        found: Vec<u8>,
        /// The kind of file expected (`state file`).
        kind: &'static str,
    },
    /// The file's format version is not one this build reads.
    #[error("{path}: unsupported format version {found} (this build reads {supported})",
        path = .path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// The version this build reads.
        supported: u64,
    },
    /// The file is shorter than its header says.
    #[error("{path}: truncated: {actual} bytes, {expected} expected", path = .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The length the header implies.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The stored checksum does not match the content.
    #[error("{path}: checksum mismatch{what}: stored {expected:016x}, computed {actual:016x}",
        path = .path.display(), what = .what.as_deref().map(|w| format!(" in {w}")).unwrap_or_default())]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Which part of the file, when it has several checksums (`region 1`).
        what: Option<String>,
        /// The checksum recorded.
        expected: u64,
        /// The checksum of what is there now.
        actual: u64,
    },
    /// The file (or its declared payload) is larger than the cap: refused before allocating.
    #[error("{path}: too large: {len} bytes, at most {cap} accepted", path = .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The declared length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The payload is not valid for the type it should hold.
    #[error("{path}: payload does not decode: {source}", path = .path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: serde_json::Error,
    },
    /// A value could not be encoded (a bug in the caller's types, e.g. a map with non-string keys).
    #[error("{path}: cannot encode: {source}", path = .path.display())]
    Encode {
        /// The file it was meant for.
        path: PathBuf,
        /// The encoder's error.
        source: serde_json::Error,
    },
    /// The file decodes but its content is invalid (a path outside the store, a bad layout...).
    #[error("{path}: {reason}", path = .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Arguments given to the crate are inconsistent (regions that overlap, a bitmap too short).
    #[error("{0}")]
    BadArgument(String),
    /// No checkpoint with this id in the store.
    #[error("{location}: no checkpoint {id}", location = .location.display())]
    NotFound {
        /// The store's location.
        location: PathBuf,
        /// The id asked for.
        id: String,
    },
    /// Another process holds the store.
    #[error("{path}: the checkpoint store is in use by another process", path = .path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path` during `op`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// The content of `path` is invalid because of `reason`.
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Attaches a path and an operation to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Maps the error to [`Error::Io`] for `path` and `op`.
    fn at(self, path: &std::path::Path, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, op, e))
    }
}
