//! The agent binary on the host, over `--unix`, against loop-mounted ext4 filesystems.
//!
//! These tests need root, `mkfs.ext4` (e2fsprogs), `losetup`, `fsfreeze` and `mount`/`umount`
//! (util-linux, mount): CI runs them as root on Debian. Every agent gets `--only` with the test's
//! own mount points, so the host's filesystems are never frozen, and every fixture's `Drop`
//! thaws (`fsfreeze -u`), stops the agent, unmounts and detaches the loop device even when a
//! test fails. Tests that use loop devices run one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure is a test failure

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

/// How long a write on a frozen filesystem is watched to stay blocked.
const BLOCKED: Duration = Duration::from_secs(1);
/// How long a write may take once nothing is frozen.
const PROMPTLY: Duration = Duration::from_secs(10);

static LOOP_DEVICES: Mutex<()> = Mutex::new(());

/// Serialises the tests that use loop devices (a failed test must not block the others).
fn serial() -> MutexGuard<'static, ()> {
    LOOP_DEVICES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The path of a system tool, or a panic saying what to install.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` not found: the guest-agent tests need root, e2fsprogs (mkfs.ext4), \
         util-linux (losetup, fsfreeze) and mount"
    );
}

/// Runs a tool; panics with its stderr when it fails.
fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a tool for cleanup: failures are printed, not fatal.
fn run_quietly(name: &str, args: &[&str]) -> bool {
    Command::new(tool(name))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn require_root() {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the guest-agent tests need root (loop devices, mount, FIFREEZE); run them as root"
    );
}

/// A 64 MiB ext4 image, loop-attached and mounted on a temporary directory.
struct LoopFs {
    /// The canonical mount point (as /proc/self/mounts shows it).
    mount_point: PathBuf,
    device: String,
    _dir: TempDir,
}

impl LoopFs {
    fn new() -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let image_s = image.to_str().unwrap();
        run("mkfs.ext4", &["-q", "-F", image_s]);
        let device = run("losetup", &["--find", "--show", image_s]);
        let mount_point = dir.path().join("mnt");
        fs::create_dir(&mount_point).unwrap();
        let mount_point = mount_point.canonicalize().unwrap();
        let fs = Self {
            mount_point,
            device,
            _dir: dir,
        };
        // From here on Drop detaches the device even if mounting fails.
        run("mount", &[&fs.device, fs.mount_str()]);
        fs
    }

    fn mount_str(&self) -> &str {
        self.mount_point.to_str().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount_point.join(name)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mnt = self.mount_str().to_string();
        // Never leave it frozen, whatever happened.
        run_quietly("fsfreeze", &["-u", &mnt]);
        // Writers blocked on the freeze finish just now: give them a moment.
        let mut unmounted = false;
        for _ in 0..50 {
            if run_quietly("umount", &[&mnt]) {
                unmounted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !unmounted {
            eprintln!("umount {mnt} keeps failing; detaching lazily");
            run_quietly("umount", &["-l", &mnt]);
        }
        if !run_quietly("losetup", &["-d", &self.device]) {
            eprintln!("losetup -d {} failed", self.device);
        }
    }
}

/// The agent binary, listening on a Unix socket.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Agent {
    /// Starts the agent freezing only `only`, with `hooks` as its hooks directory.
    fn start(only: &[&Path], hooks: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata-guest-agent"));
        cmd.arg("--unix").arg(&socket).arg("--hooks-dir").arg(hooks);
        if only.is_empty() {
            // Nothing to freeze: an empty mount table and a mount point that does not exist.
            let mounts = dir.path().join("mounts");
            fs::write(&mounts, "").unwrap();
            cmd.arg("--mounts")
                .arg(&mounts)
                .arg("--only")
                .arg("/nonexistent/strata");
        }
        for m in only {
            cmd.arg("--only").arg(m);
        }
        let child = cmd.spawn().unwrap();
        let agent = Self {
            child,
            socket,
            _dir: dir,
        };
        let start = Instant::now();
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "hang guard: the agent did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn connect(&self) -> Conn {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Conn {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends SIGTERM and waits for the agent to exit.
    fn terminate(&mut self) {
        // SAFETY: kill(2) takes no pointers; the child is ours and not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "hang guard: the agent ignored SIGTERM for 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One protocol connection.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    /// Sends one raw line; returns the reply object.
    fn call(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "no reply line to {line}: {reply:?}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"))
    }
}

/// Creates `path`, writes to it and fsyncs it on a thread; reports when done.
fn write_in_background(path: PathBuf) -> Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = File::create(&path).and_then(|mut f| {
            f.write_all(b"written while the test watched\n")?;
            f.sync_all()
        });
        let _ = tx.send(result);
    });
    rx
}

fn assert_blocked(write: &Receiver<std::io::Result<()>>, how_long: Duration) {
    if let Ok(result) = write.recv_timeout(how_long) {
        panic!("a write finished on a frozen filesystem: {result:?}");
    }
}

fn assert_completes(write: &Receiver<std::io::Result<()>>) {
    match write.recv_timeout(PROMPTLY) {
        Ok(result) => result.unwrap(),
        Err(_) => panic!("a write did not finish within {PROMPTLY:?} of the thaw"),
    }
}

/// A hooks directory whose hooks log `<name> <arg>` lines to `calls` in it.
fn hooks_dir(hooks: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    for (name, body) in hooks {
        let path = dir.path().join(name);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{name} $1\" >> '{}'\n{body}\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn hook_calls(dir: &TempDir) -> String {
    fs::read_to_string(dir.path().join("calls")).unwrap_or_default()
}

#[test]
fn freeze_blocks_writes_until_thaw_from_any_connection() {
    let _serial = serial();
    let fs = LoopFs::new();
    let hooks = hooks_dir(&[("10-db", "true")]);
    let agent = Agent::start(&[&fs.mount_point], hooks.path());
    let mut c = agent.connect();

    let r = c.call(r#"{"op":"freeze","timeout_s":60}"#);
    assert_eq!(r, json!({"ok": true, "frozen": [fs.mount_str()]}));
    let write = write_in_background(fs.path("f"));
    assert_blocked(&write, BLOCKED);
    assert_eq!(hook_calls(&hooks), "10-db freeze\n");

    // A second freeze is refused and changes nothing.
    let r = c.call(r#"{"op":"freeze","timeout_s":60}"#);
    assert_eq!(r, json!({"ok": false, "error": "already frozen"}));
    assert_blocked(&write, Duration::from_millis(200));

    let r = agent.connect().call(r#"{"op":"thaw"}"#);
    assert_eq!(r, json!({"ok": true, "thawed": [fs.mount_str()]}));
    assert_completes(&write);
    assert_eq!(hook_calls(&hooks), "10-db freeze\n10-db thaw\n");
    assert_eq!(
        c.call(r#"{"op":"thaw"}"#),
        json!({"ok": true, "thawed": []})
    );
}

#[test]
fn a_failing_hook_fails_freeze_and_leaves_nothing_frozen() {
    let _serial = serial();
    let fs = LoopFs::new();
    let hooks = hooks_dir(&[
        ("10-first", "true"),
        (
            "20-broken",
            "[ \"$1\" = thaw ] || { echo 'cannot quiesce' >&2; exit 1; }",
        ),
        ("30-never", "true"),
    ]);
    let agent = Agent::start(&[&fs.mount_point], hooks.path());
    let mut c = agent.connect();

    let r = c.call(r#"{"op":"freeze","timeout_s":60}"#);
    assert_eq!(r["ok"], false, "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("20-broken"), "{error}");
    assert!(error.contains("exit status 1"), "{error}");
    assert!(error.contains("cannot quiesce"), "{error}");
    assert_completes(&write_in_background(fs.path("f")));
    assert_eq!(
        hook_calls(&hooks),
        "10-first freeze\n20-broken freeze\n10-first thaw\n"
    );
    assert_eq!(
        c.call(r#"{"op":"thaw"}"#),
        json!({"ok": true, "thawed": []})
    );
}

#[test]
fn a_failing_fifreeze_thaws_the_filesystems_already_frozen() {
    let _serial = serial();
    let first = LoopFs::new();
    let second = LoopFs::new();
    let hooks = hooks_dir(&[("10-db", "true")]);
    let agent = Agent::start(&[&first.mount_point, &second.mount_point], hooks.path());
    // Frozen by someone else: the agent's FIFREEZE on it fails with EBUSY.
    run("fsfreeze", &["-f", second.mount_str()]);

    let r = agent.connect().call(r#"{"op":"freeze","timeout_s":60}"#);
    run("fsfreeze", &["-u", second.mount_str()]);
    assert_eq!(r["ok"], false, "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("FIFREEZE {}", second.mount_str())),
        "{error}"
    );
    assert_completes(&write_in_background(first.path("f")));
    assert_eq!(hook_calls(&hooks), "10-db freeze\n10-db thaw\n");
}

#[test]
fn the_lease_thaws_by_itself_and_thaw_reports_it() {
    let _serial = serial();
    let fs = LoopFs::new();
    let hooks = hooks_dir(&[("10-db", "true")]);
    let agent = Agent::start(&[&fs.mount_point], hooks.path());
    let mut c = agent.connect();

    let frozen_at = Instant::now();
    let r = c.call(r#"{"op":"freeze","timeout_s":1}"#);
    assert_eq!(r, json!({"ok": true, "frozen": [fs.mount_str()]}));
    let write = write_in_background(fs.path("f"));
    assert_blocked(&write, Duration::from_millis(500));
    assert_completes(&write);
    assert!(
        frozen_at.elapsed() >= Duration::from_millis(900),
        "thawed after {:?}",
        frozen_at.elapsed()
    );
    // (The write may finish between FITHAW and the thaw hooks; thaw waits for both.)
    assert_eq!(
        c.call(r#"{"op":"thaw"}"#),
        json!({"ok": true, "thawed": [], "lease_expired": true})
    );
    assert_eq!(hook_calls(&hooks), "10-db freeze\n10-db thaw\n");
}

#[test]
fn sigterm_thaws_before_the_agent_exits() {
    let _serial = serial();
    let fs = LoopFs::new();
    let hooks = hooks_dir(&[("10-db", "true")]);
    let mut agent = Agent::start(&[&fs.mount_point], hooks.path());

    let r = agent.connect().call(r#"{"op":"freeze","timeout_s":60}"#);
    assert_eq!(r["ok"], true, "{r}");
    let write = write_in_background(fs.path("f"));
    assert_blocked(&write, Duration::from_millis(300));
    agent.terminate();
    assert_completes(&write);
    assert_eq!(hook_calls(&hooks), "10-db freeze\n10-db thaw\n");
}

#[test]
fn ping_info_and_exec_answer_and_bad_requests_keep_the_connection() {
    let hooks = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[], hooks.path());
    let mut c = agent.connect();

    assert_eq!(c.call(r#"{"op":"ping"}"#), json!({"ok": true}));
    let info = c.call(r#"{"op":"info"}"#);
    assert_eq!(info["agent"], "strata-guest-agent");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(
        info["kernel"],
        String::from_utf8_lossy(&uname.stdout).trim()
    );
    assert!(info["hostname"].is_string());

    let r = c.call(r#"{"op":"exec","argv":["echo","hi"],"timeout_s":10}"#);
    assert_eq!(
        r,
        json!({"ok": true, "exit_code": 0, "stdout": "hi\n", "stderr": ""})
    );
    let r = c.call(r#"{"op":"exec","argv":["false"],"timeout_s":10}"#);
    assert_eq!(r["exit_code"], 1, "{r}");

    // Killed at its 1 s timeout (the connection's 30 s read timeout guards against a hang).
    let r = c.call(r#"{"op":"exec","argv":["sleep","10"],"timeout_s":1}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["exit_code"], 124, "{r}");
    assert_eq!(r["timed_out"], true, "{r}");
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("killed after the 1 s timeout"),
        "{r}"
    );

    for bad in [
        "this is not json",
        "[1,2,3]",
        r#"{"op":"reboot"}"#,
        r#"{"argv":["true"]}"#,
        r#"{"op":"exec","timeout_s":1}"#,
        r#"{"op":"exec","argv":[],"timeout_s":1}"#,
        r#"{"op":"exec","argv":["/nonexistent/program"],"timeout_s":1}"#,
        r#"{"op":"freeze","timeout_s":-1}"#,
        r#"{"op":"ping","extra":true}"#,
    ] {
        let r = c.call(bad);
        assert_eq!(r["ok"], false, "{bad}: {r}");
        assert!(
            r["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {r}"
        );
        assert_eq!(
            c.call(r#"{"op":"ping"}"#),
            json!({"ok": true}),
            "after {bad}"
        );
    }
}

#[test]
fn exec_output_over_the_cap_is_truncated_with_a_note() {
    let hooks = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[], hooks.path());
    let r = agent
        .connect()
        .call(r#"{"op":"exec","argv":["head","-c","3000000","/dev/zero"],"timeout_s":30}"#);
    assert_eq!(r["exit_code"], 0, "{}", &r.to_string()[..200]);
    assert_eq!(r["truncated"], true);
    let stdout = r["stdout"].as_str().unwrap();
    assert!(stdout.len() < 1_100_000, "{}", stdout.len());
    assert!(stdout.ends_with("[strata-guest-agent: stdout truncated at 1048576 bytes]\n"));
}
