//! The API against the real VMM and the test guest: lifecycle in every state, concurrency,
//! the CLI client, and schemathesis against the live server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api::types::VmState;
use api::{Client, LifecycleAction};
use strata_tests::{strata_bin, Vm};

fn client(sock: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(c) = Client::new(sock) {
            if c.vm().is_ok() {
                return c.with_timeout(Duration::from_secs(60));
            }
        }
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the test guest with an API socket (and `extra` flags), ready on its console.
fn api_vm(extra: &[&str]) -> (Vm, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut args = vec!["--memory", "64M", "--api-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm = Vm::start(&args);
    vm.wait_ready();
    (vm, sock, dir)
}

/// Runs `strata ctl --api-socket SOCK ARGS...`.
fn ctl(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(strata_bin())
        .args(["ctl", "--api-socket"])
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

fn conflict(c: &Client, action: LifecycleAction) {
    let err = c.lifecycle(action).unwrap_err();
    assert_eq!(err.api_code(), Some("invalid_state"), "{action:?}: {err}");
}

#[test]
fn lifecycle_through_the_api_follows_the_guest() {
    let (mut vm, sock, _dir) = api_vm(&["--vcpus", "2"]);
    let c = client(&sock);
    assert_eq!(c.vm().unwrap().state, VmState::Running);
    conflict(&c, LifecycleAction::Start);
    conflict(&c, LifecycleAction::Resume);

    // Paused: the guest does not run, so it cannot answer its console.
    assert_eq!(
        c.lifecycle(LifecycleAction::Pause).unwrap().state,
        VmState::Paused
    );
    conflict(&c, LifecycleAction::Pause);
    conflict(&c, LifecycleAction::Shutdown);
    vm.send("echo while-paused\n");
    std::thread::sleep(Duration::from_millis(800));
    assert!(!vm.transcript.iter().any(|l| l.contains("while-paused")));
    assert_eq!(
        c.lifecycle(LifecycleAction::Resume).unwrap().state,
        VmState::Running
    );
    vm.wait_for(Duration::from_secs(30), |l| l == "while-paused");

    // Stop is a hard power-off; start cold-boots.
    let off = c.lifecycle(LifecycleAction::Stop).unwrap();
    assert_eq!(
        (off.state, off.last_exit.as_deref()),
        (VmState::Off, Some("stopped"))
    );
    conflict(&c, LifecycleAction::Stop);
    conflict(&c, LifecycleAction::Pause);
    assert_eq!(
        c.lifecycle(LifecycleAction::Start).unwrap().state,
        VmState::Running
    );
    vm.wait_for(Duration::from_secs(30), |l| {
        l.ends_with("strata test guest booting")
    });
    assert_eq!(vm.wait_ready(), 2);

    // A guest power-off leaves the VMM up with the VM off.
    vm.send("poweroff\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.vm().unwrap().state != VmState::Off {
        assert!(Instant::now() < deadline, "the VM never went off");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.vm().unwrap().last_exit.as_deref(), Some("poweroff"));
    c.lifecycle(LifecycleAction::Start).unwrap();
    assert_eq!(vm.wait_ready(), 2);
    assert_eq!(vm.line("echo back again"), "back again");
}

#[test]
fn a_thousand_requests_from_16_clients_while_the_guest_counts() {
    let (mut vm, sock, _dir) = api_vm(&["--vcpus", "2"]);
    client(&sock);
    vm.command("count start").ok();

    let threads: Vec<_> = (0..16)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let c = Client::new(&sock).unwrap();
                let n = if t < 8 { 63 } else { 62 };
                for i in 0..n {
                    if i % 2 == 0 {
                        assert_eq!(c.vm().unwrap().state, VmState::Running);
                    } else {
                        c.checkpoint_config().unwrap();
                    }
                }
                n
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();

    assert_eq!(total, 1000);
    assert_eq!(vm.line("echo still answering"), "still answering");
    assert_eq!(vm.command("count get").ok().len(), 2);
}

#[test]
fn strata_ctl_drives_the_vm() {
    let (_vm, sock, _dir) = api_vm(&[]);
    client(&sock);
    let ctl = |args: &[&str]| ctl(&sock, args);

    let out = ctl(&["vm", "pause"]);
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&["--json", "vm", "status"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["state"], "paused");
    let out = ctl(&["vm", "pause"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_state"));
    // No agent without vsock: a clear 503.
    let out = ctl(&["vm", "resume"]);
    assert!(out.status.success());
    let out = ctl(&["guest", "ping"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent_unreachable"));
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
    client(&sock);

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

#[test]
fn guest_routes_and_shutdown_go_through_the_agent() {
    let vsock_dir = tempfile::tempdir().unwrap();
    let vsock = format!("cid=3,socket={}", vsock_dir.path().join("v.sock").display());
    let (_vm, sock, _dir) = api_vm(&["--vsock", &vsock]);
    let c = client(&sock);
    let ctl = |args: &[&str]| ctl(&sock, args);

    let out = ctl(&["guest", "wait", "--timeout", "30"]);
    assert!(out.status.success(), "{out:?}");
    let guest = c.guest().unwrap();
    assert_eq!(guest.info["agent"], "strata-test-guest");
    let out = ctl(&["guest", "exec", "--", "echo", "from", "ctl"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "from ctl");
    // The guest command's failure is ctl's exit status.
    let out = ctl(&["guest", "exec", "--", "blk", "9", "info"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // shutdown asks the guest, which powers itself off; the answer comes once the VM is off.
    let done = c.lifecycle(LifecycleAction::Shutdown).unwrap();
    assert_eq!(
        (done.state, done.last_exit.as_deref()),
        (VmState::Off, Some("poweroff"))
    );
    assert_eq!(c.vm().unwrap().state, VmState::Off);
    // Off: the agent cannot be reached, and says so with 409.
    assert_eq!(c.guest().unwrap_err().api_code(), Some("invalid_state"));
}
