//! Creating the sockets Strata listens on (the API socket, the vsock device's socket): mode 0600
//! from the first moment, a stale file replaced, a live one refused.
//!
//! The socket is bound inside a fresh private folder (mode 0700) next to the requested path,
//! chmod-ed to 0600 there, and renamed into place, so there is no moment in which another user
//! could connect and the process umask is never touched. Only when that temporary path would not
//! fit in `sun_path` is the socket bound in place under a umask of 0177 (umask is process-wide,
//! so this is the fallback, not the rule).
//!
//! Before binding, an existing file at the path is probed: a socket that accepts a connection
//! belongs to a live VMM and is refused; one that refuses connections (ECONNREFUSED) is stale and
//! is replaced; anything that is not a socket is left alone and refused. Two VMMs racing for the
//! same stale path both succeed and the second rename wins; we do not lock.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Why the API socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process listens on the path.
    #[error("another process is listening on socket {0} (another VMM using the same path?)")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// The existing file could not be probed.
    #[error("cannot check the existing socket {path}")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding, chmod-ing or renaming failed.
    #[error("cannot create socket {path}")]
    Create {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The longest path that fits in `sockaddr_un.sun_path` with its NUL.
const SUN_PATH_MAX: usize = 107;

/// The socket file we created, identified by device and inode so that only our own file is
/// removed on shutdown (not one a later VMM put at the same path).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the socket file if it is still the one we created.
    pub fn remove_file(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Creates the listening socket at `path` (see the module docs).
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    probe_existing(path)?;
    let create = |source| SocketError::Create {
        path: path.to_path_buf(),
        source,
    };
    let listener = bind_private(path).map_err(create)?;
    let meta = std::fs::symlink_metadata(path).map_err(create)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, file))
}

/// Refuses a live socket or a non-socket at `path`; a stale socket or no file is fine.
fn probe_existing(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(source) => Err(SocketError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Binds in a private folder next to `path` and renames the socket into place.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = parent.join(format!(
        ".strata-sock-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join("s");
    if tmp.as_os_str().len() > SUN_PATH_MAX {
        return bind_with_umask(path);
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// Binds in place with a umask that leaves only the owner's read and write bits.
fn bind_with_umask(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail. It is restored
    // right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = result?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_socket_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let (_l, s) = bind(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        // Nothing but the socket is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        s.remove_file();
        assert!(!p.exists());
    }

    #[test]
    fn long_path_falls_back_to_umask_and_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().len();
        // Leave room for the socket name but not for the private folder.
        let name = "x".repeat(SUN_PATH_MAX - base - 2);
        let p = dir.path().join(name);
        let (_l, s) = bind(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        s.remove_file();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        drop(UnixListener::bind(&p).unwrap());
        let s = bind(&p).unwrap();
        assert!(UnixStream::connect(&p).is_ok());
        drop(s);
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let _live = UnixListener::bind(&p).unwrap();
        let err = bind(&p).unwrap_err();
        assert!(matches!(err, SocketError::InUse(_)));
        assert!(err
            .to_string()
            .contains("another process is listening on socket"));
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(bind(&p), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
    }

    #[test]
    fn replaced_socket_file_is_not_removed_by_the_old_owner() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let (_l, first) = bind(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        let _other = UnixListener::bind(&p).unwrap();
        first.remove_file();
        assert!(p.exists());
    }
}
