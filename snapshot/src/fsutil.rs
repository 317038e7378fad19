//! Small durable-filesystem helpers: fsync a folder, write a file atomically.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// fsyncs the folder `dir`, so that the entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).at(dir, "open folder")?;
    d.sync_all().at(dir, "fsync folder")
}

/// The folder holding `path` (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temporary sibling `path` is written to before it is renamed into place.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    parent_of(path).join(name)
}

/// Writes `bytes` to `path` atomically: to a temporary sibling (`<name>.tmp`), fsynced, renamed
/// over `path`, then the folder is fsynced. A crash leaves either the old file or the new one
/// (and at worst a stale `<name>.tmp`, which the next write replaces).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .at(&tmp, "create")?;
    f.write_all(bytes).at(&tmp, "write")?;
    f.sync_all().at(&tmp, "fsync")?;
    drop(f);
    std::fs::rename(&tmp, path).at(path, "rename into place")?;
    sync_dir(&parent_of(path))
}
