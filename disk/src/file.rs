//! The file a layer is read and written through, and how new files are created.
//!
//! The file a layer is read and written through: a `std::fs::File` with an optional fault
//! injector, so tests can make `fdatasync` (and writes) fail the way a dying disk does.
//!
//! `DiskFile` dereferences to the `File` for everything else (reads, `flock`, `stat`);
//! `write_all_at`, `sync_data` and `sync_all` are its own methods, so every write and sync the
//! library makes passes the injector. Without an injector they cost one branch.
//!
//! A [`Faults`] plan can also *lose* failed writes the way the kernel does after a failed
//! writeback (the "fsyncgate" behaviour: the dirty pages are dropped or marked clean, and a
//! retried `fsync` succeeds): with [`Faults::lose_unsynced`], every write made since the last
//! successful sync is undone (its old bytes put back) when a sync fails. A test can then tell
//! whether a table entry was published pointing at data that never reached the disk.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::chain::Chain;
use crate::error::{DiskError, Result};
use crate::layer::read_full;

/// A fault plan shared by the files of a chain (see [`Chain::inject_faults`]).
#[derive(Debug, Default)]
pub struct Faults {
    /// Successful syncs still allowed before syncs fail; `u64::MAX` (the default of
    /// [`Faults::new`]) never fails.
    syncs_left: AtomicU64,
    /// Whether a sync that fails undoes the writes made since the last successful sync.
    lose: AtomicBool,
    /// Syncs attempted.
    syncs: AtomicU64,
    /// Syncs failed.
    failed: AtomicU64,
    /// Writes since the last successful sync, with the bytes they replaced, per file (by
    /// device and inode).
    undo: Mutex<Vec<Undo>>,
}

#[derive(Debug)]
struct Undo {
    file: (u64, u64),
    offset: u64,
    old: Vec<u8>,
}

impl Faults {
    /// A plan that injects nothing until armed.
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults {
            syncs_left: AtomicU64::new(u64::MAX),
            ..Faults::default()
        })
    }

    /// Lets `n` more syncs succeed, then fails every sync (EIO) until [`Faults::heal`].
    pub fn fail_syncs_after(&self, n: u64) {
        self.syncs_left.store(n, Ordering::SeqCst);
    }

    /// Stops failing syncs (the disk "recovered": a retried sync would now succeed).
    pub fn heal(&self) {
        self.syncs_left.store(u64::MAX, Ordering::SeqCst);
    }

    /// Makes a failed sync undo the writes made since the last successful one.
    pub fn lose_unsynced(&self, lose: bool) {
        self.lose.store(lose, Ordering::SeqCst);
    }

    /// (syncs attempted, syncs failed).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.syncs.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    fn undo_log(&self) -> std::sync::MutexGuard<'_, Vec<Undo>> {
        self.undo.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A layer's open file, with an optional fault injector.
#[derive(Debug)]
pub(crate) struct DiskFile {
    file: File,
    faults: Option<Arc<Faults>>,
}

impl Deref for DiskFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl From<File> for DiskFile {
    fn from(file: File) -> DiskFile {
        DiskFile { file, faults: None }
    }
}

impl DiskFile {
    /// Routes this file's writes and syncs through `faults`.
    pub fn set_faults(&mut self, faults: Option<Arc<Faults>>) {
        self.faults = faults;
    }

    /// The fault plan this file's writes and syncs go through, if any.
    pub fn faults(&self) -> Option<Arc<Faults>> {
        self.faults.clone()
    }

    fn id(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or((0, 0), |m| (m.dev(), m.ino()))
    }

