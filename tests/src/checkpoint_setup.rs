//! Shared set-up of the checkpoint end-to-end tests (`tests/tests/checkpoint*.rs`,
//! `production.rs`).
//!
//! - [`Console`]: the test guest's console, whether `strata run` ([`Vm`]) or `strata restore`
//!   ([`Restored`]) serves it; [`resync`] puts it back in step after a standard apply.
//! - [`Setup`]: a VM's files (raw launch disks, API and vsock sockets, checkpoint location) in
//!   a temporary folder, and [`Setup::boot`] of `strata run` on them.
//! - API polls ([`wait_agent`], [`wait_state`], [`start`]), the guest's counter
//!   ([`count_get`]) and host-side views of checkpoints ([`ids`], [`flatten`],
//!   [`file_digest`]).
//!
//! Every timeout is a hang guard, never a speed assertion.

use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::call::LifecycleAction;
use api::types::{AgentStatus, CheckpointList, VmInfo, VmState};
use api::{Client, ClientError};

use crate::{api_client, spawn_console, strata_bin, Reply, Vm};

/// Hang guard for one console command of a restored VM, and for the prompt after an apply
/// (the [`Vm`] harness uses its own).
pub const COMMAND_GUARD: Duration = Duration::from_secs(120);
/// Hang guard for the guest agent to answer, and for the VM to reach a state.
pub const AGENT_GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Consoles: `strata run` through the shared harness, `strata restore` through `Restored`.

/// The test guest's console, whichever process serves it.
pub trait Console {
    /// Runs a console command and returns its reply.
    fn command(&mut self, cmd: &str) -> Reply;
    /// The console so far, for failure messages.
    fn transcript(&self) -> String;

    /// Runs a command that must succeed; its output lines.
    fn ok(&mut self, cmd: &str) -> Vec<String> {
        let reply = self.command(cmd);
        match reply.status {
            Ok(()) => reply.lines,
            Err(e) => panic!(
                "{cmd}: err {e} (output {:?})\nconsole:\n{}",
                reply.lines,
                self.transcript()
            ),
        }
    }

    /// Runs a command that must succeed with one output line.
    fn line(&mut self, cmd: &str) -> String {
        let mut out = self.ok(cmd);
        assert_eq!(out.len(), 1, "{cmd}: expected one line, got {out:?}");
        out.remove(0)
    }
}

impl Console for Vm {
    fn command(&mut self, cmd: &str) -> Reply {
        Vm::command(self, cmd)
    }

    fn transcript(&self) -> String {
        self.transcript.join("\n")
    }
}

/// A running `strata restore` with its console on piped stdio (the [`Vm`] harness starts only
/// `strata run`).
pub struct Restored {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    transcript: Vec<String>,
}

impl Restored {
    /// Starts `strata restore ARGS...`.
    pub fn start(args: &[&str]) -> Restored {
        let crate::Console {
            child,
            stdin,
            lines,
            stderr,
        } = spawn_console("restore", args);
        Restored {
            child,
            stdin,
            lines,
            stderr,
            transcript: Vec::new(),
        }
    }

    /// The next console line, or panics after `timeout` or if the console closed.
    fn next_line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.transcript.push(line.clone());
                line
            }
            Err(RecvTimeoutError::Timeout) => panic!(
                "no console line within {timeout:?}; console so far:\n{}",
                self.transcript.join("\n")
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "console closed; stderr: {}\nconsole so far:\n{}",
                self.stderr(),
                self.transcript.join("\n")
            ),
        }
    }

    /// Writes raw bytes to the console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("console input is open");
        stdin.write_all(text.as_bytes()).expect("write console");
        stdin.flush().expect("flush console");
    }

    /// Waits for `strata restore` to exit; kills it and panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        crate::wait_console_exit(
            &mut self.child,
            &self.lines,
            &mut self.transcript,
            "strata restore",
            timeout,
        )
    }

    /// What `strata restore` wrote to stderr (complete once it has exited).
    pub fn stderr(&self) -> String {
        std::thread::sleep(Duration::from_millis(50));
        self.stderr.lock().unwrap().clone()
    }
}

