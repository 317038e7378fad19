//! The host side of the guest agent: a client over the vsock device's Unix socket.
//!
//! The agent (`resources/guest-agent`, and the test guest) listens on vsock port
//! [`AGENT_PORT`] inside the guest. The host reaches it through the virtio-vsock device's
//! Unix-socket backend:
//! 1. connect to the device's socket (`--vsock socket=PATH`);
//! 2. write `CONNECT 52\n`; the device asks the guest and answers `OK <local-port>\n`, or
//!    closes the socket when nothing listens on port 52 in the guest;
//! 3. then one JSON object per line each way: a [`protocol::Request`], answered by
//!    `{"ok":true,...}` with the operation's fields or `{"ok":false,"error":"..."}`.
//!
//! Every step has a deadline: [`AgentClient::connect`]'s `timeout` bounds the handshake and
//! every reply; `exec` and `freeze` wait their own `timeout_s` on top. After a timeout or a
//! malformed reply the connection is out of step with the agent and refuses further requests
//! ([`AgentError::Broken`]): connect again.
//!
//! Used by the API (`/v1/guest`) and by the checkpoint engine (production checkpoints freeze
//! and thaw through it).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize as _;

/// The wire format, shared by every user of the agent protocol: defined once in the
/// `strata-guest-agent` crate, which the Linux agent is built from too.
pub use strata_guest_agent::protocol;

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = protocol::AGENT_PORT;
/// Longest reply line accepted (exec output included).
const MAX_REPLY: usize = 16 << 20;

use protocol::{ExecReply, FreezeReply, Request, Status};

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The vsock device's socket is missing or refuses connections.
    #[error("cannot reach the vsock socket {}", path.display())]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device closed the connection instead of `OK`: nothing listens on the agent port
    /// in the guest (no agent, or the guest has no vsock driver yet).
    #[error("no guest agent listens on vsock port {AGENT_PORT} (via {})", path.display())]
    HandshakeRefused {
        /// The socket.
        path: PathBuf,
    },
    /// No answer in time.
    #[error("guest agent: no answer to {op} within {after:?}")]
    Timeout {
        /// The operation (`connect` for the handshake).
        op: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The agent answered `ok:false`.
    #[error("guest agent: {op} failed: {message}")]
    Agent {
        /// The operation.
        op: &'static str,
        /// The agent's error.
        message: String,
    },
    /// The reply was not what the protocol says.
    #[error("guest agent: malformed reply to {op}: {detail}")]
    Malformed {
        /// The operation (`connect` for the handshake).
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The connection failed mid-request.
    #[error("guest agent: connection lost during {op}")]
    Io {
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An earlier timeout or malformed reply left the connection out of step.
    #[error("guest agent connection unusable after an earlier error; reconnect")]
    Broken,
}

impl AgentError {
    /// Whether the agent could not be reached or did not answer (the API's 503), as opposed
    /// to an agent that answered with an error or nonsense.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            AgentError::Unreachable { .. }
                | AgentError::HandshakeRefused { .. }
                | AgentError::Timeout { .. }
                | AgentError::Io { .. }
                | AgentError::Broken
        )
    }
}

/// A bound on calls in flight at once: each call holds a [`CallSlot`] while it runs, and a
/// call that finds every slot taken is refused at once instead of queueing (or starting yet
/// another thread and vsock connection).
#[derive(Debug)]
pub struct CallSlots {
    max: usize,
    used: AtomicUsize,
}

/// One call's place among [`CallSlots`]; given back when dropped.
#[derive(Debug)]
pub struct CallSlot<'a> {
    slots: &'a CallSlots,
}

impl CallSlots {
    /// At most `max` calls at once (usable in a `static`).
    pub const fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// A slot, or `None` when `max` calls are in flight.
    pub fn try_take(&self) -> Option<CallSlot<'_>> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| CallSlot { slots: self })
    }

    /// Calls in flight.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        self.slots.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A command's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code.
    pub exit_code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A connection to the guest agent.
pub struct AgentClient {
    stream: UnixStream,
    /// Bytes received after the last complete line.
    lines: LineBuffer,
    timeout: Duration,
    broken: bool,
}

/// Why [`LineBuffer::next_line`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// More than the allowed bytes arrived without a newline.
    #[error("reply longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// The line is not UTF-8.
    #[error("reply is not UTF-8")]
    NotUtf8,
}

