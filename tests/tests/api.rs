//! The API and `strata ctl` against the real VMM and the test guest: every lifecycle action in
//! every state, what `GET /v1/vm` reports, the checkpoint settings in every state, the guest
//! routes with and without an agent, load while the guest counts, and schemathesis against the
//! live server. These are the only tests of what the VMM answers; the `api` crate's own tests
//! cover the HTTP layer with a handler that has no rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use api::types::{VmInfo, VmState};
use api::{Client, LifecycleAction};
use serde_json::{json, Value};
use strata_tests::{api_client, strata_bin, Vm, BOOT_TIMEOUT};

/// How long an API call or a `strata ctl` run may take before the test calls it hung.
const HANG_GUARD: Duration = Duration::from_secs(60);

const CHECKPOINT_TYPES: [&str; 4] = ["disabled", "standard", "production", "production-only"];

/// A test guest booted with an API socket, ready on its console.
struct Guest {
    vm: Vm,
    sock: PathBuf,
    vsock: PathBuf,
    c: Client,
    dir: tempfile::TempDir,
}

/// Where a guest's sockets go, before it boots.
struct Paths {
    dir: tempfile::TempDir,
    sock: PathBuf,
    vsock: PathBuf,
}

fn paths() -> Paths {
    let dir = tempfile::tempdir().unwrap();
    Paths {
        sock: dir.path().join("api.sock"),
        vsock: dir.path().join("v.sock"),
        dir,
    }
}

/// Boots the test guest with an API socket, a vsock device (and so the guest agent) if
/// `agent`, and `extra` flags.
fn boot_at(p: Paths, agent: bool, extra: &[&str]) -> Guest {
    let vsock_arg = format!("cid=3,socket={}", p.vsock.display());
    let mut args = vec!["--memory", "64M", "--api-socket", p.sock.to_str().unwrap()];
    if agent {
        args.extend(["--vsock", &vsock_arg]);
    }
    args.extend_from_slice(extra);
    let mut vm = Vm::start(&args);
    vm.wait_ready();
    let c = api_client(&p.sock);
    Guest {
        vm,
        sock: p.sock,
        vsock: p.vsock,
        c,
        dir: p.dir,
    }
}

fn boot(agent: bool, extra: &[&str]) -> Guest {
    boot_at(paths(), agent, extra)
}

