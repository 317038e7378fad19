//! Thin wrappers over the Linux calls std does not offer: `flock`, `fallocate` hole punching,
//! and finding who holds a lock (from `/proc/locks`).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{DiskError, Result};

/// Takes a shared or exclusive `flock` without blocking; a conflict names the holder's pid.
pub(crate) fn lock(file: &File, path: &Path, exclusive: bool) -> Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock takes a file descriptor we own (borrowed from `file`) and no pointers.
    let r = unsafe { libc::flock(file.as_raw_fd(), op) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(DiskError::InUse {
            path: path.to_path_buf(),
            pid: lock_holder(file),
        });
    }
    Err(DiskError::io(path, "flock")(err))
}

/// Releases this descriptor's `flock`.
pub(crate) fn unlock(file: &File) {
    // SAFETY: as in `lock`; unlocking cannot fail in a way we must handle.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// The pid holding a flock on `file`, from `/proc/locks`.
fn lock_holder(file: &File) -> Option<u32> {
    let md = file.metadata().ok()?;
    let dev = md.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] == "->" || f[1] != "FLOCK" {
            return None;
        }
        let mut id = f[5].split(':');
        let ma = u64::from_str_radix(id.next()?, 16).ok()?;
        let mi = u64::from_str_radix(id.next()?, 16).ok()?;
        let ino: u64 = id.next()?.parse().ok()?;
        (ma == major && mi == minor && ino == md.ino())
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

/// Deallocates a byte range (it then reads as zeroes) without changing the file size. Falls
/// back to writing zeroes where the file system cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate takes a descriptor we own and plain integers.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    write_zeroes(file, offset, len)
}

/// Writes zeroes over a range with positional writes.
pub(crate) fn write_zeroes(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Fsyncs a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DiskError::io(dir, "fsync directory"))
}
