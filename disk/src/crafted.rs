//! Crafted layer files for the hostile-image tests: `disk/tests/hostile.rs` (the library) and
//! `tests/tests/hostile_images.rs` (the `strata` binary) build their corpus with these, so both
//! craft exactly the same files. Not part of the API: Strata itself never calls these.

use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::format::{Header, ParentRef};

/// The mtime of `path` (seconds, nanoseconds), as a layer records its parent's.
pub fn mtime(path: &Path) -> io::Result<(i64, u32)> {
    let m = std::fs::metadata(path)?;
    Ok((m.mtime(), m.mtime_nsec() as u32))
}

/// Writes a layer file at `path` holding just `h` (sparse up to its data area).
pub fn write_layer(path: &Path, h: &Header) -> io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.write_all_at(&h.encode(), 0)?;
    f.set_len(h.data_offset)
}

/// A layer at `path` (64 KiB clusters) naming `recorded` as its raw parent, with the identity
/// (size, mtime) of the file `victim`, so that only the path rules stand between it and the
/// victim.
pub fn layer_over_raw(path: &Path, recorded: &str, victim: &Path) -> io::Result<()> {
    let len = std::fs::metadata(victim)?.len();
    let h = Header::new(
        16,
        len.next_multiple_of(512),
        ParentRef::Raw {
            path: recorded.into(),
            size: len,
            mtime: mtime(victim)?,
            fold_ino: 0,
        },
    );
    write_layer(path, &h)
}
