//! Running a program with a deadline and captured, size-capped output: `exec` requests and
//! hooks.
//!
//! The program runs in a process group of its own with stdin on /dev/null. At the deadline the
//! whole group gets SIGKILL (so `sh -c 'sleep 100'` dies with its shell). Output beyond the cap
//! is read and dropped, so a chatty program never blocks on a full pipe. A program that exits
//! while something it started still holds its stdout or stderr open is waited for until the
//! deadline too; then its group is killed and what was captured so far is returned.

use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long output pipes may stay open after the program was killed.
const KILL_GRACE: Duration = Duration::from_secs(1);
/// Longest pause between two looks at a running program.
const MAX_POLL: Duration = Duration::from_millis(20);

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// It ran past the deadline and was killed.
    TimedOut,
}

impl Ended {
    /// The exit code `exec` reports: the code, 128 + signal, or 124 for a timeout (as
    /// `timeout(1)` does).
    pub fn exit_code(self) -> i32 {
        match self {
            Ended::Exited(code) => code,
            Ended::Signaled(sig) => 128 + sig,
            Ended::TimedOut => 124,
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exit status {code}"),
            Ended::Signaled(sig) => write!(f, "killed by signal {sig}"),
            Ended::TimedOut => write!(f, "timed out"),
        }
    }
}

/// One captured stream.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    /// The first `cap` bytes.
    pub data: Vec<u8>,
    /// More was written than kept.
    pub truncated: bool,
}

/// What a run produced.
#[derive(Debug)]
pub struct Output {
    /// How it ended.
    pub ended: Ended,
    /// Standard output.
    pub stdout: Captured,
    /// Standard error.
    pub stderr: Captured,
    /// Its output pipes were still open (held by something it started) when we stopped
    /// waiting.
    pub pipes_left_open: bool,
}

/// Runs `program` with `args`, killed after `timeout`, keeping at most `cap` bytes of each
/// output stream. Fails only when the program cannot be started.
pub fn run(program: &str, args: &[String], timeout: Duration, cap: usize) -> io::Result<Output> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout).unwrap_or(started);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    // The child leads its own group, whose id is its pid.
    let group = child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = Arc::new(Mutex::new(Captured::default()));
    let stderr = Arc::new(Mutex::new(Captured::default()));
    let mut readers = 0;
    if let Some(pipe) = child.stdout.take() {
        spawn_reader(pipe, cap, Arc::clone(&stdout), done_tx.clone());
        readers += 1;
    }
    if let Some(pipe) = child.stderr.take() {
        spawn_reader(pipe, cap, Arc::clone(&stderr), done_tx);
        readers += 1;
    }

    let ended = match wait_until(&mut child, deadline)? {
        Some(status) => ended_of(status),
        None => {
            kill_group(group);
            // Reap it; SIGKILL cannot be ignored, so this returns promptly.
            child.wait()?;
            Ended::TimedOut
        }
    };
    let mut pipes_deadline = match ended {
        Ended::TimedOut => Instant::now() + KILL_GRACE,
        _ => deadline.max(Instant::now()),
    };
    let mut pipes_left_open = !wait_readers(&done_rx, &mut readers, pipes_deadline);
    if pipes_left_open && ended != Ended::TimedOut {
        // Something the program left behind holds the pipes: stop it too.
        kill_group(group);
        pipes_deadline = Instant::now() + KILL_GRACE;
        pipes_left_open = !wait_readers(&done_rx, &mut readers, pipes_deadline);
    }
    let take = |c: &Arc<Mutex<Captured>>| c.lock().unwrap_or_else(PoisonError::into_inner).clone();
    Ok(Output {
        ended,
        stdout: take(&stdout),
        stderr: take(&stderr),
        pipes_left_open,
    })
}

/// Waits for the child until `deadline`; `None` when it is still running then.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Waits until every reader reported the end of its pipe or `deadline` passed; true when all
/// did.
fn wait_readers(done: &Receiver<()>, readers: &mut usize, deadline: Instant) -> bool {
    while *readers > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(()) => *readers -= 1,
            Err(_) => return false,
        }
    }
    true
}