    /// `pwrite` of all of `buf` at `offset` (recorded for undo when the plan loses writes).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(f) = &self.faults {
            if f.lose.load(Ordering::SeqCst) {
                let mut old = vec![0u8; buf.len()];
                let n = read_full(&self.file, &mut old, offset)?;
                old.truncate(n);
                f.undo_log().push(Undo {
                    file: self.id(),
                    offset,
                    old,
                });
            }
        }
        self.file.write_all_at(buf, offset)
    }

    /// `fdatasync`, or the injected failure.
    pub fn sync_data(&self) -> io::Result<()> {
        self.sync(false)
    }

    /// `fsync`, or the injected failure.
    pub fn sync_all(&self) -> io::Result<()> {
        self.sync(true)
    }

    fn sync(&self, all: bool) -> io::Result<()> {
        let Some(f) = &self.faults else {
            return if all {
                self.file.sync_all()
            } else {
                self.file.sync_data()
            };
        };
        f.syncs.fetch_add(1, Ordering::SeqCst);
        let allowed = f
            .syncs_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => Some(u64::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        let id = self.id();
        if !allowed {
            f.failed.fetch_add(1, Ordering::SeqCst);
            // The kernel dropped what it could not write back: this file's writes since its
            // last good sync are gone (newest first, so the oldest bytes win).
            let mut log = f.undo_log();
            let (mine, rest): (Vec<Undo>, Vec<Undo>) = std::mem::take(&mut *log)
                .into_iter()
                .partition(|u| u.file == id);
            *log = rest;
            drop(log);
            for u in mine.iter().rev() {
                self.file.write_all_at(&u.old, u.offset)?;
            }
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let r = if all {
            self.file.sync_all()
        } else {
            self.file.sync_data()
        };
        if r.is_ok() {
            f.undo_log().retain(|u| u.file != id);
        }
        r
    }
}

impl Chain {
    /// Routes every write and sync of the files this chain has open now through `faults`.
    /// For tests only.
    #[doc(hidden)]
    pub fn inject_faults(&mut self, faults: Arc<Faults>) {
        for l in &mut self.layers {
            l.file.set_faults(Some(faults.clone()));
        }
    }
}

/// `dir/.name.PID-RANDOM.tmp`: a temporary name no other create (and no crashed one) uses.
pub(crate) fn unique_tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let r = crate::format::random_id();
    let tag: String = r[..6].iter().map(|b| format!("{b:02x}")).collect();
    path.with_file_name(format!(".{name}.{}-{tag}.tmp", std::process::id()))
}

/// Creates the file `path` holding `head` at offset 0 and `len` bytes in all, durably and
/// atomically: built as an unnamed file (`O_TMPFILE`) in the destination's directory, synced,
/// then linked into place; where `O_TMPFILE` or the link by `/proc/self/fd` is unavailable,
/// built under a unique temporary name (so that a crashed create never blocks the next) and
/// hard-linked into place. Either way an existing `path` is never replaced ("already exists"),
/// and the directory is synced. Without `durable` neither the file nor its directory is synced
/// (the caller makes both durable later with [`sync_created`], before anything refers to it).
pub(crate) fn create_whole(path: &Path, head: &[u8], len: u64, durable: bool) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(DiskError::Exists {
            path: path.to_path_buf(),
        });
    }
    let fill = |f: &File, shown: &Path| -> Result<()> {
        f.write_all_at(head, 0)
            .map_err(DiskError::io(shown, "write header"))?;
        f.set_len(len).map_err(DiskError::io(shown, "set length"))?;
        if durable {
            f.sync_all().map_err(DiskError::io(shown, "fsync"))?;
        }
        Ok(())
    };
    let sync_dir = |path: &Path| {
        if durable {
            crate::sys::sync_dir(path)
        } else {
            Ok(())
        }
    };
    let exists = |e: io::Error| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            DiskError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            DiskError::io(path, "link into place")(e)
        }
    };
    if let Some(f) = open_tmpfile(path) {
        fill(&f, path)?;
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        match link(&proc_path, path, libc::AT_SYMLINK_FOLLOW) {
            Ok(()) => return sync_dir(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists(e)),
            // No /proc: fall back to a named temporary file below.
            Err(_) => {}
        }
    }
    let tmp = unique_tmp_path(path);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(DiskError::io(&tmp, "create"))?;
    let res = fill(&f, &tmp)
        .and_then(|()| link(&tmp, path, 0).map_err(exists))
        .and_then(|()| sync_dir(path));
    let _ = std::fs::remove_file(&tmp);
    res
}

/// Makes a file made by `create_whole` without `durable` durable: its data, then its
/// directory entry.
pub fn sync_created(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(DiskError::io(path, "open"))?;
    f.sync_all().map_err(DiskError::io(path, "fsync"))?;
    crate::sys::sync_dir(path)
}

/// An unnamed file in `path`'s directory, or `None` where the file system cannot make one.
fn open_tmpfile(path: &Path) -> Option<File> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a NUL-terminated path alive for the call; flags and mode are plain ints.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `linkat(AT_FDCWD, from, AT_FDCWD, to, flags)`: fails with `AlreadyExists` if `to` exists.
fn link(from: &Path, to: &Path, flags: libc::c_int) -> io::Result<()> {
    let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte");
    let f = CString::new(from.as_os_str().as_bytes()).map_err(invalid)?;
    let t = CString::new(to.as_os_str().as_bytes()).map_err(invalid)?;
    // SAFETY: both paths are NUL-terminated and alive for the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
