#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure
//! SIGKILL crash tests of standard checkpoints (issue #13, invariants 1 and 2): the VMM is
//! killed at every step of a create and of an apply (the `STRATA_CRASH_AT` points of
//! `vmm::checkpoint::crash_point`), and with a plain `kill -9` while the memory writer of a
//! create runs, and then a restarted `strata run --state-dir` with the same disks must find:
//!
//! - no half checkpoint: `GET /v1/checkpoints` lists the checkpoint whole or not at all (whole
//!   when the crash came after the commit rename: the store rolls it forward), no `.tmp-*`
//!   folder is left, and `snapshot::store::Store::open` of the location (opened while no VMM
//!   holds it) has nothing left to repair and `check()`s clean;
//! - usable disks: the VM boots on the active layers and writes, flushes and reads each disk;
//! - nothing acknowledged lost: every sector written and flushed before the crash (for the
//!   `kill -9` test also those flushed while the create was in flight, after the disks
//!   switched) reads back with its hash;
//! - for an apply: the current checkpoint is the old one (with the old disks) or the applied
//!   one (with its disks), and the checkpoints' files (manifest, state, memory, every layer of
//!   their chains and the launch disks) are byte for byte what they were;
//! - and a following checkpoint create and apply work on the restarted VM.
//!
//! The restart comes right after the VMM died, as a supervisor would do it, with the same
//! arguments (API socket included): nothing the dead VMM started may still hold its location
//! or socket then.
//!
//! A test runs a group of points one after the other, each in its own VM and location, and
//! collects what each point found: a point that fails does not hide the others. Console
//! commands and API calls have hang guards only.
//!
//! Needs /dev/kvm; fails loudly without it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::types::{ApplyCheckpoint, CheckpointList, CheckpointType, CreateCheckpoint};
use resources::pattern::{fnv1a64_update, sector_fill, FNV_OFFSET, SECTOR_SIZE};
use snapshot::manifest::{Manifest, MANIFEST_FILE, MEMORY_FILE, STATE_FILE};
use snapshot::store::{Store, TMP_PREFIX};
use strata_tests::checkpoint_setup::{file_digest, flatten, ids};
use strata_tests::{api_client, require_kvm, strata_bin};

/// Hang guard for a console command or a boot (guest code runs at ~1 M instructions/s).
const GUARD: Duration = Duration::from_secs(120);
/// Hang guard for the VMM to die after a crash point or a kill.
const EXIT_GUARD: Duration = Duration::from_secs(30);
/// Each test disk: 1 MiB.
const DISK_SECTORS: usize = 16384;
/// The part of each disk the tests write, and read back in blocks of [`READ_BLOCK`] sectors.
const REGION: u64 = 256;
/// Sectors per read when checking a disk against its model.
const READ_BLOCK: u64 = 32;
/// The message `crash_point` logs before it kills the VMM.
const CRASH_MARK: &str = "killing the VMM here";

// ------------------------------------------------------------------------------------------
// A `strata` process and its console.

/// A running `strata run` or `strata restore` with piped console and stderr.
struct Strata {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    transcript: Vec<String>,
}

impl Strata {
    /// Starts `strata <sub> <args>`, with `STRATA_CRASH_AT=<crash_at>` if given.
    fn spawn(sub: &str, args: &[String], crash_at: Option<&str>) -> Strata {
        require_kvm();
        let mut cmd = Command::new(strata_bin());
        cmd.arg(sub).args(args).env_remove("STRATA_CRASH_AT");
        if let Some(point) = crash_at {
            cmd.env("STRATA_CRASH_AT", point);
        }
        let mut child = cmd
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
        let mut pipe = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        Strata {
            child,
            stdin,
            lines,
            stderr,
            transcript: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        std::thread::sleep(Duration::from_millis(50));
        self.stderr.lock().unwrap().clone()
    }

    fn context(&self) -> String {
        format!(
            "console:\n{}\nstderr:\n{}",
            self.transcript.join("\n"),
            self.stderr()
        )
    }

    /// The next console line; `Err` with the exit status if strata ended first.
    fn try_line(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.transcript.push(l.clone());
                Ok(Some(l))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit(EXIT_GUARD);
                Err(format!("strata ended ({status:?}); {}", self.context()))
            }
        }
    }

    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_line(left.max(Duration::from_millis(1))) {
                Ok(Some(l)) if pred(&l) => return l,
                Ok(Some(_)) => {}
                Ok(None) => panic!("no awaited console line within {timeout:?}; {}", {
                    self.context()
                }),
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Waits for the test guest's ready line; `Err` (with stderr) if strata ends first.
    fn ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the guest never got ready; {}",
                self.context()
            );
            match self.try_line(left)? {
                Some(l) if l.contains("strata test guest ready") => return Ok(()),
                _ => {}
            }
        }
    }

    fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("console input");
        stdin.write_all(text.as_bytes()).expect("write console");
        stdin.flush().expect("flush console");
    }

    /// Runs a console command: its output lines, or the `err` reason.
    fn command(&mut self, cmd: &str) -> Result<Vec<String>, String> {
        self.send(&format!("{cmd}\n"));
        // The guest echoes the line after its prompt `> `. In a `strata restore` the prompt
        // was printed by the process that took the checkpoint, so the echo may come alone;
        // after an apply, the part of the prompt the guest had not yet printed when the
        // checkpoint was taken comes again (`>  cmd`).
        self.wait_for(GUARD, |l| {
            l.strip_suffix(cmd)
                .is_some_and(|before| before.is_empty() || before.trim_end().ends_with('>'))
        });
        let mut out = Vec::new();
        loop {
            let l = self.wait_for(GUARD, |_| true);
            if l == "ok" {
                return Ok(out);
            }
            if let Some(reason) = l.strip_prefix("err") {
                return Err(reason.trim().to_string());
            }
            out.push(l);
        }
    }

    /// A command that must succeed.
    fn ok(&mut self, cmd: &str) -> Vec<String> {
        match self.command(cmd) {
            Ok(out) => out,
            Err(e) => panic!("`{cmd}` failed: err {e}; {}", self.context()),
        }
    }

    /// A command that must succeed with one line.
    fn line(&mut self, cmd: &str) -> String {
        let out = self.ok(cmd);
        assert_eq!(out.len(), 1, "`{cmd}` printed {out:?}");
        out[0].clone()
    }

    /// Waits (a hang guard) for strata to end; kills it after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait strata") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `kill -9` and reap.
    fn kill9(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reap strata")
    }
}

