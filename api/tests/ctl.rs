//! `strata ctl` against the fake VMM: output, exit statuses, and `guest wait` for CI scripts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::ctl::{run_with, CtlArgs};
use api::types::{CheckpointType, VmState};
use clap::{Parser, Subcommand};
use common::fake::Fake;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    Ctl(CtlArgs),
}

struct Run {
    status: i32,
    out: String,
    err: String,
}

fn ctl(sock: &Path, args: &[&str]) -> Run {
    let sock = sock.to_str().unwrap();
    let mut full = vec!["strata", "ctl", "--api-socket", sock];
    full.extend_from_slice(args);
    let Top::Ctl(args) = Cli::try_parse_from(full).unwrap().command;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = run_with(args, &mut out, &mut err);
    Run {
        status,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, Fake) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let fake = Fake::start(&sock);
    (dir, sock, fake)
}

#[test]
fn vm_status_prints_text_or_json() {
    let (_d, sock, _fake) = setup();
    let r = ctl(&sock, &["vm", "status"]);
    assert_eq!(r.status, 0);
    assert!(
        r.out.starts_with("state:              running\n"),
        "{}",
        r.out
    );
    let r = ctl(&sock, &["--json", "vm", "status"]);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["config"]["memory_mib"], 64);
}

#[test]
fn lifecycle_commands_print_the_new_state_and_fail_in_the_wrong_state() {
    let (_d, sock, fake) = setup();
    let r = ctl(&sock, &["vm", "pause"]);
    assert_eq!((r.status, r.out.as_str()), (0, "state: paused\n"));
    let r = ctl(&sock, &["vm", "pause"]);
    assert_eq!(r.status, 1);
    assert!(
        r.err
            .starts_with("strata: error: cannot pause the VM: it is paused (invalid_state)"),
        "{}",
        r.err
    );
    assert_eq!(ctl(&sock, &["vm", "stop"]).status, 0);
    assert_eq!(ctl(&sock, &["vm", "start"]).status, 0);
    assert_eq!(ctl(&sock, &["vm", "shutdown"]).status, 0);
    assert_eq!(fake.snapshot().state, VmState::Off);
    assert_eq!(ctl(&sock, &["vm", "resume"]).status, 1);
}

#[test]
fn config_checkpoints_shows_and_sets_keeping_what_is_not_given() {
    let (_d, sock, fake) = setup();
    let r = ctl(&sock, &["config", "checkpoints"]);
    assert_eq!(r.out, "type:     production\nlocation: -\n");
    let r = ctl(&sock, &["config", "checkpoints", "--location", "/srv/ckpt"]);
    assert_eq!(r.status, 0, "{}", r.err);
    let r = ctl(&sock, &["config", "checkpoints", "--type", "standard"]);
    assert_eq!(r.out, "type:     standard\nlocation: /srv/ckpt\n");
    let c = fake.snapshot().checkpoint_config;
    assert_eq!(c.kind, CheckpointType::Standard);
    // A relative location is made absolute against the working directory.
    ctl(&sock, &["config", "checkpoints", "--location", "rel"]);
    let loc = fake.snapshot().checkpoint_config.location.unwrap();
    assert!(loc.starts_with('/') && loc.ends_with("/rel"), "{loc}");
}

#[test]
fn guest_exec_relays_output_and_exits_with_the_guest_status() {
    let (_d, sock, _fake) = setup();
    let r = ctl(&sock, &["guest", "exec", "--", "echo", "hello", "world"]);
    assert_eq!(
        (r.status, r.out.as_str(), r.err.as_str()),
        (0, "hello world\n", "")
    );
    let r = ctl(
        &sock,
        &["guest", "exec", "--timeout", "5", "--", "exit", "42"],
    );
    assert_eq!((r.status, r.err.as_str()), (42, "exiting\n"));
    let r = ctl(&sock, &["--json", "guest", "exec", "--", "nope"]);
    assert_eq!(r.status, 127);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["stderr"], "nope: not found\n");
}

#[test]
fn guest_ping_shows_the_agent() {
    let (_d, sock, fake) = setup();
    let r = ctl(&sock, &["guest", "ping"]);
    assert_eq!(r.status, 0);
    assert!(r.out.starts_with("agent: connected\n"));
    assert!(r.out.contains("hostname: fake"));
    fake.state.lock().unwrap().agent = false;
    let r = ctl(&sock, &["guest", "ping"]);
    assert_eq!(r.status, 1);
    assert!(r.err.contains("agent_unreachable"));
}

#[test]
fn guest_wait_waits_for_the_socket_and_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let later = sock.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let fake = Fake::start(&later);
        fake.state.lock().unwrap().agent = false;
        std::thread::sleep(Duration::from_millis(500));
        fake.state.lock().unwrap().agent = true;
        std::thread::sleep(Duration::from_secs(3));
        drop(fake);
    });
    let t = Instant::now();
    let r = ctl(&sock, &["guest", "wait", "--timeout", "10"]);
    assert_eq!(r.status, 0, "{}", r.err);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(r.out.starts_with("agent: connected"));
    starter.join().unwrap();
}

#[test]
fn guest_wait_times_out_with_exit_1() {
    let (_d, sock, fake) = setup();
    fake.state.lock().unwrap().agent = false;
    let t = Instant::now();
    let r = ctl(&sock, &["guest", "wait", "--timeout", "1"]);
    assert_eq!(r.status, 1);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(
        r.err
            .starts_with("strata: error: the guest agent did not answer within 1 s"),
        "{}",
        r.err
    );
}

#[test]
fn guest_wait_fails_at_once_when_the_vm_is_off() {
    let (_d, sock, fake) = setup();
    fake.set_state(VmState::Off);
    let t = Instant::now();
    let r = ctl(&sock, &["guest", "wait", "--timeout", "30"]);
    assert_eq!(r.status, 1);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(r.err.contains("invalid_state"));
}

#[test]
fn missing_socket_is_one_error_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let r = ctl(&sock, &["vm", "status"]);
    assert_eq!(r.status, 1);
    assert_eq!(r.err.lines().count(), 1);
    assert!(r.err.contains("cannot connect to API socket") && r.err.contains("none.sock"));
}
