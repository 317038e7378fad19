//! The error type of the disk library: every variant that concerns a file names it.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::format::FormatError;

/// Why a disk operation failed. Variants about a file carry its path; the underlying cause is
/// chained as the `source` (use [`error_chain`] to print the whole story).
#[derive(Debug, Error)]
pub enum DiskError {
    /// An I/O call failed.
    #[error("{}: {op} failed", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The header or a table entry does not parse.
    #[error("{}: corrupt or foreign disk layer", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// The file is shorter than its metadata says.
    #[error("{}: file is truncated ({what} needs {need} bytes, file has {len})", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What lies beyond the end.
        what: String,
        /// Bytes needed.
        need: u64,
        /// Actual length.
        len: u64,
    },
    /// The allocation table is inconsistent.
    #[error("{}: corrupt allocation table: {reason}", path.display())]
    CorruptTable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another process (or another open in this one) holds a conflicting lock.
    #[error("{}: file is in use{}", path.display(), pid.map(|p| format!(" by process {p}")).unwrap_or_default())]
    InUse {
        /// The file.
        path: PathBuf,
        /// The holder, when /proc/locks tells.
        pid: Option<u32>,
    },
    /// The parent a layer names cannot be opened.
    #[error("{}: parent {} is missing or unreadable", path.display(), parent.display())]
    ParentMissing {
        /// The child layer.
        path: PathBuf,
        /// The parent path as resolved.
        parent: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The parent is not the one the layer was created on, or it changed since.
    #[error("{}: parent {} {reason}", path.display(), parent.display())]
    ParentChanged {
        /// The child layer.
        path: PathBuf,
        /// The parent path as resolved.
        parent: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The parent a layer names cannot be one: not a regular file (a FIFO, a device), or not
    /// a usable path.
    #[error("{}: parent {} refused: it {reason}", path.display(), parent.display())]
    ParentRefused {
        /// The child layer.
        path: PathBuf,
        /// The parent path as resolved.
        parent: PathBuf,
        /// Why.
        reason: String,
    },
    /// The parent a layer names is outside every directory the caller allows (the layer's own
    /// directory and below, plus [`crate::ParentPolicy`]'s).
    #[error("{}: parent {} refused: it {reason}", path.display(), parent.display())]
    ParentOutside {
        /// The child layer.
        path: PathBuf,
        /// The parent path as resolved.
        parent: PathBuf,
        /// Where it leads and how to opt in.
        reason: String,
    },
    /// A file given as a disk is not a regular file.
    #[error("{}: is {kind}, not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// An earlier `fdatasync` of this file failed: what was written before it may be lost, so
    /// the chain refuses every later write and flush until it is reopened.
    #[error(
        "{}: an earlier fdatasync failed ({first}), so data written before it may never have          reached the disk; this chain refuses further writes and flushes until it is reopened",
        path.display()
    )]
    Poisoned {
        /// The file.
        path: PathBuf,
        /// The first failure.
        first: String,
    },
    /// A parent/child pair or chain that cannot be formed.
    #[error("{}: {reason}", path.display())]
    BadChain {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A request outside the disk or otherwise invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A write to a chain opened read-only.
    #[error("{}: chain is open read-only", path.display())]
    ReadOnly {
        /// The top file.
        path: PathBuf,
    },
    /// The destination of a create or convert already exists.
    #[error("{}: already exists", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// Result alias for the disk library.
pub type Result<T, E = DiskError> = std::result::Result<T, E>;

impl DiskError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        op: &'static str,
    ) -> impl FnOnce(io::Error) -> DiskError {
        let path = path.into();
        move |source| DiskError::Io { path, op, source }
    }
}

/// Formats an error and all its sources as `outer: inner: ...`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
