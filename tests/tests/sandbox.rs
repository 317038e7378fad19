//! The VMM's sandbox (issue #16) end to end with the test guest: every thread of a running
//! `strata` is under a seccomp filter with `no_new_privs`, the vCPU threads included (on
//! `kvm_pvm` hosts a Linux guest's vCPUs cannot carry one: `vmm/src/sandbox/mod.rs` and
//! `tests/tests/linux.rs`); a thread that makes a forbidden
//! system call stops the VMM with a message naming the call and the thread; `--seccomp log`
//! and `--seccomp false` let it through; with Landlock the VMM cannot open a file outside its
//! VM's paths, but can open those and the `--allow-path` folders.
//!
//! The forbidden call and the file probe come from the VMM's test-only hooks
//! (`STRATA_TEST_SECCOMP_VIOLATE`, `STRATA_TEST_LANDLOCK_OPEN`, see `vmm/src/sandbox/mod.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use strata_tests::{require_kvm, strata_bin, thread_status, Vm};

#[test]
fn every_thread_of_a_running_vmm_is_filtered_with_no_new_privs() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.path().join("v.sock");
    let api = dir.path().join("api.sock");
    let state = dir.path().join("state");
    let disk_arg = format!("path={}", disk.display());
    let vsock_arg = format!("cid=3,socket={}", uds.display());
    let mut vm = Vm::start(&[
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--disk",
        &disk_arg,
        "--vsock",
        &vsock_arg,
        "--api-socket",
        api.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    vm.wait_ready();
    // Guest I/O on every device, so every thread has done its work at least once.
    vm.command("blk 0 write 0 8 5").ok();
    vm.command("blk 0 flush").ok();
    let mut agent = vmm::agent::AgentClient::connect(&uds, Duration::from_secs(10)).unwrap();
    agent.ping().unwrap();
    let mut http = std::os::unix::net::UnixStream::connect(&api).unwrap();
    http.write_all(b"GET /v1/vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "GET /v1/vm: {answer}");

    let threads = thread_status(vm.pid());
    eprintln!("threads: {threads:#?}");
    let names: Vec<&str> = threads.values().map(|(n, _, _)| n.as_str()).collect();
    // The main thread (named after the binary) is there too.
    assert!(
        threads.contains_key(&vm.pid()),
        "no main thread: {threads:?}"
    );
    for expected in [
        "vcpu0",
        "vcpu1",
        "virtio-blk0",
        "console-in",
        "console-out",
        "strata-api",
    ] {
        assert!(
            names.contains(&expected),
            "no thread {expected} among {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n.starts_with("virtio-vsock")),
        "no vsock device thread among {names:?}"
    );
    // The test guest has no user space, so its vCPUs are filtered on kvm_pvm too.
    for (tid, (name, seccomp, nnp)) in &threads {
        assert_eq!(
            seccomp, "2",
            "thread {tid} ({name}) has no seccomp filter: {threads:?}"
        );
        assert_eq!(
            nnp, "1",
            "thread {tid} ({name}) may gain privileges: {threads:?}"
        );
    }
    // The VM still works under its filters.
    assert_eq!(vm.command("echo still here").ok(), vec!["still here"]);
    agent.ping().unwrap();
}

/// A `strata run` with `env` set, its stderr collected, its console on nothing (stdio on
/// /dev/null unless `args` say otherwise).
struct Strata {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
    collected: String,
}

impl Strata {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        require_kvm();
        let mut cmd = Command::new(strata_bin());
        cmd.arg("run")
            .args(["--memory", "64M"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start strata");
        let mut pipe = child.stderr.take().unwrap();
        let (tx, stderr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Strata {
            child,
            stderr,
            collected: String::new(),
        }
    }

    /// Waits up to `timeout` for stderr to contain `needle`; returns whether it did.
    fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.collected.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(s) => self.collected.push_str(&s),
                Err(_) => return false,
            }
        }
        true
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect the rest of stderr.
                while let Ok(s) = self.stderr.recv_timeout(Duration::from_secs(2)) {
                    self.collected.push_str(&s);
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Strata {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a VMM whose threads of `kind` make a forbidden system call, with `--seccomp mode`;
/// returns its exit status (None if still running after `wait`) and stderr.
fn violate(kind: &str, mode: &str, dir: &Path, wait: Duration) -> (Option<ExitStatus>, String) {
    let uds = dir.join(format!("{kind}-{mode}.sock"));
    let disk = dir.join("disk.raw");
    if !disk.exists() {
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    }
    let vsock = format!("cid=3,socket={}", uds.display());
    let disk_arg = format!("path={}", disk.display());
    let api = dir.join(format!("{kind}-{mode}.api"));
    let mut s = Strata::spawn(
        &[
            "--seccomp",
            mode,
            "--vsock",
            &vsock,
            "--disk",
            &disk_arg,
            "--api-socket",
            api.to_str().unwrap(),
        ],
        &[("STRATA_TEST_SECCOMP_VIOLATE", kind)],
    );
    let status = s.wait_exit(wait);
    (status, s.collected.clone())
}

#[test]
fn a_forbidden_system_call_stops_the_vmm_with_a_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // The kind, and how the names of its threads start.
    let kinds = [
        ("vcpu", "vcpu"),
        ("device", "virtio-"),
        ("console", "console-"),
        ("probe", "kvm-probe"),
        ("api", "api-start"),
        ("control", "strata"),
    ];
    for (kind, thread) in kinds {
        let (status, stderr) = violate(kind, "true", dir.path(), Duration::from_secs(30));
        eprintln!("{kind}: {status:?}\n{stderr}");
        let status = status.unwrap_or_else(|| panic!("{kind}: strata did not stop: {stderr}"));
        assert_eq!(
            status.code(),
            Some(vmm::sandbox::VIOLATION_EXIT_STATUS),
            "{kind}: {stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.starts_with("strata: seccomp: thread '"))
            .unwrap_or_else(|| panic!("{kind}: no seccomp message in stderr: {stderr}"));
        assert!(
            line.starts_with(&format!("strata: seccomp: thread '{thread}")),
            "{kind}: {line}"
        );
        assert!(
            line.contains(&format!(
                "({kind}) made a forbidden system call: personality (135)"
            )),
            "{kind}: {line}"
        );
    }
}

#[test]
fn seccomp_log_and_false_let_the_forbidden_call_through() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["log", "false"] {
        // The device threads start within a second or two of the process.
        let (status, stderr) = violate("device", mode, dir.path(), Duration::from_secs(8));
        assert!(
            status.is_none(),
            "--seccomp {mode}: strata stopped ({status:?}): {stderr}"
        );
        assert!(!stderr.contains("forbidden"), "--seccomp {mode}: {stderr}");
    }
}

#[test]
fn without_filters_threads_are_unfiltered_but_keep_no_new_privs() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vsock = format!("cid=3,socket={}", uds.display());
    let mut s = Strata::spawn(
        &["--seccomp", "false", "--vsock", &vsock, "--console", "none"],
        &[],
    );
    // The vsock socket exists once the devices are up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !uds.exists() {
        assert!(Instant::now() < deadline, "no vsock socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let threads = thread_status(s.child.id());
    assert!(s.wait_exit(Duration::from_millis(1)).is_none());
    for (tid, (name, seccomp, nnp)) in &threads {
        assert_eq!(seccomp, "0", "thread {tid} ({name}): {threads:?}");
        assert_eq!(nnp, "1", "thread {tid} ({name}): {threads:?}");
    }
}

/// What the VMM's Landlock probe said about opening `path`, started with `args`.
fn probe_open(path: &Path, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(["--console", "none"]);
    let mut s = Strata::spawn(
        &args,
        &[("STRATA_TEST_LANDLOCK_OPEN", path.to_str().unwrap())],
    );
    let prefix = format!("strata: sandbox test: open {}: ", path.display());
    assert!(
        s.wait_stderr(&prefix, Duration::from_secs(30)),
        "no probe line in stderr: {}",
        s.collected
    );
    // Let the line end.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rest = s.collected.split_once(&prefix).map_or("", |(_, r)| r);
        if let Some((answer, _)) = rest.split_once('\n') {
            return answer.to_string();
        }
        assert!(Instant::now() < deadline, "probe line cut: {}", s.collected);
        if let Ok(more) = s.stderr.recv_timeout(Duration::from_millis(100)) {
            s.collected.push_str(&more);
        }
    }
}

#[test]
fn landlock_keeps_the_vmm_to_its_vms_paths() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "not for the VMM").unwrap();
    let vm_dir = tempfile::tempdir().unwrap();
    let state = vm_dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let inside = state.join("note.txt");
    std::fs::write(&inside, "the VM's").unwrap();
    let state_arg = state.to_str().unwrap();

    // Outside the VM's paths: refused, even with the filters off.
    for seccomp in ["true", "false"] {
        let r = probe_open(&secret, &["--state-dir", state_arg, "--seccomp", seccomp]);
        assert!(
            r.contains("Permission denied"),
            "--seccomp {seccomp}: opening {} outside the VM's paths: {r}",
            secret.display()
        );
    }
    // A host file everyone knows.
    let r = probe_open(Path::new("/etc/passwd"), &["--state-dir", state_arg]);
    assert!(r.contains("Permission denied"), "/etc/passwd: {r}");
    // Inside its checkpoint location: allowed.
    let r = probe_open(&inside, &["--state-dir", state_arg]);
    assert_eq!(r, "ok", "opening {} in the state dir", inside.display());
    // With --allow-path the folder outside is allowed.
    let allow = outside.path().to_str().unwrap();
    let r = probe_open(&secret, &["--state-dir", state_arg, "--allow-path", allow]);
    assert_eq!(r, "ok", "opening {} under --allow-path", secret.display());
}

/// `strata ctl --api-socket SOCK ARGS`: exit code and stdout + stderr.
fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(strata_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn exports_go_only_beneath_the_state_dir_and_allow_path_folders() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let allowed = dir.path().join("backups");
    std::fs::create_dir(&allowed).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut s = Strata::spawn(
        &[
            "--console",
            "none",
            "--api-socket",
            sock.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--checkpoint-type",
            "standard",
            "--allow-path",
            allowed.to_str().unwrap(),
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctl(&sock, &["vm", "status"]).0 != Some(0) {
        assert!(Instant::now() < deadline, "no API: {}", s.collected);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out) = ctl(&sock, &["--json", "checkpoint", "create", "--name", "c"]);
    assert_eq!(code, Some(0), "create: {out}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Outside: refused before anything is written, saying what to do.
    let refused = outside.path().join("export");
    let (code, out) = ctl(
        &sock,
        &["checkpoint", "export", &id, refused.to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "export outside: {out}");
    assert!(out.contains("--allow-path"), "export outside: {out}");
    assert!(!refused.exists());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    // Beneath --allow-path and the state dir: written.
    for dest in [allowed.join("export"), state.join("export")] {
        let (code, out) = ctl(
            &sock,
            &["checkpoint", "export", &id, dest.to_str().unwrap()],
        );
        assert_eq!(code, Some(0), "export to {}: {out}", dest.display());
        assert!(dest.join("manifest.json").exists(), "{}", dest.display());
    }
    assert!(
        s.wait_exit(Duration::from_millis(1)).is_none(),
        "{}",
        s.collected
    );
}
