#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure is a test failure
//! End-to-end tests of Strata: each test starts the `strata` binary, boots the test guest
//! under KVM and drives it through its serial console, as a user at a terminal would.
//!
//! This library is the harness: [`Vm`] runs `strata run` with piped stdio and speaks the test
//! guest's console protocol (a command line in, output lines, then `ok` or `err <reason>`).
//! The tests need `/dev/kvm`: without it they fail loudly rather than skip.

pub mod checkpoint_setup;
pub mod linux;
pub mod schemathesis;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a console command may take: guest code runs at ~1 M instructions/s on PVM.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to boot and start its CPUs.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The `strata` binary built next to the test executables (or `$STRATA_BIN`).
pub fn strata_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/strata
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join("strata");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo test --workspace` builds the debug one, `cargo build --release --bin strata` the release one)",
        bin.display()
    );
    bin
}

/// Connects to port `port` in the guest through the vsock device's host socket `uds`
/// (`CONNECT <port>` / `OK <local port>`).
pub fn vsock_connect(uds: &std::path::Path, port: u32) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}: {e}",
                    uds.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set a read timeout");
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("send CONNECT");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(
            stream.read(&mut byte).expect("read the handshake"),
            1,
            "handshake cut short"
        );
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    assert!(line.starts_with("OK "), "handshake refused: {line:?}");
    stream
}

/// Fails the test unless KVM is usable.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "/dev/kvm is missing or not accessible: these tests need KVM"
    );
}

/// How long an API call may take before a test calls it hung (a hang guard, not a speed limit).
pub const API_HANG_GUARD: Duration = Duration::from_secs(60);

/// A client of the API socket `sock`, once the VMM answers on it (within [`API_HANG_GUARD`]);
/// its calls fail after [`API_HANG_GUARD`] instead of hanging the test.
pub fn api_client(sock: &std::path::Path) -> api::Client {
    let deadline = Instant::now() + API_HANG_GUARD;
    loop {
        if let Ok(c) = api::Client::new(sock) {
            if c.vm().is_ok() {
                return c.with_timeout(API_HANG_GUARD);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the API socket {} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a benchmark runs in full. `cargo bench` passes `--bench` to a bench binary; `cargo
/// test` runs the benches too (they are test targets) without it, and they then run once at a
/// small scale, so the test suite compiles and exercises them and they cannot rot.
pub fn bench_is_full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A running `strata run` and its console.
pub struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every console line so far, for failure messages.
    pub transcript: Vec<String>,
}

/// The reply to a console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Output lines before the status line.
    pub lines: Vec<String>,
    /// `Ok(())` for `ok`, `Err(reason)` for `err <reason>`.
    pub status: Result<(), String>,
}

impl Reply {
    /// The output of a command that must succeed.
    pub fn ok(self) -> Vec<String> {
        match self.status {
            Ok(()) => self.lines,
            Err(e) => panic!("command failed: err {e} (output {:?})", self.lines),
        }
    }
}

/// A `strata` process started by [`spawn_console`]: the child, its stdin, its stdout as lines
/// and its stderr as it accumulates.
pub struct Console {
    /// The process.
    pub child: Child,
    /// Its stdin (the guest's console input).
    pub stdin: Option<ChildStdin>,
    /// Its stdout, line by line.
    pub lines: Receiver<String>,
    /// Everything it wrote to stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

/// Starts `strata SUBCOMMAND ARGS...` with its console on piped stdio (lines read on a thread,
/// stderr collected on another).
pub fn spawn_console(subcommand: &str, args: &[&str]) -> Console {
    spawn_console_with(subcommand, args, &[])
}

/// [`spawn_console`] with `env` added to strata's environment (test hooks).
pub fn spawn_console_with(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Console {
    require_kvm();
    let mut child = Command::new(strata_bin())
        .arg(subcommand)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start strata");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        sink.lock().unwrap().push_str(&s);
    });
    let stdin = child.stdin.take();
    Console {
        child,
        stdin,
        lines,
        stderr,
    }
}

