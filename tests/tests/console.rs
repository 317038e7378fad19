//! The serial console when its reader stalls: guest output must never block a vCPU, so the API
//! keeps answering and Strata still exits, and what could not be written is counted in
//! `GET /v1/vm` as `console.dropped_bytes`. The guest makes the output with `flood KIB`.
//!
//! The time limits here are hang guards, not speed checks: guest code is emulated at about a
//! million instructions per second on our KVM and every console byte is two VM exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::types::{VmInfo, VmState};
use api::{Client, LifecycleAction};
use strata_tests::{api_client, require_kvm, strata_bin, Vm, BOOT_TIMEOUT};

/// How long one API call, or the VMM's exit, may take before the test calls it a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);
/// How long the guest may take to print enough to fill the pipe and the VMM's buffer
/// (a few hundred KiB at some tens of KiB/s).
const FILL_GUARD: Duration = Duration::from_secs(180);

/// `strata run` whose console output goes to a pipe that the test reads up to the guest's
/// ready line and then holds open without ever reading again.
struct StalledConsole {
    child: Child,
    stdin: ChildStdin,
    /// The read end of the console pipe: kept open, never read after boot.
    _stdout: BufReader<ChildStdout>,
    stderr: tempfile::NamedTempFile,
}

impl StalledConsole {
    fn start(args: &[&str]) -> Self {
        require_kvm();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(strata_bin())
            .arg("run")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen().unwrap()))
            .spawn()
            .expect("start strata");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // The smallest pipe there is (one page), so that the VMM's own buffer is what fills.
        // Best effort: with the default 64 KiB the guest just prints a little longer.
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; no memory is passed.
        unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };

        // Read up to the ready line on a thread (a hang guard), then take the pipe back.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.contains("strata test guest ready") => {
                        let _ = tx.send(reader);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
        let Ok(stdout) = rx.recv_timeout(BOOT_TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the guest was not ready in time; stderr: {}",
                std::fs::read_to_string(stderr.path()).unwrap_or_default()
            );
        };
        Self {
            child,
            stdin,
            _stdout: stdout,
            stderr,
        }
    }

    /// Types `text` on the guest's console.
    fn send(&mut self, text: &str) {
        self.stdin.write_all(text.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn wait_exit(&mut self, guard: Duration) -> ExitStatus {
        let deadline = Instant::now() + guard;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "strata did not exit within {guard:?} with its console reader stalled; \
                 stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StalledConsole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /v1/vm` until `pred` holds; returns that answer.
fn wait_vm(c: &Client, guard: Duration, what: &str, pred: impl Fn(&VmInfo) -> bool) -> VmInfo {
    let deadline = Instant::now() + guard;
    loop {
        let info = c.vm().expect("GET /v1/vm");
        if pred(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {guard:?}: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn api_answers_and_output_is_dropped_while_the_console_reader_is_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut vm = StalledConsole::start(&[
        "--vcpus",
        "1",
        "--memory",
        "64M",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let c = api_client(&sock);
    assert_eq!(c.vm().unwrap().console.dropped_bytes, 0);

    // 4 MiB of output into a pipe nobody reads: the guest keeps printing, the VMM drops.
    vm.send("flood 4096\n");
    let before = wait_vm(&c, FILL_GUARD, "dropped console output", |i| {
        i.console.dropped_bytes > 0
    });
    assert_eq!(before.state, VmState::Running);

    // Each call answers although the guest is in the middle of writing to its console.
    let paused = c.lifecycle(LifecycleAction::Pause).expect("pause");
    assert_eq!(paused.state, VmState::Paused);
    // Paused vCPUs write nothing, so nothing more is dropped.
    let at_pause = paused.console.dropped_bytes;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.vm().unwrap().console.dropped_bytes, at_pause);

    let resumed = c.lifecycle(LifecycleAction::Resume).expect("resume");
    assert_eq!(resumed.state, VmState::Running);
    // The guest runs on and keeps printing into the full buffer.
    wait_vm(&c, HANG_GUARD, "more dropped output after resume", |i| {
        i.console.dropped_bytes > at_pause
    });

    let stopped = c.lifecycle(LifecycleAction::Stop).expect("stop");
    assert_eq!(
        (stopped.state, stopped.last_exit.as_deref()),
        (VmState::Off, Some("stopped"))
    );
    assert!(stopped.console.dropped_bytes > at_pause);
    // The VMM is still there for the next call.
    assert_eq!(c.vm().unwrap().state, VmState::Off);
}

#[test]
fn strata_exits_after_poweroff_while_the_console_reader_is_stalled() {
    let mut vm = StalledConsole::start(&["--vcpus", "1", "--memory", "64M"]);
    // More than the pipe and the VMM's buffer hold; the guest reads `poweroff` after it.
    vm.send("flood 384\npoweroff\n");
    let status = vm.wait_exit(FILL_GUARD + HANG_GUARD);
    let stderr = vm.stderr();
    assert!(status.success(), "{status}; stderr: {stderr}");
    // Strata gave up writing the rest out to a reader that took nothing, and said so.
    assert!(
        stderr.contains("console output left unwritten"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("bytes of console output never reached the console"),
        "stderr: {stderr}"
    );
}

#[test]
fn flood_output_reaches_a_reader_whole_and_in_order() {
    let mut vm = Vm::start(&["--vcpus", "1", "--memory", "64M"]);
    vm.wait_ready();
    let lines = vm.command("flood 16").ok();
    assert_eq!(lines.len(), 16 * 16);
    for (n, line) in lines.iter().enumerate() {
        let letters: String = (0..53)
            .map(|i| char::from(b'a' + ((n + i) % 26) as u8))
            .collect();
        assert_eq!(*line, format!("{n:08} {letters}"), "line {n}");
    }
    assert_eq!(vm.command("flood 0").ok(), Vec::<String>::new());
    assert_eq!(
        vm.command("flood").status,
        Err("usage: flood KIB".to_string())
    );
    assert_eq!(
        vm.command("flood 1048577").status,
        Err("size too large".to_string())
    );
    assert_eq!(vm.line("echo still here"), "still here");
}
