//! `strata ctl` against a socket nobody serves, and the checkpoint commands against the
//! recording handler (`common::recorder`): what they send and what they print. What ctl prints
//! for each lifecycle, config and guest command is tested against the real `strata` in
//! `tests/tests/api.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

mod common;

use std::path::Path;
use std::sync::Arc;

use api::ctl::{run_with, CtlArgs};
use api::types::{ApplyCheckpoint, CheckpointType, CreateCheckpoint};
use api::{ApiCall, ApiError, ApiHandler, ApiRequest, ApiServer};
use clap::{Parser, Subcommand};
use common::recorder::{self, Recorder};

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

/// Runs a command that must succeed without writing to stderr.
fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let r = ctl(sock, args);
    assert_eq!(r.status, 0, "{args:?}: {}", r.err);
    assert_eq!(r.err, "", "{args:?}");
    r.out
}

struct Env {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    recorder: Recorder,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let recorder = Recorder::start(&sock);
    Env {
        _dir: dir,
        sock,
        recorder,
    }
}

#[test]
fn missing_socket_is_one_error_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let r = ctl(&sock, &["vm", "status"]);
    assert_eq!(r.status, 1);
    assert_eq!(r.out, "");
    assert_eq!(r.err.lines().count(), 1);
    assert!(r.err.contains("cannot connect to API socket") && r.err.contains("none.sock"));
}

#[test]
fn checkpoint_commands_send_their_requests() {
    let e = env();
    ctl_ok(&e.sock, &["checkpoint", "create"]);
    ctl_ok(
        &e.sock,
        &[
            "checkpoint",
            "create",
            "--name",
            "before upgrade",
            "--type",
            "standard",
        ],
    );
    ctl_ok(&e.sock, &["checkpoint", "list"]);
    ctl_ok(&e.sock, &["checkpoint", "show", "ck-2"]);
    ctl_ok(&e.sock, &["checkpoint", "apply", "ck-1"]);
    ctl_ok(&e.sock, &["checkpoint", "apply", "ck-1", "--save-current"]);
    let apply = |save_current| ApiRequest::ApplyCheckpoint {
        id: "ck-1".into(),
        request: ApplyCheckpoint { save_current },
    };
    assert_eq!(
        e.recorder.calls(),
        [
            ApiRequest::CreateCheckpoint(CreateCheckpoint::default()),
            ApiRequest::CreateCheckpoint(CreateCheckpoint {
                name: Some("before upgrade".into()),
                kind: Some(CheckpointType::Standard),
            }),
            ApiRequest::ListCheckpoints,
            ApiRequest::GetCheckpoint("ck-2".into()),
            apply(false),
            apply(true),
        ]
    );
}

#[test]
fn checkpoint_list_is_a_table_with_the_current_one_marked() {
    let e = env();
    let out = ctl_ok(&e.sock, &["checkpoint", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let columns: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        columns,
        [
            "ID",
            "NAME",
            "TYPE",
            "CONSISTENCY",
            "CREATED",
            "STATE",
            "MEMORY",
            "DISKS"
        ]
    );
    assert!(lines[1].starts_with("  ck-1  first "), "{out}");
    assert!(lines[1].contains(" production "), "{out}");
    assert!(lines[1].contains(" crash-consistent "), "{out}");
    assert!(lines[1].ends_with("0 B       0 B       3.0 GiB"), "{out}");
    assert!(lines[2].starts_with("* ck-2  recorded "), "{out}");
    assert!(lines[2].contains(" 2024-05-01T10:00:00Z "), "{out}");
    assert!(lines[2].ends_with("20.0 KiB  64.0 MiB  1.5 KiB"), "{out}");
}

#[test]
fn checkpoint_show_and_create_print_key_value_lines() {
    let e = env();
    let shown = ctl_ok(&e.sock, &["checkpoint", "show", "ck-2"]);
    for line in [
        "id:                 ck-2",
        "name:               recorded",
        "type:               standard",
        "consistency:        standard",
        "parent:             ck-1",
        "created:            2024-05-01T10:00:00Z",
        "current:            yes",
        "path:               /tmp/ck/ck-2",
        "state size:         20.0 KiB (20480 bytes)",
        "memory size:        64.0 MiB (67108864 bytes)",
        "disk layers size:   1.5 KiB (1536 bytes)",
        "fallback reason:    the guest agent did not answer",
        "disk 0:             /tmp/ck/ck-2/disk0.strata",
    ] {
        assert!(shown.lines().any(|l| l == line), "no {line:?} in:\n{shown}");
    }
    assert_eq!(ctl_ok(&e.sock, &["checkpoint", "create"]), shown);
}

#[test]
fn checkpoint_apply_prints_the_state() {
    let e = env();
    let out = ctl_ok(&e.sock, &["checkpoint", "apply", "ck-1"]);
    assert_eq!(out, "state:              running\ncurrent checkpoint: -\n");
}

#[test]
fn checkpoint_json_is_the_api_body() {
    let e = env();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut full = args.to_vec();
        full.push("--json");
        serde_json::from_str(&ctl_ok(&e.sock, &full)).unwrap()
    };
    let info = serde_json::to_value(recorder::checkpoint_info()).unwrap();
    assert_eq!(json(&["checkpoint", "create", "--name", "x"]), info);
    assert_eq!(json(&["checkpoint", "show", "ck-2"]), info);
    assert_eq!(
        json(&["checkpoint", "list"]),
        serde_json::to_value(recorder::checkpoint_list()).unwrap()
    );
    assert_eq!(
        json(&["checkpoint", "apply", "ck-2"]),
        serde_json::to_value(recorder::vm_info()).unwrap()
    );
}

#[test]
fn checkpoint_errors_exit_1_with_the_apis_message() {
    let e = env();
    let r = ctl(&e.sock, &["checkpoint", "show", "a.b"]);
    assert_eq!((r.status, r.out.as_str()), (1, ""));
    assert!(
        r.err.starts_with("strata: error: no checkpoint \"a.b\""),
        "{}",
        r.err
    );
    assert!(r.err.trim_end().ends_with("(not_found)"), "{}", r.err);
    let r = ctl(&e.sock, &["checkpoint", "create", "--name", ""]);
    assert_eq!(r.status, 1);
    assert!(
        r.err.contains("name must be 1 to 128 characters"),
        "{}",
        r.err
    );
    assert_eq!(e.recorder.calls(), []);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let handler: ApiHandler = Arc::new(|call: ApiCall| {
        call.reply.send(Err(ApiError::invalid_state(
            "cannot take a checkpoint: the VM is off",
        )));
    });
    let _server = ApiServer::start(&sock, handler).unwrap();
    for args in [
        &["checkpoint", "create"][..],
        &["checkpoint", "apply", "ck-1", "--json"],
    ] {
        let r = ctl(&sock, args);
        assert_eq!((r.status, r.out.as_str()), (1, ""), "{args:?}");
        assert_eq!(
            r.err,
            "strata: error: cannot take a checkpoint: the VM is off (invalid_state)\n"
        );
    }
}

#[test]
fn checkpoint_create_does_not_take_disabled() {
    let r = Cli::try_parse_from([
        "strata",
        "ctl",
        "checkpoint",
        "create",
        "--type",
        "disabled",
    ]);
    let err = r.unwrap_err().to_string();
    assert!(err.contains("production-only"), "{err}");
}