impl Console for Restored {
    fn command(&mut self, cmd: &str) -> Reply {
        self.send(&format!("{cmd}\n"));
        // The guest echoes the line after its prompt; the first command after a restore has no
        // prompt in front (the guest printed it in the process that took the checkpoint).
        let echo = format!("> {cmd}");
        let deadline = Instant::now() + COMMAND_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left.max(Duration::from_millis(1)));
            if line == cmd || line.ends_with(&echo) {
                break;
            }
        }
        crate::read_reply(|| self.next_line(COMMAND_GUARD))
    }

    fn transcript(&self) -> String {
        self.transcript.join("\n")
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Puts the console back in step after a standard apply. The guest then runs on from the
/// checkpoint's instant, and its prompt `> ` may have been printed before that instant, after
/// it (it comes again), or not at all before the old VM was halted; the [`Vm`] harness needs
/// `> CMD` as the echo of each command. An empty command line ends whatever partial line there
/// is (the guest answers it with a line end and a new prompt).
pub fn resync(vm: &mut Vm) {
    vm.send("\n");
    vm.wait_for(COMMAND_GUARD, |l| l.chars().all(|c| c == '>' || c == ' '));
}

// ---------------------------------------------------------------------------------------------
// A VM's files: launch disks, sockets, checkpoint location.

/// A VM's files in a temporary folder (removed when this is dropped).
pub struct Setup {
    /// The folder.
    pub dir: tempfile::TempDir,
    /// The checkpoint location (`--state-dir`), not created.
    pub state: PathBuf,
    /// The API socket.
    pub sock: PathBuf,
    /// The vsock device's host socket (see [`Setup::vsock_arg`]).
    pub vsock: PathBuf,
    /// The raw launch disks, in `--disk` order.
    pub disks: Vec<PathBuf>,
}

impl Setup {
    /// Raw launch disks `launch{i}.raw` of the given sizes (sparse, all zeros) and the paths
    /// of a VM's sockets and checkpoint location.
    pub fn new(sizes: &[u64]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<PathBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let p = dir.path().join(format!("launch{i}.raw"));
                std::fs::File::create(&p).unwrap().set_len(size).unwrap();
                p
            })
            .collect();
        Setup {
            state: dir.path().join("state"),
            sock: dir.path().join("api.sock"),
            vsock: dir.path().join("v.sock"),
            disks,
            dir,
        }
    }

    /// `name` in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The value of `--vsock` for a vsock device (guest CID 3) on [`Setup::vsock`].
    pub fn vsock_arg(&self) -> String {
        format!("cid=3,socket={}", self.vsock.display())
    }

    /// `strata run` arguments: `--vcpus` if given (else the default), 64 MiB, the API socket
    /// and the checkpoint location, then `extra`, then the disks.
    pub fn run_args(&self, vcpus: Option<u32>, extra: &[&str]) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(n) = vcpus {
            args.extend(["--vcpus".to_string(), n.to_string()]);
        }
        args.extend([
            "--memory".to_string(),
            "64M".into(),
            "--api-socket".into(),
            self.sock.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        for d in &self.disks {
            args.push("--disk".into());
            args.push(format!("path={}", d.display()));
        }
        args
    }

    /// Boots `strata run` with [`Setup::run_args`]; waits for the guest (and checks that it
    /// started `vcpus` vCPUs, if given) and the API.
    pub fn boot(&self, vcpus: Option<u32>, extra: &[&str]) -> (Vm, Client) {
        self.boot_with_env(vcpus, extra, &[])
    }

    /// [`Setup::boot`] with `env` added to strata's environment (test hooks).
    pub fn boot_with_env(
        &self,
        vcpus: Option<u32>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Vm, Client) {
        let args = self.run_args(vcpus, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut vm = Vm::start_with_env(&args, env);
        let started = vm.wait_ready();
        if let Some(n) = vcpus {
            assert_eq!(started, n, "the guest did not start every vCPU");
        }
        let c = api_client(&self.sock);
        (vm, c)
    }
}

// ---------------------------------------------------------------------------------------------
// The API.

/// Polls `GET /v1/guest` until the agent answers (within [`AGENT_GUARD`]); `when` names the
/// moment in the failure message.
pub fn wait_agent(c: &Client, when: &str) {
    let deadline = Instant::now() + AGENT_GUARD;
    loop {
        match c.guest() {
            Ok(g) => {
                assert_eq!(g.agent, AgentStatus::Connected);
                return;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "{when}: the guest agent did not answer within {AGENT_GUARD:?}: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Polls `GET /v1/vm` until the VM is in `state` (within [`AGENT_GUARD`]).
pub fn wait_state(c: &Client, state: VmState) -> VmInfo {
    let deadline = Instant::now() + AGENT_GUARD;
    loop {
        let v = c.vm().unwrap();
        if v.state == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the VM is not {state:?} within {AGENT_GUARD:?}: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `start` over the API and the guest's ready line (a cold boot).
pub fn start(vm: &mut Vm, c: &Client) {
    let v = c
        .lifecycle(LifecycleAction::Start)
        .unwrap_or_else(|e| panic!("start: {e}"));
    assert_eq!(v.state, VmState::Running, "{v:?}");
    vm.wait_ready();
}

/// An API error's status, code and message; panics (naming `what`) on anything else.
pub fn api_error<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    what: &str,
) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("{what}: expected an API error, got {other:?}"),
    }
}

/// The ids of the list's checkpoints, in its order.
pub fn ids(list: &CheckpointList) -> Vec<String> {
    list.checkpoints.iter().map(|c| c.id.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// The guest's counter.

/// `count get`: the sum and each vCPU's counter.
#[derive(Debug, Clone)]
pub struct Count {
    /// The sum of the vCPUs' counters.
    pub total: u64,
    /// Each vCPU's counter.
    pub per_cpu: Vec<u64>,
}

/// Runs `count get` on the guest's console.
pub fn count_get(con: &mut impl Console) -> Count {
    let out = con.ok("count get");
    let [total, per_cpu] = out.as_slice() else {
        panic!("count get: expected two lines, got {out:?}");
    };
    let total = total
        .parse()
        .unwrap_or_else(|_| panic!("count get: bad total {total:?}"));
    let per_cpu = per_cpu
        .strip_prefix("per-cpu")
        .unwrap_or_else(|| panic!("count get: bad per-cpu line {per_cpu:?}"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    Count { total, per_cpu }
}

// ---------------------------------------------------------------------------------------------
// Host-side views of disks and files.

/// The contents of the disk chain whose top is `top`, flattened by `strata disk convert` into
/// the raw file `raw` (replacing what is there; the caller removes it). The chain is trusted
/// (`--allow-parent-outside`: a store's first layers name the launch disks, outside its folder).
pub fn flatten(top: &str, raw: &Path) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(raw);
    let o = Command::new(strata_bin())
        .args([
            "disk",
            "convert",
            "--allow-parent-outside",
            "--format",
            "raw",
        ])
        .arg(top)
        .arg(raw)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run strata disk convert: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "strata disk convert {top}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    std::fs::read(raw).map_err(|e| format!("read {}: {e}", raw.display()))
}

/// The length and a hash of a file's bytes (std's SipHash: precompiled and fast in a debug
/// build), read in pieces.
pub fn file_digest(path: &Path) -> Result<(u64, u64), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            return Ok((len, h.finish()));
        }
        h.write(&buf[..n]);
        len += n as u64;
    }
}