impl Drop for Strata {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------
// What the guest wrote: a host model of both disks.

/// Per disk and sector, the seed of the last acknowledged `blk write` (None: still zero).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Model(Vec<Vec<Option<u64>>>);

impl Model {
    fn new() -> Model {
        Model(vec![vec![None; DISK_SECTORS]; 2])
    }

    fn write(&mut self, disk: usize, sector: u64, count: u64, seed: u64) {
        for s in sector..sector + count {
            self.0[disk][s as usize] = Some(seed);
        }
    }

    /// What `blk DISK read SECTOR COUNT` must print.
    fn hash(&self, disk: usize, sector: u64, count: u64) -> String {
        let mut hash = FNV_OFFSET;
        let mut buf = [0u8; SECTOR_SIZE];
        for s in sector..sector + count {
            match self.0[disk][s as usize] {
                Some(seed) => sector_fill(seed, s, &mut buf),
                None => buf = [0u8; SECTOR_SIZE],
            }
            hash = fnv1a64_update(hash, &buf);
        }
        format!("{hash:016x}")
    }

    /// The seeds of a range, for messages.
    fn describe(&self, disk: usize, sector: u64, count: u64) -> String {
        let mut runs: Vec<(u64, u64, Option<u64>)> = Vec::new();
        for s in sector..sector + count {
            let seed = self.0[disk][s as usize];
            match runs.last_mut() {
                Some((_, end, last)) if *last == seed && *end == s => *end = s + 1,
                _ => runs.push((s, s + 1, seed)),
            }
        }
        runs.iter()
            .map(|(a, b, seed)| match seed {
                Some(x) => format!("{a}..{b}: seed {x}"),
                None => format!("{a}..{b}: zero"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Writes and flushes on the guest; the model records it once the flush is acknowledged.
fn write_flush(g: &mut Strata, m: &mut Model, disk: usize, sector: u64, count: u64, seed: u64) {
    g.ok(&format!("blk {disk} write {sector} {count} {seed}"));
    g.ok(&format!("blk {disk} flush"));
    m.write(disk, sector, count, seed);
}

/// Reads the written region of both disks and compares it with `m`.
fn check_disks(g: &mut Strata, m: &Model, what: &str, f: &mut Findings) {
    for disk in 0..2 {
        for at in (0..REGION).step_by(READ_BLOCK as usize) {
            let got = g.line(&format!("blk {disk} read {at} {READ_BLOCK}"));
            let want = m.hash(disk, at, READ_BLOCK);
            if got != want {
                f.add(format!(
                    "{what}: disk {disk} sectors {at}..{}: read {got}, expected {want} (acknowledged: {})",
                    at + READ_BLOCK,
                    m.describe(disk, at, READ_BLOCK)
                ));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Findings: what a point found wrong, collected so that one failure does not hide the rest.

#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn add(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }

    fn expect(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.add(msg());
        }
    }
}

/// Runs every point of a group; fails with every point's findings.
fn run_points(points: &[&str], run: impl Fn(&str, &mut Findings)) {
    let mut report = String::new();
    for point in points {
        let mut f = Findings::default();
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| run(point, &mut f)));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            f.add(format!("stopped by a panic: {msg}"));
        }
        eprintln!(
            "point {point}: {} finding(s) in {:.1}s",
            f.0.len(),
            t.elapsed().as_secs_f64()
        );
        for item in &f.0 {
            let _ = writeln!(report, "[{point}] {item}");
        }
    }
    assert!(report.is_empty(), "crash test findings:\n{report}");
}

// ------------------------------------------------------------------------------------------
// A VM's files and the checks every point makes.

/// A VM's launch disks, checkpoint location and API socket in a temporary folder.
struct Env {
    _dir: tempfile::TempDir,
    disks: [PathBuf; 2],
    state: PathBuf,
    sock: PathBuf,
    memory_mib: u32,
}

impl Env {
    fn new(memory_mib: u32) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let disks = [0, 1].map(|i| dir.path().join(format!("disk{i}.raw")));
        for d in &disks {
            std::fs::File::create(d)
                .unwrap()
                .set_len((DISK_SECTORS * SECTOR_SIZE) as u64)
                .unwrap();
        }
        Env {
            state: dir.path().join("state"),
            sock: dir.path().join("api.sock"),
            disks,
            memory_mib,
            _dir: dir,
        }
    }

    fn run_args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["--vcpus", "2", "--memory"].map(String::from).to_vec();
        a.push(self.memory_mib.to_string());
        for d in &self.disks {
            a.push("--disk".into());
            a.push(format!("path={}", d.display()));
        }
        for (flag, value) in [("--api-socket", &self.sock), ("--state-dir", &self.state)] {
            a.push(flag.into());
            a.push(value.display().to_string());
        }
        a.push("--checkpoint-type".into());
        a.push("standard".into());
        a
    }

    /// `strata run` (same disks, location and socket every time), booted.
    fn try_run(&self, crash_at: Option<&str>) -> Result<Strata, String> {
        let mut s = Strata::spawn("run", &self.run_args(), crash_at);
        s.ready()?;
        Ok(s)
    }

    fn run(&self, crash_at: Option<&str>) -> Strata {
        self.try_run(crash_at)
            .unwrap_or_else(|e| panic!("strata run: {e}"))
    }

    fn client(&self) -> api::Client {
        api_client(&self.sock)
    }

    fn lock(&self) -> PathBuf {
        self.state.join(snapshot::store::LOCK_FILE)
    }

    /// `.tmp-*` entries in the location.
    fn temp_folders(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.state) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TMP_PREFIX))
            .collect()
    }