fn ended_of(status: ExitStatus) -> Ended {
    match (status.code(), status.signal()) {
        (Some(code), _) => Ended::Exited(code),
        (None, Some(sig)) => Ended::Signaled(sig),
        // Neither code nor signal cannot happen for a reaped child; report it as a failure.
        (None, None) => Ended::Exited(-1),
    }
}

fn kill_group(group: libc::pid_t) {
    // SAFETY: kill(2) takes no pointers; a negative pid names the process group the child
    // leads, which exists at least as long as one of its members does.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// Reads `pipe` to its end, keeping the first `cap` bytes in `into`; says so on `done`.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    cap: usize,
    into: Arc<Mutex<Captured>>,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let mut c = into.lock().unwrap_or_else(PoisonError::into_inner);
                    let room = cap.saturating_sub(c.data.len());
                    let keep = n.min(room);
                    c.data.extend_from_slice(&chunk[..keep]);
                    if keep < n {
                        c.truncated = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // The receiver may be gone when the run stopped waiting for us.
        let _ = done.send(());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    fn sh(script: &str, timeout: Duration, cap: usize) -> Output {
        run("sh", &["-c".into(), script.into()], timeout, cap).unwrap()
    }

    #[test]
    fn output_and_exit_code_are_captured() {
        let out = sh("echo out; echo err >&2; exit 3", LONG, 1024);
        assert_eq!(out.ended, Ended::Exited(3));
        assert_eq!(out.stdout.data, b"out\n");
        assert_eq!(out.stderr.data, b"err\n");
        assert!(!out.stdout.truncated && !out.pipes_left_open);
    }

    /// The pid a script printed as its first line of output.
    fn printed_pid(out: &Output) -> i32 {
        let text = String::from_utf8_lossy(&out.stdout.data);
        let first = text.lines().next().unwrap_or_default();
        first
            .parse()
            .unwrap_or_else(|_| panic!("no pid printed: {text:?}"))
    }

    /// Whether process `pid` ends (is gone, or a zombie nobody reaped yet) within 20 s, well
    /// short of the 30 s its `sleep` would take: a SIGKILL lands asynchronously.
    fn ended(pid: i32) -> bool {
        let gone = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // "pid (comm) S ...": the state follows the last ')'.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        };
        let guard = Instant::now() + Duration::from_secs(20);
        while !gone() {
            if Instant::now() > guard {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    #[test]
    fn a_program_past_its_deadline_is_killed_with_its_children() {
        let out = sh(
            "sleep 30 & echo $!; wait; echo never",
            Duration::from_millis(300),
            1024,
        );
        assert_eq!(out.ended, Ended::TimedOut);
        assert_eq!(out.ended.exit_code(), 124);
        assert!(!String::from_utf8_lossy(&out.stdout.data).contains("never"));
        // Its child was killed with it, not left to run out its 30 s.
        let child = printed_pid(&out);
        assert!(
            ended(child),
            "child {child} of the timed-out program lives on"
        );
    }

    #[test]
    fn output_beyond_the_cap_is_dropped_and_flagged() {
        let out = sh("head -c 100000 /dev/zero", LONG, 1000);
        assert_eq!(out.ended, Ended::Exited(0));
        assert_eq!(out.stdout.data.len(), 1000);
        assert!(out.stdout.truncated);
    }

    #[test]
    fn a_signal_is_reported_as_128_plus_its_number() {
        let out = sh("kill -9 $$", LONG, 1024);
        assert_eq!(out.ended, Ended::Signaled(9));
        assert_eq!(out.ended.exit_code(), 137);
    }

    #[test]
    fn a_background_child_holding_stdout_is_killed_at_the_deadline() {
        let out = sh("sleep 30 & echo $!", Duration::from_millis(500), 1024);
        assert_eq!(out.ended, Ended::Exited(0));
        assert!(!out.pipes_left_open);
        // The answer did not wait for the child that held stdout: it was killed.
        let child = printed_pid(&out);
        assert!(ended(child), "background child {child} lives on");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        assert!(run("/nonexistent/program", &[], LONG, 10).is_err());
    }
}