/// Splits a byte stream into newline-terminated lines in linear time: every byte is looked at
/// once for the newline, however the stream is cut into reads (the scan resumes where the
/// last one stopped instead of starting again at the front of the buffer).
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no newline.
    scanned: usize,
    /// Bytes looked at for a newline so far, over the buffer's life.
    examined: u64,
}

impl LineBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered (received and not yet returned as a line).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes looked at for a newline so far: at most the bytes pushed (each once).
    pub fn bytes_examined(&self) -> u64 {
        self.examined
    }

    /// The next complete line, without its newline, if one arrived. A line (or, before its
    /// newline arrived, the bytes buffered) longer than `max` bytes is an error; so is a line
    /// that is not UTF-8 (the line is consumed either way).
    pub fn next_line(&mut self, max: usize) -> Result<Option<String>, LineError> {
        let found = self.buf[self.scanned..].iter().position(|&b| b == b'\n');
        let looked = found.map_or(self.buf.len() - self.scanned, |at| at + 1);
        self.examined = self.examined.saturating_add(looked as u64);
        let Some(at) = found else {
            self.scanned = self.buf.len();
            if self.buf.len() > max {
                return Err(LineError::TooLong { max });
            }
            return Ok(None);
        };
        let nl = self.scanned + at;
        let rest = self.buf.split_off(nl + 1);
        let mut line = std::mem::replace(&mut self.buf, rest);
        self.scanned = 0;
        line.truncate(nl);
        if line.len() > max {
            return Err(LineError::TooLong { max });
        }
        String::from_utf8(line)
            .map(Some)
            .map_err(|_| LineError::NotUtf8)
    }
}

/// Decodes a reply line to `op`: a JSON object with a boolean `ok`; `ok:false` is the agent's
/// error with its message. Returns the whole object of a successful reply.
pub fn decode_reply(op: &'static str, line: &str) -> Result<serde_json::Value, AgentError> {
    let malformed = |detail: String| AgentError::Malformed { op, detail };
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| malformed(format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(malformed("not a JSON object".into()));
    }
    let status = Status::deserialize(&v).map_err(|e| malformed(format!("no valid `ok`: {e}")))?;
    if !status.ok {
        return Err(AgentError::Agent {
            op,
            message: status.error.unwrap_or_else(|| "unspecified error".into()),
        });
    }
    Ok(v)
}