    /// Every entry of the location and of its layers folder, for messages.
    fn listing(&self) -> String {
        let mut names = Vec::new();
        for dir in [self.state.clone(), self.state.join("layers")] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let rel = p.strip_prefix(&self.state).unwrap_or(&p).to_path_buf();
                    names.push(rel.display().to_string());
                }
            }
        }
        names.sort();
        names.join(" ")
    }
}

fn create(c: &api::Client, name: &str) -> Result<api::types::CheckpointInfo, api::ClientError> {
    c.create_checkpoint(&CreateCheckpoint {
        name: Some(name.into()),
        kind: Some(CheckpointType::Standard),
    })
}

fn apply(c: &api::Client, id: &str) -> Result<api::types::VmInfo, api::ClientError> {
    c.apply_checkpoint(id, &ApplyCheckpoint::default())
}

/// Runs an API call on its own thread (and connection).
fn in_thread<T: Send + 'static>(
    env: &Env,
    call: impl FnOnce(api::Client) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let c = env.client();
    std::thread::spawn(move || call(c))
}

/// The answer of a call whose VMM died: it must come once the VMM is gone (a hang guard here).
/// An answer held back by a process the VMM left behind is a finding.
fn join_answer<T>(call: std::thread::JoinHandle<T>, f: &mut Findings) -> T {
    let t = Instant::now();
    while !call.is_finished() && t.elapsed() < GUARD {
        std::thread::sleep(Duration::from_millis(2));
    }
    if t.elapsed() > Duration::from_millis(100) {
        f.add(format!(
            "the API call to the killed VMM got its answer (connection closed) only {:.0} ms \
             after the VMM was dead and a new one had started: something else held the \
             connection open",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }
    call.join().expect("the API call's thread")
}

/// Every file checkpoint `id` consists of: its folder's manifest, state and memory, and each
/// disk chain it froze (its layers and the launch disk beneath them), with their digests.
fn checkpoint_files(state: &Path, id: &str) -> BTreeMap<PathBuf, Result<(u64, u64), String>> {
    let dir = state.join(id);
    let mut files: Vec<PathBuf> = [MANIFEST_FILE, STATE_FILE, MEMORY_FILE]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    let m = Manifest::load(&dir.join(MANIFEST_FILE))
        .unwrap_or_else(|e| panic!("manifest of checkpoint {id}: {e}"));
    for d in &m.disks {
        files.extend(d.store_layers().map(|l| l.resolve(state)));
        files.push(d.launch.clone());
    }
    files
        .into_iter()
        .map(|p| (p.clone(), file_digest(&p)))
        .collect()
}

/// Processes (other than this one) that have `path` open, with their command line.
fn holders(path: &Path) -> Vec<String> {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
        {
            let cmdline = std::fs::read(p.path().join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let ppid = std::fs::read_to_string(p.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(String::from))
                })
                .unwrap_or_default();
            found.push(format!("pid {pid} (ppid {ppid}): {}", cmdline.trim()));
        }
    }
    found
}

/// Whether someone holds the store's flock (tried without blocking, released at once).
fn lock_is_held(lock: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(lock)
    else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; an advisory lock, released when `f` closes.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0
}

