//! Which files a layer may name as its parent, and opening files so that a crafted layer
//! cannot make Strata read (or, through a merge, write) a file the user never chose.
//!
//! A layer file may come from anywhere (a download, a colleague's folder), so the parent path in
//! its header is not trusted (FORMAT.md, "Parent references"):
//!
//! - By default a parent must resolve, symbolic links included, to a **regular file in the
//!   layer's own directory or below**. The check is made on the canonical path and enforced
//!   again when the file is opened (from a descriptor of that
//!   directory, one component at a time with `O_NOFOLLOW`), so a symbolic link swapped in
//!   between cannot lead outside.
//! - A [`ParentPolicy`] given by the *caller* (never read from a file) widens this: extra
//!   directories whose files any layer may name (the VMM passes the folder of each launch disk
//!   it recorded itself, since a checkpoint store's first layer sits above the user's disk), or
//!   any file at all (`strata disk ... --allow-parent-outside`).
//! - Every file, the top included, is opened with `O_NONBLOCK` and must be a regular file
//!   (`fstat`): a FIFO, socket or device named as a disk is refused, and opening a FIFO never
//!   blocks.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{DiskError, Result};
use crate::format::MAX_PARENT_PATH;

/// Which files the layers of a chain may name as parents, besides files in (or below) each
/// layer's own directory. Chosen by the caller when it opens or creates; nothing in a file can
/// widen it. The default allows nothing more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentPolicy {
    /// Directories (and everything below them) whose regular files any layer may name.
    pub allowed_dirs: Vec<PathBuf>,
    /// Any regular file may be a parent (`--allow-parent-outside`).
    pub anywhere: bool,
}

impl ParentPolicy {
    /// Parents only in each layer's own directory or below (the default).
    pub fn confined() -> ParentPolicy {
        ParentPolicy::default()
    }

    /// Any regular file may be a parent: for a user who trusts the chain.
    pub fn anywhere() -> ParentPolicy {
        ParentPolicy {
            allowed_dirs: Vec::new(),
            anywhere: true,
        }
    }

    /// Also allows the files in (and below) `dirs`.
    pub fn with_dirs<P: Into<PathBuf>>(dirs: impl IntoIterator<Item = P>) -> ParentPolicy {
        ParentPolicy {
            allowed_dirs: dirs.into_iter().map(Into::into).collect(),
            anywhere: false,
        }
    }

    /// The allowed directories that exist, canonical.
    fn canonical_dirs(&self) -> Vec<PathBuf> {
        self.allowed_dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect()
    }
}

const HINT: &str = "a layer may name only a file in its own directory or below; if you trust \
                    this chain, pass --allow-parent-outside (strata disk) or --allow-path with \
                    the parent's folder (strata run)";

/// What kind of non-regular file `ft` is, for an error message.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn open_flags(writable: bool) -> libc::c_int {
    (if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    }) | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | libc::O_CLOEXEC
}

