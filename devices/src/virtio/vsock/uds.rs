//! The host side of the Unix-socket backend: the `CONNECT <port>\n` handshake line and
//! non-blocking connects to `<uds>_<port>` for guest-initiated connections.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest handshake line accepted, newline excluded.
pub const MAX_LINE: usize = 64;

/// What a host client's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// No complete line yet.
    Incomplete,
    /// `CONNECT <port>`; `rest` is whatever followed the newline (data for the guest).
    Connect {
        /// The guest port.
        port: u32,
        /// Bytes after the line.
        rest: Vec<u8>,
    },
    /// Anything else: the client is closed.
    Invalid,
}

/// Parses the handshake from the bytes received so far.
pub fn parse_handshake(buf: &[u8]) -> Handshake {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_LINE {
            Handshake::Invalid
        } else {
            Handshake::Incomplete
        };
    };
    if nl > MAX_LINE {
        return Handshake::Invalid;
    }
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Handshake::Invalid;
    };
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(port), None) => match port.parse::<u32>() {
            Ok(port) => Handshake::Connect {
                port,
                rest: buf[nl + 1..].to_vec(),
            },
            Err(_) => Handshake::Invalid,
        },
        _ => Handshake::Invalid,
    }
}

/// `<uds>_<port>`: where a guest connection to host port `port` goes.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// fails (EAGAIN) instead of stalling the device thread.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, initialised sockaddr_un of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_with_trailing_data_keeps_the_data() {
        assert_eq!(
            parse_handshake(b"CONNECT 52\nhello"),
            Handshake::Connect {
                port: 52,
                rest: b"hello".to_vec()
            }
        );
        assert_eq!(
            parse_handshake(b"CONNECT 1234\r\n"),
            Handshake::Connect {
                port: 1234,
                rest: vec![]
            }
        );
    }

    #[test]
    fn partial_garbage_and_long_lines_are_told_apart() {
        assert_eq!(parse_handshake(b"CONN"), Handshake::Incomplete);
        assert_eq!(parse_handshake(b"HELLO 52\n"), Handshake::Invalid);
        assert_eq!(parse_handshake(b"CONNECT x\n"), Handshake::Invalid);
        assert_eq!(
            parse_handshake(b"CONNECT 99999999999\n"),
            Handshake::Invalid
        );
        assert_eq!(parse_handshake(b"CONNECT 1 2\n"), Handshake::Invalid);
        assert_eq!(parse_handshake(&[b'C'; 65]), Handshake::Invalid);
        let mut long = vec![b' '; 70];
        long.extend_from_slice(b"CONNECT 1\n");
        assert_eq!(parse_handshake(&long), Handshake::Invalid);
    }

    #[test]
    fn port_path_appends_the_port() {
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 1234),
            PathBuf::from("/tmp/v.sock_1234")
        );
    }

    #[test]
    fn nonblocking_connect_reports_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_nonblocking(&dir.path().join("nope")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("yes")).unwrap();
        connect_nonblocking(&dir.path().join("yes")).unwrap();
        l.accept().unwrap();
    }
}
