//! A raw HTTP/1.1 client over a Unix socket that sends exactly the bytes a test wants
//! (malformed bodies, wrong methods) without going through `api::Client`. Shared by the API's
//! integration tests and, through `#[path]`, the end-to-end API tests of `tests/`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a test waits for an answer before it calls the server hung.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// An answer as it came off the socket.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap().to_owned()
    }
}

/// Sends one request with `Connection: close` and reads the answer to EOF; panics if the
/// server does not finish answering within [`HANG_GUARD`].
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    // The server may answer (413) and close before reading a large body: ignore write errors.
    let _ = s.write_all(&bytes);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("{method} {path}: the server hung (no complete answer within {HANG_GUARD:?})")
        }
        // A reset after the answer (413 before the body was read) still leaves the answer.
        Err(_) => {}
    }
    parse(&out)
}

/// Parses a complete HTTP/1.1 response.
pub fn parse(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}

pub fn get(sock: &Path, path: &str) -> Resp {
    http(sock, "GET", path, None)
}

pub fn post(sock: &Path, path: &str, body: &str) -> Resp {
    http(sock, "POST", path, Some(body.as_bytes()))
}

pub fn put(sock: &Path, path: &str, body: &str) -> Resp {
    http(sock, "PUT", path, Some(body.as_bytes()))
}