/// The children of process `pid` (every thread's).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// After an idle VMM was killed: nothing of it may still hold the location (its lock).
/// Records who does, and waits (a hang guard) until the lock is free so that the checks can
/// go on.
fn after_death(env: &Env, dead_pid: u32, f: &mut Findings) {
    let t = Instant::now();
    if let Some(who) = survivors(env) {
        while lock_is_held(&env.lock()) && t.elapsed() < GUARD {
            std::thread::sleep(Duration::from_millis(5));
        }
        f.add(format!(
            "after the VMM (pid {dead_pid}) was killed: {who}; free {:.0} ms later",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }
}

/// Who still holds the store's lock right now, if anyone does.
fn survivors(env: &Env) -> Option<String> {
    let open = holders(&env.lock());
    let held = lock_is_held(&env.lock());
    (held || !open.is_empty()).then(|| {
        format!(
            "the store lock {} is {}held, and open in {open:?}",
            env.lock().display(),
            if held { "" } else { "not " },
        )
    })
}

/// The restart right after a crash, as a supervisor does it: at once, same arguments. Nothing
/// of the dead VMM may be in its way: a process of it that still holds the store's lock is a
/// finding, and so is a failed restart (which is then tried again once the lock is free, so
/// that the checks can go on).
fn restart(env: &Env, dead_pid: u32, f: &mut Findings) -> Strata {
    let t = Instant::now();
    let held = survivors(env);
    let first = env.try_run(None);
    if let Some(who) = &held {
        f.add(format!(
            "after the VMM (pid {dead_pid}) died, a process it left behind still held its \
             location: {who}"
        ));
    }
    match first {
        Ok(s) => s,
        Err(e) => {
            f.add(format!(
                "the restart right after the crash failed: {e}\nlocation: {}",
                env.listing()
            ));
            while lock_is_held(&env.lock()) && t.elapsed() < GUARD {
                std::thread::sleep(Duration::from_millis(5));
            }
            f.add(format!(
                "the store lock was free again {:.0} ms after the VMM died",
                t.elapsed().as_secs_f64() * 1e3
            ));
            env.run(None)
        }
    }
}

/// Checks that the VMM died at `point` by SIGKILL.
fn check_crashed(s: &mut Strata, point: &str, f: &mut Findings) {
    let status = s.wait_exit(EXIT_GUARD);
    let stderr = s.stderr();
    f.expect(
        status.and_then(|st| st.signal()) == Some(libc::SIGKILL),
        || format!("the VMM did not die by SIGKILL at {point}: {status:?}; stderr:\n{stderr}"),
    );
    let mark = format!("STRATA_CRASH_AT={point}: {CRASH_MARK}");
    f.expect(stderr.contains(&mark), || {
        format!("stderr does not say {mark:?}:\n{stderr}")
    });
}

/// Kills the VMM (idle, nothing in flight) and checks the store as a tool would: opening it
/// finds nothing to repair (the VMM's start already did), `check()` is clean, the current
/// checkpoint is `current`.
fn check_store(env: &Env, s: &mut Strata, current: Option<&str>, what: &str, f: &mut Findings) {
    let pid = s.pid();
    s.kill9();
    after_death(env, pid, f);
    match Store::open(&env.state) {
        Ok(store) => {
            f.expect(store.opened().is_clean(), || {
                format!(
                    "{what}: Store::open still had to repair: {:?}",
                    store.opened()
                )
            });
            let report = store.check();
            f.expect(report.is_clean(), || {
                format!("{what}: Store::check: {:?}", report.problems)
            });
            f.expect(store.current() == current, || {
                format!(
                    "{what}: store.json names {:?} current, expected {current:?}",
                    store.current()
                )
            });
        }
        Err(e) => f.add(format!("{what}: Store::open failed: {e}")),
    }
    f.expect(env.temp_folders().is_empty(), || {
        format!("{what}: temporary folders left: {}", env.listing())
    });
}

/// What a restarted VM must show right after the crash: the checkpoint list (`expect_ids`,
/// `expect_current`), no temporary folder, the acknowledged data (`m`), and working disks.
fn check_restarted(
    env: &Env,
    g: &mut Strata,
    m: &mut Model,
    expect_ids: &[String],
    expect_current: Option<&str>,
    f: &mut Findings,
) {
    let c = env.client();
    match c.checkpoints() {
        Ok(list) => {
            f.expect(ids(&list) == expect_ids, || {
                format!(
                    "GET /v1/checkpoints lists {:?}, expected {expect_ids:?}; location: {}",
                    ids(&list),
                    env.listing()
                )
            });
            f.expect(list.current.as_deref() == expect_current, || {
                format!(
                    "GET /v1/checkpoints: current {:?}, expected {expect_current:?}",
                    list.current
                )
            });
        }
        Err(e) => f.add(format!("GET /v1/checkpoints failed: {e}")),
    }
    f.expect(env.temp_folders().is_empty(), || {
        format!(
            "the restarted VMM left temporary folders: {}",
            env.listing()
        )
    });
    check_disks(g, m, "after the restart", f);
    // The disks take new writes.
    for disk in 0..2 {
        write_flush(g, m, disk, 200 + disk as u64 * 8, 8, 900 + disk as u64);
        let got = g.line(&format!("blk {disk} read 200 16"));
        f.expect(got == m.hash(disk, 200, 16), || {
            format!("disk {disk}: a write after the restart reads back as {got}")
        });
    }
}

/// A checkpoint create and apply on a VM restarted after a crash: the apply brings back the
/// memory (`check`) and disks of the new checkpoint. Returns the new checkpoint's id.
fn follow_up(env: &Env, g: &mut Strata, m: &mut Model, f: &mut Findings) -> Option<String> {
    let c = env.client();
    g.ok("fill 2 51");
    write_flush(g, m, 0, 160, 8, 52);
    let at = m.clone();
    let made = match create(&c, "after the crash") {
        Ok(info) => info,
        Err(e) => {
            f.add(format!("a checkpoint create after the restart failed: {e}"));
            return None;
        }
    };
    g.ok("fill 2 53");
    write_flush(g, m, 0, 160, 8, 54);
    write_flush(g, m, 1, 168, 8, 55);
    if let Err(e) = apply(&c, &made.id) {
        f.add(format!(
            "applying checkpoint {} after the restart failed: {e}",
            made.id
        ));
        return None;
    }
    *m = at;
    let check = g.command("check 2 51");
    f.expect(check.is_ok(), || {
        format!("after applying {}: `check 2 51`: {check:?}", made.id)
    });
    check_disks(g, m, "after the follow-up apply", f);
    match c.checkpoints() {
        Ok(list) => f.expect(list.current.as_deref() == Some(made.id.as_str()), || {
            format!(
                "after the follow-up apply the current checkpoint is {:?}, not {}",
                list.current, made.id
            )
        }),
        Err(e) => f.add(format!("GET /v1/checkpoints failed: {e}")),
    }
    Some(made.id)
}

/// The part every point shares once restarted after its crash: the checks of the restarted
/// VM, a store check, a second restart with the data still there, then a follow-up create
/// and apply, and a store check.
fn after_restart(
    env: &Env,
    mut g: Strata,
    m: &mut Model,
    expect_ids: &[String],
    expect_current: Option<&str>,
    f: &mut Findings,
) {
    check_restarted(env, &mut g, m, expect_ids, expect_current, f);
    check_store(env, &mut g, expect_current, "after the restart", f);
    let mut g = env.run(None);
    check_disks(&mut g, m, "after a second restart", f);
    let made = follow_up(env, &mut g, m, f);
    if let Some(id) = made {
        check_store(env, &mut g, Some(&id), "after the follow-up", f);
    }
}

// ------------------------------------------------------------------------------------------
// Create.

/// One create crash point: a VM with a checkpoint `base` and data written and flushed before,
/// between and after it, killed by `STRATA_CRASH_AT=point` in the create of a second one.
fn create_point(point: &str, f: &mut Findings) {
    let env = Env::new(128);
    let mut m = Model::new();
    // First run: data, checkpoint `base`, more data, then a plain kill -9.
    let mut g = env.run(None);
    write_flush(&mut g, &mut m, 0, 0, 16, 1);
    write_flush(&mut g, &mut m, 1, 0, 16, 2);
    let c = env.client();
    let base = create(&c, "base").expect("create base").id;
    write_flush(&mut g, &mut m, 0, 8, 16, 3);
    write_flush(&mut g, &mut m, 1, 32, 8, 4);
    let pid = g.pid();
    g.kill9();
    after_death(&env, pid, f);
    // Second run, crashing at `point`.
    let mut g = env.run(Some(point));
    check_disks(&mut g, &m, "after a kill -9 of an idle VM", f);
    write_flush(&mut g, &mut m, 0, 64, 16, 5);
    write_flush(&mut g, &mut m, 1, 8, 8, 6);
    // Enough memory for the writer to be busy a while (when the crash comes after its fork).
    g.ok("fill 32 7");
    // In a thread: the answer may come only when everything of the dead VMM is gone.
    let creator = in_thread(&env, |c| create(&c, "crashed"));
    let pid = g.pid();
    check_crashed(&mut g, point, f);
    drop(g);
    let committed = point == "create-renamed";
    let listing = env.listing();
    // Only after the commit rename may a new checkpoint exist.
    let new: Vec<String> = std::fs::read_dir(&env.state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| snapshot::manifest::valid_id(n) && *n != base)
        .collect();
    f.expect(new.len() == usize::from(committed), || {
        format!("checkpoint folders besides base after the crash: {new:?}; location: {listing}")
    });
    let mut expect = vec![base.clone()];
    expect.extend(new.first().cloned().filter(|_| committed));
    let current = expect.last().cloned();
    let g = restart(&env, pid, f);
    let result = join_answer(creator, f);
    f.expect(result.is_err(), || {
        format!("the create that should crash at {point} answered {result:?}")
    });
    after_restart(&env, g, &mut m, &expect, current.as_deref(), f);
    if committed {
        // The rolled-forward checkpoint is whole: it applies, with the memory and disks it
        // was taken with.
        if let Some(id) = new.first() {
            rolled_forward_applies(&env, id, &base, f);
        }
    }
}

/// `strata restore --checkpoint DIR/<id>` in a new process, once its API answers (the VM is
/// restored then: console input sent before is not seen by the guest).
fn restore(env: &Env, id: &str) -> Strata {
    let args = vec![
        "--checkpoint".to_string(),
        env.state.join(id).display().to_string(),
        "--api-socket".into(),
        env.sock.display().to_string(),
    ];
    let s = Strata::spawn("restore", &args, None);
    let state = env.client().vm().map(|v| v.state);
    assert_eq!(
        state.as_ref().ok(),
        Some(&api::types::VmState::Running),
        "strata restore of {id}: {state:?}; {}",
        s.context()
    );
    s
}

/// Restores the rolled-forward checkpoint `id` in a new process: its parent is `base`, and it
/// has the memory it was taken with (`fill 32 7` was done just before).
fn rolled_forward_applies(env: &Env, id: &str, base: &str, f: &mut Findings) {
    let mut g = restore(env, id);
    match env.client().checkpoint(id) {
        Ok(info) => f.expect(info.parent.as_deref() == Some(base), || {
            format!(
                "the rolled-forward checkpoint {id} has parent {:?}, not {base}",
                info.parent
            )
        }),
        Err(e) => f.add(format!("GET /v1/checkpoints/{id}: {e}")),
    }
    let check = g.command("check 32 7");
    f.expect(check.is_ok(), || {
        format!("strata restore of the rolled-forward {id}: `check 32 7`: {check:?}")
    });
}

#[test]
fn crash_at_each_step_of_a_create_before_its_commit_leaves_no_checkpoint_and_loses_nothing() {
    run_points(
        &[
            "create-begun",
            "create-switched",
            "create-state-written",
            "create-memory-written",
        ],
        create_point,
    );
}

#[test]
fn crash_right_after_the_commit_rename_rolls_the_checkpoint_forward_whole() {
    run_points(&["create-renamed"], create_point);
}

// ------------------------------------------------------------------------------------------
// Apply.

/// One apply crash point: checkpoints C1 and C2 with data between them, more data after C2,
/// then an apply of C1 killed by `STRATA_CRASH_AT=point`.
fn apply_point(point: &str, f: &mut Findings) {
    let env = Env::new(128);
    let mut m = Model::new();
    let mut g = env.run(Some(point));
    let c = env.client();
    write_flush(&mut g, &mut m, 0, 0, 16, 11);
    write_flush(&mut g, &mut m, 1, 0, 16, 12);
    g.ok("fill 2 13");
    let c1 = create(&c, "c1").expect("create c1").id;
    let m1 = m.clone();
    write_flush(&mut g, &mut m, 0, 8, 16, 14);
    write_flush(&mut g, &mut m, 1, 40, 8, 15);
    let c2 = create(&c, "c2").expect("create c2").id;
    write_flush(&mut g, &mut m, 0, 100, 8, 16);
    write_flush(&mut g, &mut m, 1, 4, 8, 17);
    let m3 = m.clone();
    let before: Digests = [&c1, &c2]
        .iter()
        .map(|id| (id.to_string(), checkpoint_files(&env.state, id)))
        .collect();
    let c1_ = c1.clone();
    let applier = in_thread(&env, move |c| apply(&c, &c1_));
    let pid = g.pid();
    check_crashed(&mut g, point, f);
    drop(g);
    let mut g = restart(&env, pid, f);
    let result = join_answer(applier, f);
    f.expect(result.is_err(), || {
        format!("the apply that should crash at {point} answered {result:?}")
    });
    let list = c_list(&env, f);
    let current = list.as_ref().and_then(|l| l.current.clone());
    f.expect(
        current.as_deref() == Some(&c1) || current.as_deref() == Some(&c2),
        || format!("after the restart the current checkpoint is {current:?}, neither {c2} (old) nor {c1} (applied)"),
    );
    // The record is switched only at apply-recorded.
    let applied = point == "apply-recorded";
    let want = if applied { &c1 } else { &c2 };
    f.expect(current.as_deref() == Some(want), || {
        format!("after a crash at {point} the current checkpoint is {current:?}, expected {want}")
    });
    // The disks are those of whichever state the store names.
    m = if current.as_deref() == Some(&c1) {
        m1.clone()
    } else {
        m3
    };
    let expect_ids = vec![c1.clone(), c2.clone()];
    check_restarted(&env, &mut g, &mut m, &expect_ids, current.as_deref(), f);
    check_store(&env, &mut g, current.as_deref(), "after the restart", f);
    check_unchanged(&env, &before, "after the restart", f);
    // The checkpoint being applied is whole: a restore in a new process brings back its memory
    // and disks (and continues on new layers above them).
    let mut r = restore(&env, &c1);
    let check = r.command("check 2 13");
    f.expect(check.is_ok(), || {
        format!("strata restore of {c1} after the crash: `check 2 13`: {check:?}")
    });
    let mut m = m1.clone();
    check_disks(&mut r, &m, &format!("strata restore of {c1}"), f);
    let pid = r.pid();
    r.kill9();
    after_death(&env, pid, f);
    let mut g = env.run(None);
    check_disks(&mut g, &m, "a restart after the restore", f);
    if let Some(id) = follow_up(&env, &mut g, &mut m, f) {
        check_store(&env, &mut g, Some(&id), "after the follow-up", f);
    }
    check_unchanged(&env, &before, "after a restore and a follow-up apply", f);
}

/// Digests of checkpoints' files, by checkpoint.
type Digests = BTreeMap<String, BTreeMap<PathBuf, Result<(u64, u64), String>>>;

/// Invariant 3: the checkpoints' files are what they were.
fn check_unchanged(env: &Env, before: &Digests, when: &str, f: &mut Findings) {
    for (id, files) in before {
        let now = checkpoint_files(&env.state, id);
        for (path, digest) in files {
            let again = now.get(path);
            f.expect(again == Some(digest), || {
                format!(
                    "{when}: checkpoint {id}'s file {} changed: (size, hash) {digest:?} before \
                     the apply, {again:?} now",
                    path.display()
                )
            });
        }
    }
}

fn c_list(env: &Env, f: &mut Findings) -> Option<CheckpointList> {
    match env.client().checkpoints() {
        Ok(l) => Some(l),
        Err(e) => {
            f.add(format!("GET /v1/checkpoints failed: {e}"));
            None
        }
    }
}

#[test]
fn crash_at_each_step_of_an_apply_leaves_the_old_or_the_applied_state_and_the_checkpoint_intact() {
    run_points(
        &["apply-halted", "apply-layers", "apply-recorded"],
        apply_point,
    );
}

// ------------------------------------------------------------------------------------------
// kill -9 in the middle of a create.

/// A 256 MiB VM with 128 MiB of memory filled: a create's memory writer runs for a while.
/// While it runs (its memory file exists in the temporary folder, the disks have switched and
/// the guest runs again) the guest writes and flushes both disks; then the VMM gets a plain
/// `kill -9`. Every flushed write must survive, the checkpoint must be whole or absent, and the
/// memory writer must not outlive the VMM (holding its store lock and API socket).
fn kill_during_memory_write(f: &mut Findings) {
    let env = Env::new(256);
    let mut m = Model::new();
    let mut g = env.run(None);
    write_flush(&mut g, &mut m, 0, 0, 16, 21);
    write_flush(&mut g, &mut m, 1, 0, 16, 22);
    g.ok("fill 128 3");
    let mut committed: Vec<String> = Vec::new();
    let mut killed = None;
    for attempt in 0..3u64 {
        let name = format!("attempt {attempt}");
        let creator = in_thread(&env, move |c| create(&c, &name));
        // The memory writer has been forked once its file exists.
        let t = Instant::now();
        let tmp = loop {
            let found = env
                .temp_folders()
                .into_iter()
                .find(|n| env.state.join(n).join(MEMORY_FILE).exists());
            if found.is_some() || creator.is_finished() || t.elapsed() > GUARD {
                break found;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let Some(tmp) = tmp else {
            let made = creator.join().unwrap().expect("create");
            eprintln!("attempt {attempt}: the create ended before its writer was seen");
            committed.push(made.id);
            continue;
        };
        let seen = t.elapsed();
        // Acknowledged while the create is in flight, after the switch.
        let seed = 30 + attempt * 2;
        write_flush(&mut g, &mut m, 0, 120 + attempt * 8, 8, seed);
        write_flush(&mut g, &mut m, 1, 120 + attempt * 8, 8, seed + 1);
        let id = tmp.trim_start_matches(TMP_PREFIX).to_string();
        if env.state.join(&tmp).exists() && !env.state.join(&id).exists() {
            let writers = children(g.pid());
            let pid = g.pid();
            let status = g.kill9();
            // The writer's parent-death SIGKILL is delivered as the VMM dies, and acted on a
            // moment later: it may take that moment, not hold the location afterwards.
            let grace = Instant::now() + Duration::from_secs(2);
            let writers_alive: Vec<u32> = loop {
                let alive_now: Vec<u32> = writers.iter().copied().filter(|&w| alive(w)).collect();
                if alive_now.is_empty() || Instant::now() > grace {
                    break alive_now;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            eprintln!(
                "attempt {attempt}: writer seen after {seen:?}; killed the VMM {:?} after the \
                 writes; its children {writers:?}, alive after its death {writers_alive:?}",
                t.elapsed()
            );
            f.expect(status.signal() == Some(libc::SIGKILL), || {
                format!("the VMM ended with {status:?}")
            });
            killed = Some((pid, id, writers, writers_alive, creator));
            break;
        }
        // The create committed while the guest wrote: try again.
        let made = creator.join().unwrap().expect("create");
        eprintln!("attempt {attempt}: the create committed before the kill");
        committed.push(made.id);
    }
    let Some((pid, id, writers, writers_alive, creator)) = killed else {
        f.add("the VMM was never killed while a create's memory writer ran (3 attempts)");
        return;
    };
    drop(g);
    // The kill may have come right after the commit rename: then the checkpoint is there whole.
    let mut expect = committed;
    if env.state.join(&id).is_dir() {
        eprintln!("checkpoint {id} was committed just before the kill");
        expect.push(id.clone());
    }
    if !writers_alive.is_empty() {
        f.add(format!(
            "the VMM's memory writer (its children at the kill: {writers:?}) outlived it: \
             {writers_alive:?} still ran 2 s after the VMM was reaped"
        ));
    }
    let current = expect.last().cloned();
    let g = restart(&env, pid, f);
    let answer = join_answer(creator, f);
    f.expect(answer.is_err(), || {
        format!("the create killed in flight answered {answer:?}")
    });
    after_restart(&env, g, &mut m, &expect, current.as_deref(), f);
}

#[test]
fn kill_9_while_the_memory_writer_runs_keeps_flushed_writes_and_leaves_no_half_checkpoint() {
    run_points(&["kill -9 during the memory write"], |_, f| {
        kill_during_memory_write(f)
    });
}

// ------------------------------------------------------------------------------------------
// No crash: the baseline of the follow-up every point ends with.

/// A create and an apply of it without any crash, then the same store checks as after every
/// crash: the baseline that tells a finding of the follow-up apart from one of the crash.
#[test]
fn without_a_crash_a_create_and_apply_leave_a_store_that_checks_clean() {
    run_points(&["no crash"], |_, f| {
        let env = Env::new(128);
        let mut m = Model::new();
        let mut g = env.run(None);
        write_flush(&mut g, &mut m, 0, 0, 16, 41);
        write_flush(&mut g, &mut m, 1, 0, 16, 42);
        if let Some(id) = follow_up(&env, &mut g, &mut m, f) {
            check_store(&env, &mut g, Some(&id), "after a create and an apply", f);
        }
    });
}

// ------------------------------------------------------------------------------------------
// Delete by merging (issue #15).

/// Content hash of every disk of checkpoint `id`: `strata disk convert` of its chains.
fn checkpoint_hashes(env: &Env, id: &str) -> Result<Vec<u64>, String> {
    let info = env
        .client()
        .checkpoint(id)
        .map_err(|e| format!("GET checkpoint {id}: {e}"))?;
    let mut out = Vec::new();
    for (i, top) in info.disks.iter().enumerate() {
        let flat = env.state.with_file_name(format!("flat-{id}-{i}.raw"));
        let bytes = flatten(top, &flat)?;
        let _ = std::fs::remove_file(&flat);
        out.push(fnv1a64_update(FNV_OFFSET, &bytes));
    }
    Ok(out)
}

/// Layer files in the location.
fn layer_count(env: &Env) -> usize {
    std::fs::read_dir(env.state.join(snapshot::store::LAYERS_DIR))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One delete crash point: checkpoints C1, C2, C3 with 3 MiB written between C1 and C2 and
/// 4 MiB between C2 and C3 on both disks; deleting C2 folds its frozen layer (3 MiB, the
/// smaller) into C3's, online (the running chains run through both), in steps of 1 MiB:
/// `fold-copying` lands after two steps, mid-copy; `fold-switched` right after the chain's
/// switch, before the records name the new chain. After the restart: C1 and C3 listed and
/// hashing as when taken, the acknowledged data there, no fold journal, a clean store; then
/// deleting C1 folds everything C3 and the VM need down into the launch disks.
fn delete_point(point: &str, f: &mut Findings) {
    let env = Env::new(128);
    let mut m = Model::new();
    let mut g = env.run(Some(point));
    let c = env.client();
    for disk in 0..2 {
        write_flush(&mut g, &mut m, disk, 0, 16, 30 + disk as u64);
    }
    let c1 = create(&c, "c1").expect("create c1").id;
    for disk in 0..2 {
        write_flush(&mut g, &mut m, disk, 0, 6144, 40 + disk as u64);
    }
    let c2 = create(&c, "c2").expect("create c2").id;
    for disk in 0..2 {
        write_flush(&mut g, &mut m, disk, 4096, 8192, 50 + disk as u64);
    }
    let c3 = create(&c, "c3").expect("create c3").id;
    for disk in 0..2 {
        write_flush(&mut g, &mut m, disk, 64, 32, 60 + disk as u64);
    }
    let h1 = checkpoint_hashes(&env, &c1).expect("hash c1");
    let h3 = checkpoint_hashes(&env, &c3).expect("hash c3");
    let layers_before = layer_count(&env);
    // The delete answers once C2 is gone; the fold then runs in the VMM's background, where
    // the crash point stops it. The answer may or may not get out before the kill (the fold's
    // first steps take a few ms): either way the restart must find C2 gone.
    let answer = c.delete_checkpoint(&c2);
    eprintln!(
        "{point}: the delete of {c2} answered {:?}",
        answer.as_ref().map(ids)
    );
    let pid = g.pid();
    check_crashed(&mut g, point, f);
    drop(g);
    let mut g = restart(&env, pid, f);
    // The delete committed (its folder went before the fold began): C1 and C3 remain, whole.
    let expect_ids = vec![c1.clone(), c3.clone()];
    check_restarted(&env, &mut g, &mut m, &expect_ids, Some(&c3), f);
    f.expect(
        !env.state.join(vmm::checkpoint::fold::FOLD_JOURNAL).exists(),
        || {
            format!(
                "after the restart the fold journal is still there: {}",
                env.listing()
            )
        },
    );
    for (id, want) in [(&c1, &h1), (&c3, &h3)] {
        let got = checkpoint_hashes(&env, id);
        f.expect(got.as_ref() == Ok(want), || {
            format!("after the restart checkpoint {id} hashes {got:?}, taken as {want:?}")
        });
    }
    let layers_now = layer_count(&env);
    f.expect(layers_now <= layers_before, || {
        format!("after the restart {layers_now} layer files, {layers_before} before the delete")
    });
    // A finished fold took C2's layer out; an interrupted one left the chains as they were.
    let folded = matches!(point, "fold-switched" | "fold-finished");
    if folded {
        f.expect(layers_now < layers_before, || {
            format!(
                "after a crash at {point} (the switch was made) {layers_now} layer files, \
                 {layers_before} before: C2's layer was not taken out"
            )
        });
    }
    // The next delete finishes the job: everything C3 and the VM need folds down.
    match env.client().delete_checkpoint(&c1) {
        Ok(list) => f.expect(ids(&list) == vec![c3.clone()], || {
            format!("after deleting {c1} the list is {:?}", ids(&list))
        }),
        Err(e) => f.add(format!("deleting {c1} after the restart: {e}")),
    }
    if let Err(e) = env.client().wait_for_merge(&c1, Duration::from_millis(20)) {
        f.add(format!("waiting for the merge of {c1}'s delete: {e}"));
    }
    let got = checkpoint_hashes(&env, &c3);
    f.expect(got.as_ref() == Ok(&h3), || {
        format!("after deleting {c1} checkpoint {c3} hashes {got:?}, taken as {h3:?}")
    });
    check_disks(&mut g, &m, "after the second delete", f);
    let layers_end = layer_count(&env);
    f.expect(layers_end <= 4, || {
        format!(
            "after deleting {c1} (C3 on one layer per disk, the VM above it) {layers_end} layer \
             files: {}",
            env.listing()
        )
    });
    check_store(&env, &mut g, Some(&c3), "after the second delete", f);
}

#[test]
fn crash_at_each_step_of_a_delete_s_merge_leaves_every_checkpoint_and_the_disks_reading_the_same() {
    run_points(
        &["fold-copying", "fold-switched", "fold-finished"],
        delete_point,
    );
}