/// Decodes an operation's fields from a successful reply ([`decode_reply`]).
pub fn reply_fields<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
    op: &'static str,
) -> Result<T, AgentError> {
    T::deserialize(v).map_err(|e| AgentError::Malformed {
        op,
        detail: e.to_string(),
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl AgentClient {
    /// Connects to the vsock device's socket at `uds_path` and to the agent's port behind it.
    /// `timeout` bounds the handshake and, later, every reply.
    pub fn connect(uds_path: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let unreachable = |source| AgentError::Unreachable {
            path: uds_path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(uds_path).map_err(unreachable)?;
        let mut client = Self {
            stream,
            lines: LineBuffer::new(),
            timeout,
            broken: false,
        };
        let deadline = Instant::now() + timeout;
        client
            .write_all(
                format!("CONNECT {AGENT_PORT}\n").as_bytes(),
                "connect",
                deadline,
            )
            .map_err(|e| match e {
                // The device closed on us before the line went out: treat like a refusal.
                AgentError::Io { .. } => AgentError::HandshakeRefused {
                    path: uds_path.to_path_buf(),
                },
                e => e,
            })?;
        let line = match client.read_line("connect", deadline, 64) {
            Ok(line) => line,
            Err(AgentError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(AgentError::HandshakeRefused {
                    path: uds_path.to_path_buf(),
                })
            }
            Err(e) => return Err(e),
        };
        let ok = line
            .strip_prefix("OK ")
            .is_some_and(|port| port.trim().parse::<u32>().is_ok());
        if !ok {
            return Err(AgentError::Malformed {
                op: "connect",
                detail: format!("expected `OK <port>`, got {:?}", truncate(&line)),
            });
        }
        Ok(client)
    }

    /// Checks that the agent answers.
    pub fn ping(&mut self) -> Result<(), AgentError> {
        self.call(&Request::Ping {}, Duration::ZERO).map(|_| ())
    }

    /// The agent's `info` reply (version, kernel, hostname, and whatever else it adds),
    /// without `ok`.
    pub fn info(&mut self) -> Result<serde_json::Value, AgentError> {
        let mut v = self.call(&Request::Info {}, Duration::ZERO)?;
        if let Some(map) = v.as_object_mut() {
            map.remove("ok");
        }
        Ok(v)
    }

    /// Runs `argv` in the guest, killed after `timeout_s` seconds; waits that long plus the
    /// client's timeout for the reply.
    pub fn exec(&mut self, argv: &[String], timeout_s: u64) -> Result<ExecResult, AgentError> {
        let req = Request::Exec {
            argv: argv.to_vec(),
            timeout_s,
        };
        let v = self.call(&req, Duration::from_secs(timeout_s))?;
        let r: ExecReply = self.fields(&v, "exec")?;
        Ok(ExecResult {
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
        })
    }

    /// Quiesces the guest (hooks, sync, FIFREEZE); the agent thaws by itself after
    /// `timeout_s` seconds. Returns the frozen mount points.
    pub fn freeze(&mut self, timeout_s: u64) -> Result<Vec<String>, AgentError> {
        let reply = self.freeze_reply(timeout_s)?;
        let r: FreezeReply = self.fields(&serde_json::Value::Object(reply), "freeze")?;
        Ok(r.frozen)
    }

    /// Like [`AgentClient::freeze`], but returns the whole reply without `ok`: `frozen` (checked
    /// to be a list of mount points) and whatever else the agent reports (the test guest adds
    /// its log position, `log_records`).
    pub fn freeze_reply(
        &mut self,
        timeout_s: u64,
    ) -> Result<serde_json::Map<String, serde_json::Value>, AgentError> {
        let v = self.call(
            &Request::Freeze { timeout_s },
            Duration::from_secs(timeout_s),
        )?;
        let _: FreezeReply = self.fields(&v, "freeze")?;
        let mut map = match v {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        map.remove("ok");
        Ok(map)
    }

    /// Thaws what `freeze` froze.
    pub fn thaw(&mut self) -> Result<(), AgentError> {
        self.thaw_waiting(Duration::ZERO)
    }

    /// Like [`AgentClient::thaw`], waiting `extra` beyond the client's timeout for the reply
    /// (the agent runs the thaw hooks before it answers).
    pub fn thaw_waiting(&mut self, extra: Duration) -> Result<(), AgentError> {
        self.call(&Request::Thaw {}, extra).map(|_| ())
    }

    /// Decodes an operation's fields from a successful reply.
    fn fields<T: serde::de::DeserializeOwned>(
        &mut self,
        v: &serde_json::Value,
        op: &'static str,
    ) -> Result<T, AgentError> {
        reply_fields(v, op).inspect_err(|_| self.broken = true)
    }

    /// Sends `req` and returns its successful reply; waits the client's timeout plus `extra`.
    fn call(&mut self, req: &Request, extra: Duration) -> Result<serde_json::Value, AgentError> {
        if self.broken {
            return Err(AgentError::Broken);
        }
        let op = req.op();
        let result = self.exchange(req, op, self.timeout.saturating_add(extra));
        if matches!(
            result,
            Err(AgentError::Timeout { .. } | AgentError::Malformed { .. } | AgentError::Io { .. })
        ) {
            self.broken = true;
        }
        result
    }

    fn exchange(
        &mut self,
        req: &Request,
        op: &'static str,
        wait: Duration,
    ) -> Result<serde_json::Value, AgentError> {
        let deadline = Instant::now() + wait;
        let mut line = serde_json::to_vec(req).map_err(|e| AgentError::Malformed {
            op,
            detail: format!("cannot encode the request: {e}"),
        })?;
        line.push(b'\n');
        self.write_all(&line, op, deadline)?;
        let reply = self.read_line(op, deadline, MAX_REPLY)?;
        decode_reply(op, &reply)
    }

    fn write_all(
        &mut self,
        mut data: &[u8],
        op: &'static str,
        deadline: Instant,
    ) -> Result<(), AgentError> {
        while !data.is_empty() {
            let left = remaining(deadline, op, self.timeout)?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|source| AgentError::Io { op, source })?;
            match self.stream.write(data) {
                Ok(0) => {
                    return Err(AgentError::Io {
                        op,
                        source: io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(AgentError::Timeout {
                        op,
                        after: self.timeout,
                    })
                }
                Err(source) => return Err(AgentError::Io { op, source }),
            }
        }
        Ok(())
    }

    /// Reads one line (without the newline) of at most `max` bytes by `deadline`.
    fn read_line(
        &mut self,
        op: &'static str,
        deadline: Instant,
        max: usize,
    ) -> Result<String, AgentError> {
        let started = Instant::now();
        let mut chunk = [0u8; 8192];
        loop {
            match self.lines.next_line(max) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => {}
                Err(e) => {
                    return Err(AgentError::Malformed {
                        op,
                        detail: e.to_string(),
                    })
                }
            }
            let waited = deadline.saturating_duration_since(started);
            let left = remaining(deadline, op, waited)?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| AgentError::Io { op, source })?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(AgentError::Io {
                        op,
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => self.lines.push(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(AgentError::Timeout { op, after: waited });
                }
                Err(source) => return Err(AgentError::Io { op, source }),
            }
        }
    }
}

/// Time left until `deadline` (never zero, which would mean "no timeout" to the socket).
fn remaining(deadline: Instant, op: &'static str, after: Duration) -> Result<Duration, AgentError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(AgentError::Timeout { op, after });
    }
    Ok(left)
}

/// At most 80 characters of `s`, for error messages.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    const T: Duration = Duration::from_secs(5);

    /// What the fake agent does with one request line.
    enum Act {
        Reply(String),
        Silence,
        Close,
    }

    /// A fake vsock socket + agent: accepts one client, answers `CONNECT 52` with `OK`, then
    /// answers each request line with `script`'s reply. Returns the requests it saw.
    fn fake_agent(
        dir: &tempfile::TempDir,
        script: impl Fn(&str) -> Act + Send + 'static,
    ) -> (PathBuf, JoinHandle<Vec<String>>) {
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 52\n");
            w.write_all(b"OK 1073741824\n").unwrap();
            let mut seen = Vec::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return seen;
                }
                seen.push(line.trim_end().to_string());
                match script(line.trim_end()) {
                    Act::Reply(reply) => {
                        // Split the reply to exercise partial reads.
                        let (a, b) = reply.split_at(reply.len() / 2);
                        w.write_all(a.as_bytes()).unwrap();
                        w.flush().unwrap();
                        std::thread::sleep(Duration::from_millis(5));
                        w.write_all(b.as_bytes()).unwrap();
                        w.write_all(b"\n").unwrap();
                    }
                    Act::Silence => std::thread::sleep(Duration::from_millis(500)),
                    Act::Close => return seen,
                }
            }
        });
        (path, handle)
    }

    #[test]
    fn ping_info_freeze_thaw_and_exec_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (path, agent) = fake_agent(&dir, |req| {
            let v: serde_json::Value = serde_json::from_str(req).unwrap();
            Act::Reply(match v["op"].as_str().unwrap() {
                "ping" => r#"{"ok":true}"#.into(),
                "info" => {
                    r#"{"ok":true,"version":"0.1.0","kernel":"6.1.0","hostname":"g","extra":1}"#
                        .into()
                }
                "freeze" => r#"{"ok":true,"frozen":["/","/data"]}"#.into(),
                "thaw" => r#"{"ok":true}"#.into(),
                "exec" => r#"{"ok":true,"exit_code":3,"stdout":"out\n","stderr":"err"}"#.into(),
                _ => r#"{"ok":false,"error":"unknown op"}"#.into(),
            })
        });
        let mut c = AgentClient::connect(&path, T).unwrap();
        c.ping().unwrap();
        let info = c.info().unwrap();
        assert_eq!(info["kernel"], "6.1.0");
        assert!(info.get("ok").is_none());
        assert_eq!(
            c.freeze(30).unwrap(),
            vec!["/".to_string(), "/data".to_string()]
        );
        c.thaw().unwrap();
        let r = c
            .exec(&["sh".into(), "-c".into(), "exit 3".into()], 10)
            .unwrap();
        assert_eq!(
            r,
            ExecResult {
                exit_code: 3,
                stdout: "out\n".into(),
                stderr: "err".into()
            }
        );
        drop(c);
        let seen = agent.join().unwrap();
        assert_eq!(seen[0], r#"{"op":"ping"}"#);
        assert_eq!(seen[2], r#"{"op":"freeze","timeout_s":30}"#);
        assert_eq!(
            seen[4],
            r#"{"op":"exec","argv":["sh","-c","exit 3"],"timeout_s":10}"#
        );
    }

    #[test]
    fn replies_encoded_by_the_agent_crate_decode_in_the_client() {
        use protocol::{ok_line, Empty, ExecReply, FreezeReply, ThawReply};
        let dir = tempfile::tempdir().unwrap();
        let (path, _agent) = fake_agent(&dir, |req| {
            let line = match protocol::parse_request(req.as_bytes()).unwrap() {
                Request::Freeze { .. } => ok_line(&FreezeReply {
                    frozen: vec!["/".into()],
                }),
                Request::Thaw {} => ok_line(&ThawReply {
                    thawed: vec!["/".into()],
                    lease_expired: false,
                }),
                Request::Exec { .. } => ok_line(&ExecReply {
                    exit_code: 124,
                    stdout: String::new(),
                    stderr: "killed".into(),
                    truncated: false,
                    timed_out: true,
                }),
                _ => ok_line(&Empty {}),
            };
            Act::Reply(line.trim_end().to_string())
        });
        let mut c = AgentClient::connect(&path, T).unwrap();
        c.ping().unwrap();
        assert_eq!(c.freeze(30).unwrap(), vec!["/".to_string()]);
        c.thaw().unwrap();
        let r = c.exec(&["sleep".into(), "9".into()], 1).unwrap();
        assert_eq!((r.exit_code, r.stderr.as_str()), (124, "killed"));
    }

    #[test]
    fn agent_error_reply_carries_its_message_and_keeps_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _agent) = fake_agent(&dir, |req| {
            if req.contains("freeze") {
                Act::Reply(r#"{"ok":false,"error":"FIFREEZE /: busy"}"#.into())
            } else {
                Act::Reply(r#"{"ok":true}"#.into())
            }
        });
        let mut c = AgentClient::connect(&path, T).unwrap();
        let err = c.freeze(5).unwrap_err();
        assert!(
            matches!(&err, AgentError::Agent { op: "freeze", message } if message == "FIFREEZE /: busy"),
            "{err:?}"
        );
        assert!(!err.is_unavailable());
        c.ping().unwrap();
    }

    #[test]
    fn missing_socket_is_unreachable_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.sock");
        let err = AgentClient::connect(&path, T).err().unwrap();
        assert!(matches!(err, AgentError::Unreachable { .. }));
        assert!(err.to_string().contains("nope.sock"));
        assert!(err.is_unavailable());
    }

    #[test]
    fn device_closing_after_connect_is_a_refused_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            io::BufReader::new(&s).read_line(&mut line).unwrap();
            // Nothing listens on port 52: the device closes the client.
        });
        let err = AgentClient::connect(&path, T).err().unwrap();
        t.join().unwrap();
        assert!(
            matches!(err, AgentError::HandshakeRefused { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("port 52"));
    }

    #[test]
    fn silent_device_times_out_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let _listener = UnixListener::bind(&path).unwrap(); // never accepts, never answers
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(AgentClient::connect(&path, Duration::from_millis(100)).err());
        });
        // A hang guard, not a speed check: the connect gives up by its own timeout or hangs.
        let err = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("connect hung on a silent device despite its 100 ms timeout")
            .unwrap();
        assert!(
            matches!(
                err,
                AgentError::Timeout {
                    op: "connect",
                    after
                } if after <= Duration::from_millis(100)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_handshake_answer_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"HELLO\n").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let err = AgentClient::connect(&path, T).err().unwrap();
        t.join().unwrap();
        assert!(
            matches!(err, AgentError::Malformed { op: "connect", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn reply_timeout_names_the_op_and_breaks_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _agent) = fake_agent(&dir, |_| Act::Silence);
        let mut c = AgentClient::connect(&path, Duration::from_millis(100)).unwrap();
        let err = c.ping().unwrap_err();
        assert!(
            matches!(err, AgentError::Timeout { op: "ping", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("ping"));
        assert!(matches!(c.ping().unwrap_err(), AgentError::Broken));
    }

    #[test]
    fn malformed_replies_are_reported() {
        for (reply, want) in [
            ("not json", "not JSON"),
            ("[1,2]", "not a JSON object"),
            (r#"{"ok":"yes"}"#, "ok"),
            (r#"{"ok":true}"#, "exit_code"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (path, _agent) = fake_agent(&dir, move |_| Act::Reply(reply.into()));
            let mut c = AgentClient::connect(&path, T).unwrap();
            let err = c.exec(&["true".into()], 1).unwrap_err();
            match &err {
                AgentError::Malformed { op: "exec", detail } => {
                    assert!(detail.contains(want), "{reply}: {detail}")
                }
                other => panic!("{reply}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_reply_arriving_in_small_reads_is_scanned_once() {
        // A 16 MiB reply in 8 KiB reads: the old reader rescanned the whole buffer after every
        // read (about 16 GiB of scanning); each byte must be looked at once.
        let mut lines = LineBuffer::new();
        let chunk = vec![b'x'; 8192];
        let reads = MAX_REPLY / chunk.len();
        for _ in 0..reads {
            lines.push(&chunk);
            assert_eq!(lines.next_line(MAX_REPLY), Ok(None));
        }
        lines.push(b"\n{\"ok\":true}\n");
        let line = lines.next_line(MAX_REPLY).unwrap().unwrap();
        assert_eq!(line.len(), MAX_REPLY);
        assert_eq!(
            lines.next_line(MAX_REPLY),
            Ok(Some(r#"{"ok":true}"#.to_string()))
        );
        assert_eq!(lines.next_line(MAX_REPLY), Ok(None));
        let pushed = (MAX_REPLY + 13) as u64;
        assert!(
            lines.bytes_examined() <= pushed,
            "{} bytes examined for {pushed} received",
            lines.bytes_examined()
        );
    }

    #[test]
    fn lines_split_anywhere_come_back_whole_and_in_order() {
        let stream = b"{\"ok\":true}\n\n{\"ok\":false,\"error\":\"no\"}\npartial";
        for cut in 1..stream.len() {
            let mut lines = LineBuffer::new();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                lines.push(piece);
                while let Some(l) = lines.next_line(64).unwrap() {
                    got.push(l);
                }
            }
            assert_eq!(
                got,
                [r#"{"ok":true}"#, "", r#"{"ok":false,"error":"no"}"#],
                "reads of {cut} bytes"
            );
            assert_eq!(lines.len(), b"partial".len());
        }
    }

    #[test]
    fn overlong_and_non_utf8_lines_are_refused() {
        let mut lines = LineBuffer::new();
        lines.push(&[b'a'; 65]);
        assert_eq!(lines.next_line(64), Err(LineError::TooLong { max: 64 }));
        let mut lines = LineBuffer::new();
        lines.push(b"aaaa\n");
        assert_eq!(lines.next_line(3), Err(LineError::TooLong { max: 3 }));
        let mut lines = LineBuffer::new();
        lines.push(b"\xff\xfe\n{}\n");
        assert_eq!(lines.next_line(64), Err(LineError::NotUtf8));
        assert_eq!(lines.next_line(64), Ok(Some("{}".into())));
    }

    #[test]
    fn replies_decode_to_their_status() {
        assert!(decode_reply("ping", r#"{"ok":true}"#).is_ok());
        let e = decode_reply("ping", r#"{"ok":false,"error":"nope"}"#).unwrap_err();
        assert!(matches!(e, AgentError::Agent { op: "ping", ref message } if message == "nope"));
        let e = decode_reply("ping", r#"{"ok":false}"#).unwrap_err();
        assert!(e.to_string().contains("unspecified error"), "{e}");
        for bad in ["", "null", "[]", r#"{"ok":1}"#, r#"{"error":"x"}"#, "{"] {
            assert!(
                matches!(decode_reply("ping", bad), Err(AgentError::Malformed { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn call_slots_refuse_beyond_the_bound_and_come_back_when_dropped() {
        let slots = CallSlots::new(2);
        let a = slots.try_take().unwrap();
        let b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert_eq!(slots.in_use(), 2);
        drop(a);
        let c = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        drop((b, c));
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn call_slots_hold_under_contention() {
        let slots = std::sync::Arc::new(CallSlots::new(3));
        let peak = std::sync::Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (slots, peak) = (slots.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if let Some(_s) = slots.try_take() {
                            peak.fetch_max(slots.in_use(), Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn agent_going_away_mid_request_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _agent) = fake_agent(&dir, |_| Act::Close);
        let mut c = AgentClient::connect(&path, T).unwrap();
        let err = c.info().unwrap_err();
        assert!(matches!(err, AgentError::Io { op: "info", .. }), "{err:?}");
        assert!(err.is_unavailable());
    }
}