/// Polls `GET /v1/guest` until the agent answers.
fn wait_agent(c: &Client) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while let Err(e) = c.guest() {
        assert!(
            Instant::now() < deadline,
            "the guest agent never answered: {e}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the fresh boot that `start` began.
fn wait_boot(vm: &mut Vm) {
    vm.wait_for(BOOT_TIMEOUT, |l| l.ends_with("strata test guest booting"));
    vm.wait_ready();
}

/// An answer as it came off the socket.
#[derive(Debug)]
struct Resp {
    status: u16,
    body: Value,
}

impl Resp {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }
}

/// The API crate's raw HTTP client, which sends exactly the bytes a test wants.
#[path = "../../api/tests/common/http.rs"]
mod raw_http;

/// Sends one request with exactly `body` and returns the status and the JSON answer.
fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Resp {
    let r = raw_http::http(sock, method, path, body.map(str::as_bytes));
    Resp {
        status: r.status,
        body: r.json(),
    }
}

/// What a lifecycle call may change, and must not when refused.
fn lifecycle_view(v: &VmInfo) -> (VmState, Option<String>, Value) {
    let rest = json!([v.config, v.checkpoint_config, v.current_checkpoint]);
    (v.state, v.last_exit.clone(), rest)
}

/// Asks for `action` with the VM in `from`. `Some(to)`: it must answer the VM in `to` and stay
/// there. `None`: it must answer 409 `invalid_state` and change nothing. Returns the VM after.
fn act(c: &Client, action: LifecycleAction, from: VmState, to: Option<VmState>) -> VmInfo {
    let before = c.vm().unwrap();
    assert_eq!(before.state, from, "the test walked to the wrong state");
    match (c.lifecycle(action), to) {
        (Ok(after), Some(to)) => {
            assert_eq!(after.state, to, "{action:?} from {from}");
            let now = c.vm().unwrap();
            assert_eq!(
                lifecycle_view(&now),
                lifecycle_view(&after),
                "{action:?} from {from}"
            );
            after
        }
        (Err(e), None) => {
            assert_eq!(
                e.api_code(),
                Some("invalid_state"),
                "{action:?} from {from}: {e}"
            );
            let now = c.vm().unwrap();
            assert_eq!(
                lifecycle_view(&now),
                lifecycle_view(&before),
                "a refused {action:?} changed the VM"
            );
            before
        }
        (result, to) => panic!("{action:?} from {from}: expected {to:?}, got {result:?}"),
    }
}

/// A `strata ctl` process.
struct Ctl {
    child: Child,
    args: Vec<String>,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

/// What a `strata ctl` run printed and how it exited.
#[derive(Debug)]
struct CtlRun {
    code: Option<i32>,
    out: String,
    err: String,
}

fn spawn_ctl(sock: &Path, cwd: Option<&Path>, args: &[&str]) -> Ctl {
    let mut cmd = Command::new(strata_bin());
    cmd.args(["ctl", "--api-socket"])
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            pipe.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    Ctl {
        child,
        args: args.iter().map(|a| a.to_string()).collect(),
        out,
        err,
    }
}

impl Ctl {
    /// Waits for it to exit; kills it and fails the test if it hangs.
    fn finish(mut self) -> CtlRun {
        let deadline = Instant::now() + HANG_GUARD;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "strata ctl {:?} hung: still running after {HANG_GUARD:?}",
                    self.args
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        CtlRun {
            code: status.code(),
            out: self.out.join().unwrap(),
            err: self.err.join().unwrap(),
        }
    }
}

/// Runs `strata ctl --api-socket SOCK ARGS...`.
fn ctl(sock: &Path, args: &[&str]) -> CtlRun {
    spawn_ctl(sock, None, args).finish()
}

#[test]
fn every_lifecycle_action_in_every_state() {
    use LifecycleAction::*;
    use VmState::*;
    let p = paths();
    let disk = p.dir.path().join("disk0.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={},readonly=on", disk.display());
    let cmdline = "console=ttyS0 strata.api-test=1";
    let mut g = boot_at(
        p,
        true,
        &["--vcpus", "2", "--disk", &disk_arg, "--cmdline", cmdline],
    );
    let c = &g.c;

    // What the VM reports of itself.
    let r = http(&g.sock, "GET", "/v1/vm", None);
    assert_eq!(r.status, 200);
    let want = json!({
        "state": "running",
        "config": {
            "vcpus": 2,
            "memory_mib": 64,
            "kernel": "embedded test guest",
            "cmdline": cmdline,
            "disks": [{"path": disk.display().to_string(), "readonly": true}],
            "vsock": {"cid": 3, "socket": g.vsock.display().to_string()},
        },
        "checkpoint_config": {"type": "production", "location": null},
        "current_checkpoint": null,
        "last_exit": null,
    });
    for (key, value) in want.as_object().unwrap() {
        assert_eq!(&r.body[key], value, "GET /v1/vm: {key}");
    }

    // running
    act(c, Start, Running, None);
    act(c, Resume, Running, None);
    act(c, Pause, Running, Some(Paused));

    // paused: the vCPUs do not run, so the guest cannot answer its console until resumed.
    g.vm.send("echo while-paused\n");
    std::thread::sleep(Duration::from_millis(500));
    while let Some(line) = g.vm.try_line(Duration::ZERO) {
        assert!(!line.contains("while-paused"), "a paused guest answered");
    }
    act(c, Start, Paused, None);
    act(c, Pause, Paused, None);
    act(c, Shutdown, Paused, None);
    act(c, Resume, Paused, Some(Running));
    g.vm.wait_for(BOOT_TIMEOUT, |l| l == "while-paused");
    act(c, Pause, Running, Some(Paused));
    let off = act(c, Stop, Paused, Some(Off));
    assert_eq!(off.last_exit.as_deref(), Some("stopped"));

    // off (each refusal also leaves last_exit as it was)
    for action in [Pause, Resume, Stop, Shutdown] {
        act(c, action, Off, None);
    }
    let on = act(c, Start, Off, Some(Running));
    assert_eq!(on.last_exit, None);
    wait_boot(&mut g.vm);

    // running → stop: a hard power-off.
    let off = act(c, Stop, Running, Some(Off));
    assert_eq!(off.last_exit.as_deref(), Some("stopped"));

    // running → shutdown asks the guest through its agent; the answer comes once it is off.
    act(c, Start, Off, Some(Running));
    wait_boot(&mut g.vm);
    wait_agent(c);
    let off = act(c, Shutdown, Running, Some(Off));
    assert_eq!(off.last_exit.as_deref(), Some("poweroff"));

    // A guest that powers itself off leaves the VMM up, the VM off.
    act(c, Start, Off, Some(Running));
    wait_boot(&mut g.vm);
    g.vm.send("poweroff\n");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while c.vm().unwrap().state != Off {
        assert!(Instant::now() < deadline, "the VM never went off");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.vm().unwrap().last_exit.as_deref(), Some("poweroff"));
    act(c, Start, Off, Some(Running));
    wait_boot(&mut g.vm);
    assert_eq!(g.vm.line("echo back again"), "back again");
}

#[test]
fn checkpoint_config_is_kept_in_every_state_and_bad_bodies_change_nothing() {
    use LifecycleAction::*;
    use VmState::*;
    let g = boot(false, &[]);
    let c = &g.c;
    let get = || http(&g.sock, "GET", "/v1/vm/checkpoint-config", None);
    let put = |body: &str| http(&g.sock, "PUT", "/v1/vm/checkpoint-config", Some(body));
    let vm = || http(&g.sock, "GET", "/v1/vm", None).body;

    let default = json!({"type": "production", "location": null});
    assert_eq!((get().status, get().body), (200, default.clone()));
    assert_eq!(vm()["checkpoint_config"], default);

    let keep = json!({"type": "production-only", "location": "/keep"});
    let mut state = Running;
    for (reach, next) in [(None, Running), (Some(Pause), Paused), (Some(Stop), Off)] {
        if let Some(action) = reach {
            act(c, action, state, Some(next));
            state = next;
        }
        for t in CHECKPOINT_TYPES {
            let want = json!({"type": t, "location": format!("/var/lib/strata/{state}-{t}")});
            let r = put(&want.to_string());
            assert_eq!((r.status, &r.body), (200, &want), "PUT {want} when {state}");
            assert_eq!(get().body, want, "GET after PUT {want} when {state}");
            let v = vm();
            assert_eq!(v["checkpoint_config"], want);
            assert_eq!(v["state"], state.to_string(), "PUT changed the state");
        }
        // No location and a null location both mean none.
        let r = put(r#"{"type":"standard"}"#);
        assert_eq!(r.body, json!({"type": "standard", "location": null}));
        let r = put(r#"{"type":"disabled","location":null}"#);
        assert_eq!(r.body, json!({"type": "disabled", "location": null}));
        assert_eq!(get().body["location"], Value::Null);

        assert_eq!(put(&keep.to_string()).status, 200);
        for body in [
            "",
            "{",
            "not json",
            "[\"standard\", null]",
            "null",
            "{}",
            r#"{"location":"/x"}"#,
            r#"{"type":"fast"}"#,
            r#"{"type":"Production"}"#,
            r#"{"type":5}"#,
            r#"{"type":null}"#,
            r#"{"type":"standard","location":5}"#,
            r#"{"type":"standard","location":"relative/dir"}"#,
            r#"{"type":"standard","location":""}"#,
            r#"{"type":"standard","location":"/a\u0000b"}"#,
            r#"{"type":"standard","extra":1}"#,
            r#"{"type":"standard","type":"disabled","x":1}"#,
        ] {
            let r = put(body);
            assert_eq!(r.status, 400, "body {body:?} when {state}: {:?}", r.body);
            assert_eq!(r.code(), "bad_request");
        }
        assert_eq!(get().body, keep, "a rejected PUT changed the settings");
        assert_eq!(vm()["state"], state.to_string());
    }
    // The settings outlive a cold boot.
    act(c, Start, Off, Some(Running));
    assert_eq!(get().body, keep);

    // strata ctl shows them, and changes one field keeping the other.
    let r = ctl(&g.sock, &["config", "checkpoints"]);
    assert_eq!(
        (r.code, r.out.as_str()),
        (Some(0), "type:     production-only\nlocation: /keep\n")
    );
    let r = ctl(
        &g.sock,
        &["config", "checkpoints", "--location", "/srv/ckpt"],
    );
    assert_eq!(
        (r.code, r.out.as_str()),
        (Some(0), "type:     production-only\nlocation: /srv/ckpt\n")
    );
    let r = ctl(&g.sock, &["config", "checkpoints", "--type", "standard"]);
    assert_eq!(
        (r.code, r.out.as_str()),
        (Some(0), "type:     standard\nlocation: /srv/ckpt\n")
    );
    // A relative location is made absolute against ctl's working directory.
    let cwd = std::fs::canonicalize(g.dir.path()).unwrap();
    let r = spawn_ctl(
        &g.sock,
        Some(&cwd),
        &["--json", "config", "checkpoints", "--location", "rel"],
    )
    .finish();
    assert_eq!(r.code, Some(0), "{}", r.err);
    let want = json!({"type": "standard", "location": cwd.join("rel").display().to_string()});
    assert_eq!(serde_json::from_str::<Value>(&r.out).unwrap(), want);
    assert_eq!(get().body, want);
}

#[test]
fn guest_routes_answer_through_the_agent_only_while_running() {
    use LifecycleAction::*;
    use VmState::*;
    let p = paths();
    // Started before the VM exists, `guest wait` waits for the socket, then for the agent.
    let waiting = spawn_ctl(&p.sock, None, &["guest", "wait", "--timeout", "60"]);
    let g = boot_at(p, true, &[]);
    let r = waiting.finish();
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(r.out.starts_with("agent: connected\n"), "{}", r.out);
    assert!(r.out.contains("\nhostname: test-guest\n"), "{}", r.out);

    let c = &g.c;
    let guest = c.guest().unwrap();
    assert_eq!(guest.info["agent"], "strata-test-guest");
    assert_eq!(guest.info["hostname"], "test-guest");
    let exec = |body: &str| http(&g.sock, "POST", "/v1/guest/exec", Some(body));
    let r = exec(r#"{"argv":["echo","hi","there"]}"#);
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"exit_code": 0, "stdout": "hi there", "stderr": ""})
    );
    // A command that fails in the guest is still a 200, with its status and reason.
    let r = exec(r#"{"argv":["blk","9","info"],"timeout_s":10}"#);
    assert_eq!(
        (r.status, &r.body["exit_code"]),
        (200, &json!(1)),
        "{:?}",
        r.body
    );
    let reason = r.body["stderr"].as_str().unwrap().to_owned();
    assert!(!reason.is_empty());

    // strata ctl relays the guest command's output and exits with its status.
    let r = ctl(&g.sock, &["guest", "ping"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(r.out.starts_with("agent: connected\n"), "{}", r.out);
    let r = ctl(&g.sock, &["guest", "exec", "--", "echo", "from", "ctl"]);
    assert_eq!(
        (r.code, r.out.as_str(), r.err.as_str()),
        (Some(0), "from ctl", "")
    );
    let r = ctl(
        &g.sock,
        &["guest", "exec", "--timeout", "10", "--", "blk", "9", "info"],
    );
    assert_eq!(
        (r.code, r.out.as_str(), r.err.as_str()),
        (Some(1), "", reason.as_str())
    );
    let r = ctl(&g.sock, &["--json", "guest", "exec", "--", "echo", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert_eq!(
        serde_json::from_str::<Value>(&r.out).unwrap(),
        json!({"exit_code": 0, "stdout": "json", "stderr": ""})
    );

    // Paused or off, the agent cannot be reached: 409, and `guest wait` gives up at once
    // instead of waiting out its timeout.
    for (action, from, state) in [(Pause, Running, Paused), (Stop, Paused, Off)] {
        act(c, action, from, Some(state));
        let r = http(&g.sock, "GET", "/v1/guest", None);
        assert_eq!(
            (r.status, r.code()),
            (409, "invalid_state"),
            "GET when {state}"
        );
        let r = exec(r#"{"argv":["echo","x"]}"#);
        assert_eq!(
            (r.status, r.code()),
            (409, "invalid_state"),
            "exec when {state}"
        );
        let r = ctl(&g.sock, &["guest", "wait", "--timeout", "3600"]);
        assert_eq!(r.code, Some(1), "when {state}");
        assert!(r.err.contains("(invalid_state)"), "{}", r.err);
    }
}

#[test]
fn without_an_agent_guest_calls_are_503_and_ctl_drives_the_lifecycle() {
    let g = boot(false, &[]);
    let c = &g.c;

    let r = ctl(&g.sock, &["vm", "status"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(
        r.out.starts_with("state:              running\n"),
        "{}",
        r.out
    );
    assert!(r.out.contains("\nvsock:              -\n"), "{}", r.out);
    assert!(r.out.contains("\nlast exit:          -\n"), "{}", r.out);
    let r = ctl(&g.sock, &["--json", "vm", "status"]);
    let v: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(
        (&v["state"], &v["config"]["memory_mib"]),
        (&json!("running"), &json!(64))
    );

    // No vsock device, no agent: 503, and a shutdown request changes nothing.
    let r = http(&g.sock, "GET", "/v1/guest", None);
    assert_eq!((r.status, r.code()), (503, "agent_unreachable"));
    let r = http(
        &g.sock,
        "POST",
        "/v1/guest/exec",
        Some(r#"{"argv":["true"]}"#),
    );
    assert_eq!((r.status, r.code()), (503, "agent_unreachable"));
    let before = c.vm().unwrap();
    let r = http(&g.sock, "POST", "/v1/vm/shutdown", None);
    assert_eq!((r.status, r.code()), (503, "agent_unreachable"));
    assert_eq!(lifecycle_view(&c.vm().unwrap()), lifecycle_view(&before));
    let r = ctl(&g.sock, &["guest", "ping"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("(agent_unreachable)"), "{}", r.err);
    let r = ctl(&g.sock, &["guest", "wait", "--timeout", "1"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.err
            .starts_with("strata: error: the guest agent did not answer within 1 s"),
        "{}",
        r.err
    );

    // Each lifecycle command prints the new state, or fails with the reason in one line.
    let ok = |args: &[&str], out: &str| {
        let r = ctl(&g.sock, args);
        assert_eq!(
            (r.code, r.out.as_str(), r.err.as_str()),
            (Some(0), out, ""),
            "{args:?}"
        );
    };
    let refused = |args: &[&str], err: &str| {
        let r = ctl(&g.sock, args);
        assert_eq!((r.code, r.out.as_str()), (Some(1), ""), "{args:?}");
        assert_eq!(r.err, format!("strata: error: {err}\n"), "{args:?}");
    };
    ok(&["vm", "pause"], "state: paused\n");
    refused(
        &["vm", "pause"],
        "cannot pause a VM that is paused (invalid_state)",
    );
    ok(&["vm", "resume"], "state: running\n");
    ok(&["vm", "stop"], "state: off\n");
    refused(
        &["vm", "stop"],
        "cannot stop a VM that is off (invalid_state)",
    );
    let r = ctl(&g.sock, &["vm", "status"]);
    assert!(r.out.starts_with("state:              off\n"), "{}", r.out);
    assert!(
        r.out.contains("\nlast exit:          stopped\n"),
        "{}",
        r.out
    );
    ok(&["vm", "start"], "state: running\n");
    let r = ctl(&g.sock, &["--json", "vm", "pause"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let v: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["state"], "paused");
    assert_eq!(c.vm().unwrap().state, VmState::Paused);
}

/// The guest's per-CPU counters (`count get`: the sum, then `per-cpu A B ...`).
fn counters(vm: &mut Vm) -> Vec<u64> {
    let out = vm.command("count get").ok();
    let per_cpu = out
        .get(1)
        .and_then(|l| l.strip_prefix("per-cpu "))
        .unwrap_or_else(|| panic!("count get: {out:?}"));
    per_cpu.split(' ').map(|n| n.parse().unwrap()).collect()
}

#[test]
fn a_thousand_requests_from_16_clients_while_the_guest_counts() {
    let mut g = boot(false, &["--vcpus", "2"]);
    g.vm.command("count start").ok();
    let before = counters(&mut g.vm);
    assert_eq!(before.len(), 2, "{before:?}");

    // Each client holds back its last request until the guest has been read twice during the
    // load, so that both readings fall between the load's first and last answers (a console
    // command takes about a second here while the guest counts, as long as the whole load).
    let answered = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let sock = g.sock.clone();
            let answered = answered.clone();
            let gate = gate.clone();
            std::thread::spawn(move || {
                let c = Client::new(&sock).unwrap().with_timeout(HANG_GUARD);
                let n = if t < 8 { 63 } else { 62 };
                for i in 0..n {
                    if i == n - 1 {
                        let (open, cv) = &*gate;
                        let guard = open.lock().unwrap();
                        let (guard, _) = cv.wait_timeout_while(guard, HANG_GUARD, |o| !*o).unwrap();
                        assert!(*guard, "the test never opened the gate");
                    }
                    if i % 2 == 0 {
                        assert_eq!(c.vm().unwrap().state, VmState::Running);
                    } else {
                        c.checkpoint_config().unwrap();
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                n
            })
        })
        .collect();

    let deadline = Instant::now() + HANG_GUARD;
    while answered.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the API answered no request: hung"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let answered_before = answered.load(Ordering::SeqCst);
    let first = counters(&mut g.vm);
    let second = counters(&mut g.vm);
    let answered_after = answered.load(Ordering::SeqCst);
    {
        let (open, cv) = &*gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 1000);
    let after = counters(&mut g.vm);
    g.vm.command("count stop").ok();

    // The API kept answering while the console was read...
    assert!(
        answered_before < answered_after && answered_after <= 1000 - 16,
        "answered {answered_before} before the readings, {answered_after} after"
    );
    // ...and every vCPU kept counting: before the load, twice during it, after it.
    let series = [before, first, second, after];
    for cpu in 0..2 {
        assert!(
            series.windows(2).all(|w| w[0][cpu] < w[1][cpu]),
            "vCPU {cpu} stopped counting under load: {series:?}"
        );
    }
}

#[test]
fn schemathesis_against_the_live_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // With the agent reachable over vsock, a 5xx can only be a bug.
    let vsock = dir.path().join("vsock.sock");
    let mut child = Command::new(strata_bin())
        .args([
            "run",
            "--memory",
            "64M",
            "--console",
            "none",
            "--api-socket",
        ])
        .arg(&sock)
        .arg(format!("--vsock=cid=3,socket={}", vsock.display()))
        .spawn()
        .unwrap();
    api_client(&sock);

    let output = strata_tests::schemathesis::run(&sock, 25, dir.path());

    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the VMM died under schemathesis");
    assert!(
        output.status.success(),
        "schemathesis found problems (exit {:?})",
        output.status.code()
    );
}