impl Vm {
    /// Starts `strata run` with `args`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Starts `strata run` with `args` and `env` added to its environment (test hooks).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let Console {
            child,
            stdin,
            lines,
            stderr,
        } = spawn_console_with("run", args, env);
        Self {
            child,
            stdin,
            lines,
            stderr,
            transcript: Vec::new(),
        }
    }

    /// The next console line within `timeout`, or `None`; panics if the console closed.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.transcript.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!(
                "console closed; stderr: {}\nconsole so far:\n{}",
                self.stderr(),
                self.transcript.join("\n")
            ),
        }
    }

    /// The next console line, or panics after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> String {
        self.try_line(timeout).unwrap_or_else(|| {
            panic!(
                "no console line within {timeout:?}; console so far:\n{}",
                self.transcript.join("\n")
            )
        })
    }

    /// Reads lines until one satisfies `pred`; returns it.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left.max(Duration::from_millis(1)));
            if pred(&line) {
                return line;
            }
        }
    }

    /// Waits for the guest's ready line and returns the CPU count it reports.
    pub fn wait_ready(&mut self) -> u32 {
        let line = self.wait_for(BOOT_TIMEOUT, |l| l.contains("strata test guest ready"));
        line.rsplit("cpus=")
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("bad ready line {line:?}"))
    }

    /// Writes raw bytes to the console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("console input is open");
        stdin.write_all(text.as_bytes()).expect("write console");
        stdin.flush().expect("flush console");
    }

    /// Runs a console command and returns its reply.
    pub fn command(&mut self, cmd: &str) -> Reply {
        self.send(&format!("{cmd}\n"));
        // The guest echoes the line after its prompt.
        let echo = format!("> {cmd}");
        self.wait_for(COMMAND_TIMEOUT, |l| l.ends_with(&echo));
        read_reply(|| self.next_line(COMMAND_TIMEOUT))
    }

    /// Runs a command that must succeed and returns its single output line.
    pub fn line(&mut self, cmd: &str) -> String {
        let mut out = self.command(cmd).ok();
        assert_eq!(out.len(), 1, "{cmd}: expected one line, got {out:?}");
        out.remove(0)
    }

    /// Waits for `strata` to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_console_exit(
            &mut self.child,
            &self.lines,
            &mut self.transcript,
            "strata",
            timeout,
        )
    }

    /// The `strata` process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What `strata` wrote to stderr (complete once it has exited).
    pub fn stderr(&self) -> String {
        // Give the reader thread a moment to collect the last bytes.
        std::thread::sleep(Duration::from_millis(50));
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a console command's reply after its echo: output lines from `next_line` up to `ok`
/// or `err <reason>`.
pub(crate) fn read_reply(mut next_line: impl FnMut() -> String) -> Reply {
    let mut lines = Vec::new();
    loop {
        let line = next_line();
        if line == "ok" {
            return Reply {
                lines,
                status: Ok(()),
            };
        }
        if let Some(reason) = line.strip_prefix("err") {
            return Reply {
                lines,
                status: Err(reason.trim().to_string()),
            };
        }
        lines.push(line);
    }
}

/// Waits for `child` (`what`, for the message) to exit, keeping `transcript` complete with the
/// console `lines` for failure messages; kills it and panics after `timeout`.
pub(crate) fn wait_console_exit(
    child: &mut Child,
    lines: &Receiver<String>,
    transcript: &mut Vec<String>,
    what: &str,
    timeout: Duration,
) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait strata") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{what} did not exit within {timeout:?}; console:\n{}",
                transcript.join("\n")
            );
        }
        while let Ok(line) = lines.try_recv() {
            transcript.push(line);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Name`, `Seccomp` and `NoNewPrivs` of every thread of process `pid`, by thread id.
pub fn thread_status(pid: u32) -> std::collections::BTreeMap<u32, (String, String, String)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let entry = entry.unwrap();
        let tid: u32 = entry.file_name().to_str().unwrap().parse().unwrap();
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.insert(
            tid,
            (field("Name:"), field("Seccomp:"), field("NoNewPrivs:")),
        );
    }
    out
}