/// Checks that `file` is a regular file (else says what it is) and clears the `O_NONBLOCK` it
/// was opened with.
fn regular(file: File) -> std::result::Result<File, &'static str> {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => return Err(kind_of(m.file_type())),
        Err(_) => return Err("a file that cannot be examined (fstat failed)"),
    }
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Opens a file the user named (a chain's top, a file being merged): never blocks on a FIFO,
/// and refuses anything but a regular file.
pub(crate) fn open_regular(path: &Path, writable: bool) -> Result<File> {
    let c = cstr(path).map_err(DiskError::io(path, "open"))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; the flags are plain ints.
    let fd = unsafe { libc::open(c.as_ptr(), open_flags(writable)) };
    if fd < 0 {
        return Err(DiskError::io(path, "open")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    regular(file).map_err(|kind| DiskError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

/// Opens `dir/rel` read-only, where `rel` is a canonical relative path (no `.`, `..` nor
/// symbolic link in it): one `openat(O_NOFOLLOW)` per component from a descriptor of `dir`,
/// so a symbolic link swapped in after the path was checked fails the open (`ELOOP`,
/// `ENOTDIR`) instead of leading elsewhere. Plain `openat` only, so it works under the VMM's
/// seccomp filters and on every kernel (`openat2`'s `RESOLVE_BENEATH` would do the same).
fn open_beneath(dir: &Path, rel: &Path) -> io::Result<File> {
    let openat = |at: libc::c_int, name: &CString, flags: libc::c_int| -> io::Result<OwnedFd> {
        // SAFETY: `name` is NUL-terminated and alive for the call; `at` is a descriptor we
        // own (or AT_FDCWD); the flags are plain ints.
        let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let walk = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let mut at = openat(libc::AT_FDCWD, &cstr(dir)?, walk)?;
    let parts: Vec<Component<'_>> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let Component::Normal(name) = part else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a canonical relative path",
            ));
        };
        let name = cstr(Path::new(name))?;
        let last = i + 1 == parts.len();
        let flags = if last {
            open_flags(false) | libc::O_NOFOLLOW
        } else {
            walk
        };
        at = openat(at.as_raw_fd(), &name, flags)?;
    }
    Ok(File::from(at))
}

/// The directory of `path` (`.` for a bare name), canonical.
fn canonical_dir_of(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).map_err(DiskError::io(dir, "resolve path"))
}

/// Resolves a recorded parent path against the child's directory (for messages and as the
/// layer's path).
pub(crate) fn resolve_parent(child: &Path, recorded: &str) -> PathBuf {
    let p = Path::new(recorded);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match child.parent() {
        Some(d) => d.join(p),
        None => p.to_path_buf(),
    }
}

/// Opens the parent `recorded` in `child`'s header, read-only, if `policy` lets `child` name
/// it: returns the path as resolved (for messages) and the open file.
pub(crate) fn open_parent(
    child: &Path,
    recorded: &str,
    policy: &ParentPolicy,
) -> Result<(PathBuf, File)> {
    let shown = resolve_parent(child, recorded);
    let refused = |reason: String| DiskError::ParentRefused {
        path: child.to_path_buf(),
        parent: shown.clone(),
        reason,
    };
    if recorded.is_empty() || recorded.contains('\0') {
        return Err(refused("is not a usable path".into()));
    }
    let own = canonical_dir_of(child)?;
    let real = std::fs::canonicalize(&shown).map_err(|source| DiskError::ParentMissing {
        path: child.to_path_buf(),
        parent: shown.clone(),
        source,
    })?;
    let mut bases = vec![own.clone()];
    bases.extend(policy.canonical_dirs());
    let beneath = bases.iter().find_map(|b| {
        real.strip_prefix(b)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
            .map(|r| (b, r))
    });
    let opened = match beneath {
        Some((base, rel)) => match open_beneath(base, rel) {
            Ok(f) => f,
            // A symbolic link appeared on the way since the path was resolved.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                return Err(DiskError::ParentOutside {
                    path: child.to_path_buf(),
                    parent: shown.clone(),
                    reason: format!(
                        "no longer leads to a file below {} (a symbolic link changed while it \
                         was opened)",
                        base.display()
                    ),
                })
            }
            Err(source) => {
                return Err(DiskError::ParentMissing {
                    path: child.to_path_buf(),
                    parent: shown.clone(),
                    source,
                })
            }
        },
        None if policy.anywhere => {
            open_nofollow(&real).map_err(|source| DiskError::ParentMissing {
                path: child.to_path_buf(),
                parent: shown.clone(),
                source,
            })?
        }
        None => {
            let via = if Path::new(recorded).is_absolute() {
                "is an absolute path"
            } else if Path::new(recorded)
                .components()
                .any(|c| c == Component::ParentDir)
            {
                "climbs with .."
            } else {
                "leads through a symbolic link"
            };
            return Err(DiskError::ParentOutside {
                path: child.to_path_buf(),
                parent: shown.clone(),
                reason: format!(
                    "is outside the layer's directory {} (the recorded path {recorded:?} {via}, \
                 resolving to {}); {HINT}",
                    own.display(),
                    real.display()
                ),
            });
        }
    };
    let file = regular(opened).map_err(|kind| refused(format!("is {kind}, not a regular file")))?;
    Ok((shown, file))
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path alive for the call; the flags are plain ints.
    let fd = unsafe { libc::open(c.as_ptr(), open_flags(false) | libc::O_NOFOLLOW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The parent path a child at `child` records for the parent file at `parent`: the path
/// relative to the child's directory when the parent is in it or below (a bare name when both
/// share a directory), otherwise the parent's absolute path. With `policy`, an outside parent
/// the policy does not allow is refused (it would not open without the same opt-in).
pub(crate) fn reference(
    parent: &Path,
    child: &Path,
    policy: Option<&ParentPolicy>,
) -> Result<String> {
    let pabs = std::fs::canonicalize(parent).map_err(DiskError::io(parent, "resolve path"))?;
    let cdir = canonical_dir_of(child)?;
    let inside = pabs
        .strip_prefix(&cdir)
        .ok()
        .filter(|r| !r.as_os_str().is_empty());
    let chosen: &Path = match inside {
        Some(rel) => rel,
        None => {
            if let Some(p) = policy {
                let allowed = p.anywhere || p.canonical_dirs().iter().any(|d| pabs.starts_with(d));
                if !allowed {
                    return Err(DiskError::ParentOutside {
                        path: child.to_path_buf(),
                        parent: pabs.clone(),
                        reason: format!(
                            "is outside the new layer's directory {}; {HINT}",
                            cdir.display()
                        ),
                    });
                }
            }
            &pabs
        }
    };
    let s = chosen.to_str().ok_or_else(|| DiskError::BadChain {
        path: child.to_path_buf(),
        reason: format!("parent path {} is not UTF-8", pabs.display()),
    })?;
    if s.is_empty() || s.len() > MAX_PARENT_PATH {
        return Err(DiskError::BadChain {
            path: child.to_path_buf(),
            reason: format!(
                "parent path {} is longer than {MAX_PARENT_PATH} bytes",
                pabs.display()
            ),
        });
    }
    Ok(s.to_string())
}
