//! `strata ctl` against a socket nobody serves, and the checkpoint commands against the
//! recording handler (`common::recorder`): what they send and what they print, and the progress
//! bar of the long ones. What ctl prints
//! for each lifecycle, config and guest command is tested against the real `strata` in
//! `tests/tests/api.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::ctl::{run_with, run_with_progress, CtlArgs};
use api::types::{
    ApplyCheckpoint, CheckpointType, CreateCheckpoint, DiskFormat, ExportCheckpoint, Progress,
};
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

fn parse(sock: &Path, args: &[&str]) -> CtlArgs {
    let sock = sock.to_str().unwrap();
    let mut full = vec!["strata", "ctl", "--api-socket", sock];
    full.extend_from_slice(args);
    let Top::Ctl(args) = Cli::try_parse_from(full).unwrap().command;
    args
}

fn ctl(sock: &Path, args: &[&str]) -> Run {
    let args = parse(sock, args);
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
fn checkpoint_list_is_a_tree_with_the_current_one_marked_and_now_under_it() {
    let e = env();
    let out = ctl_ok(&e.sock, &["checkpoint", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
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
    assert!(lines[1].starts_with("  ck-1       first "), "{out}");
    assert!(lines[1].contains(" production "), "{out}");
    assert!(lines[1].contains(" crash-consistent "), "{out}");
    assert!(lines[1].ends_with("0 B       0 B       3.0 GiB"), "{out}");
    // ck-2 was taken on ck-1: it is indented under it, and the VM runs on it.
    assert!(lines[2].starts_with("* └─ ck-2    recorded "), "{out}");
    assert!(lines[2].contains(" 2024-05-01T10:00:00Z "), "{out}");
    assert!(lines[2].ends_with("20.0 KiB  64.0 MiB  1.5 KiB"), "{out}");
    assert_eq!(lines[3], "     └─ Now", "{out}");
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
    assert_eq!(
        json(&["checkpoint", "revert"]),
        serde_json::to_value(recorder::vm_info()).unwrap()
    );
    assert_eq!(
        json(&["checkpoint", "export", "ck-2", "/e"]),
        serde_json::to_value(recorder::export_info()).unwrap()
    );
    assert_eq!(
        json(&["checkpoint", "changes", "ck-2", "--since", "ck-1"]),
        serde_json::to_value(recorder::changes_info()).unwrap()
    );
    // Last: the recorder answers 404 for ck-1 after it.
    assert_eq!(
        json(&["checkpoint", "delete", "ck-1"]),
        serde_json::to_value(recorder::checkpoint_list()).unwrap()
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

#[test]
fn revert_delete_export_and_changes_send_their_requests() {
    let e = env();
    ctl_ok(&e.sock, &["checkpoint", "revert"]);
    ctl_ok(&e.sock, &["checkpoint", "export", "ck-2", "/backup/ck-2"]);
    ctl_ok(
        &e.sock,
        &[
            "checkpoint",
            "export",
            "ck-2",
            "exports/b",
            "--format",
            "strata",
        ],
    );
    ctl_ok(&e.sock, &["checkpoint", "changes", "ck-2"]);
    ctl_ok(
        &e.sock,
        &["checkpoint", "changes", "ck-2", "--since", "ck-1"],
    );
    ctl_ok(&e.sock, &["checkpoint", "delete", "ck-1"]);
    ctl_ok(&e.sock, &["checkpoint", "delete", "ck-2", "--no-wait"]);
    // A relative folder is made absolute against the working directory.
    let relative = std::env::current_dir().unwrap().join("exports/b");
    let export = |destination: &str, disk_format| ApiRequest::ExportCheckpoint {
        id: "ck-2".into(),
        request: ExportCheckpoint {
            destination: destination.into(),
            disk_format,
        },
    };
    let changes = |since: Option<&str>| ApiRequest::CheckpointChanges {
        id: "ck-2".into(),
        since: since.map(str::to_owned),
    };
    assert_eq!(
        e.recorder.calls(),
        [
            ApiRequest::RevertCheckpoint,
            export("/backup/ck-2", DiskFormat::Raw),
            export(relative.to_str().unwrap(), DiskFormat::Strata),
            changes(None),
            changes(Some("ck-1")),
            // The delete waits for its merge: the list no longer reports it.
            ApiRequest::DeleteCheckpoint("ck-1".into()),
            ApiRequest::ListCheckpoints,
            ApiRequest::DeleteCheckpoint("ck-2".into()),
        ]
    );
}

#[test]
fn revert_prints_the_state_and_delete_the_tree_left() {
    let e = env();
    let out = ctl_ok(&e.sock, &["checkpoint", "revert"]);
    assert_eq!(out, "state:              running\ncurrent checkpoint: -\n");
    let out = ctl_ok(&e.sock, &["checkpoint", "delete", "ck-1"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "deleted ck-1", "{out}");
    assert!(lines[1].starts_with("  ID "), "{out}");
    assert_eq!(lines[4], "     └─ Now", "{out}");
    assert_eq!(lines.len(), 5, "{out}");
}

#[test]
fn export_prints_every_file_written() {
    let e = env();
    let out = ctl_ok(&e.sock, &["checkpoint", "export", "ck-2", "/tmp/export"]);
    assert_eq!(
        out,
        "exported:           ck-2\n\
         destination:        /tmp/export\n\
         disk 0:             /tmp/export/disk0.raw\n\
         state:              /tmp/export/state.bin\n\
         memory:             /tmp/export/memory.bin\n\
         written:            64.0 MiB (67129344 bytes)\n"
    );
}

#[test]
fn changes_prints_extents_per_disk_and_the_total() {
    let e = env();
    let out = ctl_ok(
        &e.sock,
        &["checkpoint", "changes", "ck-2", "--since", "ck-1"],
    );
    assert_eq!(
        out,
        "checkpoint:         ck-2\n\
         since:              ck-1\n\
         disk 0: 192.0 KiB (196608 bytes) changed in 2 extents (size 64.0 MiB, granularity 64.0 KiB)\n\
         \x20 OFFSET   LENGTH\n\
         \x20 0        65536\n\
         \x20 1048576  131072\n\
         disk 1: 0 B changed in 0 extents (size 16.0 MiB, granularity 64.0 KiB)\n\
         total: 192.0 KiB (196608 bytes) changed\n"
    );
}

#[test]
fn new_checkpoint_errors_exit_1_with_the_apis_message() {
    let e = env();
    let r = ctl(
        &e.sock,
        &["checkpoint", "changes", "ck-2", "--since", "a.b"],
    );
    assert_eq!((r.status, r.out.as_str()), (1, ""));
    assert!(
        r.err
            .starts_with("strata: error: since \"a.b\" cannot be a checkpoint id"),
        "{}",
        r.err
    );
    assert!(r.err.trim_end().ends_with("(bad_request)"), "{}", r.err);
    let r = ctl(&e.sock, &["checkpoint", "delete", "a/b"]);
    assert_eq!(r.status, 1);
    assert!(r.err.ends_with("(not_found)\n"), "{}", r.err);
    assert_eq!(e.recorder.calls(), []);
}

/// A terminal for indicatif that keeps everything drawn on it.
#[derive(Debug, Clone, Default)]
struct Screen(Arc<Mutex<String>>);

impl indicatif::TermLike for Screen {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        let mut screen = self.0.lock().unwrap();
        screen.push_str(s);
        screen.push('\n');
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A VMM whose export takes `delay`, whose delete answers at once and merges for `delay`
/// after, and whose list reports `progress` while either runs.
fn slow_vmm(
    sock: &Path,
    delay: Duration,
    progress: Progress,
) -> (ApiServer, Arc<Mutex<Vec<ApiRequest>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let busy_until = Arc::new(Mutex::new(Instant::now()));
    let handler: ApiHandler = Arc::new(move |call: ApiCall| {
        seen.lock().unwrap().push(call.request.clone());
        let mut reply = recorder::fixed_reply(&call.request);
        if matches!(
            call.request,
            ApiRequest::DeleteCheckpoint(_) | ApiRequest::ExportCheckpoint { .. }
        ) {
            *busy_until.lock().unwrap() = Instant::now() + delay;
        }
        if let api::ApiReply::Checkpoints(list) = &mut reply {
            if call.request == ApiRequest::ListCheckpoints
                && Instant::now() < *busy_until.lock().unwrap()
            {
                list.progress = Some(progress.clone());
            }
        }
        let slow = matches!(call.request, ApiRequest::ExportCheckpoint { .. });
        std::thread::spawn(move || {
            if slow {
                std::thread::sleep(delay);
            }
            call.reply.send(Ok(reply));
        });
    });
    (ApiServer::start(sock, handler).unwrap(), calls)
}

#[test]
fn long_calls_draw_a_progress_bar_from_the_polled_list() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let progress = Progress {
        operation: "merge".into(),
        checkpoint: "ck-1".into(),
        done: 3 << 20,
        total: 12 << 20,
    };
    let (_server, calls) = slow_vmm(&sock, Duration::from_millis(1500), progress);
    let screen = Screen::default();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = run_with_progress(
        parse(&sock, &["checkpoint", "delete", "ck-1"]),
        &mut out,
        &mut err,
        indicatif::ProgressDrawTarget::term_like(Box::new(screen.clone())),
    );
    assert_eq!(status, 0, "{}", String::from_utf8_lossy(&err));
    // The answer is printed as without a bar, and stderr stays clean.
    assert!(String::from_utf8(out)
        .unwrap()
        .starts_with("deleted ck-1\n"));
    assert_eq!(err, b"");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls[0], ApiRequest::DeleteCheckpoint("ck-1".into()));
    // The wait's polls (about one per 200 ms for 1.5 s) and the bar's.
    assert!(
        calls[1..].iter().all(|c| *c == ApiRequest::ListCheckpoints) && calls.len() > 5,
        "{calls:?}"
    );
    let drawn = screen.0.lock().unwrap().clone();
    assert!(drawn.contains("merging ck-1"), "{drawn:?}");
    assert!(drawn.contains("3.00 MiB/12.00 MiB (25%"), "{drawn:?}");
}

#[test]
fn progress_of_another_operation_is_not_shown_and_no_terminal_means_no_polling() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let progress = Progress {
        operation: "merge".into(),
        checkpoint: "ck-9".into(),
        done: 1,
        total: 2,
    };
    let (_server, calls) = slow_vmm(&sock, Duration::from_millis(700), progress);
    let screen = Screen::default();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = run_with_progress(
        parse(&sock, &["checkpoint", "export", "ck-2", "/e"]),
        &mut out,
        &mut err,
        indicatif::ProgressDrawTarget::term_like(Box::new(screen.clone())),
    );
    assert_eq!(status, 0, "{}", String::from_utf8_lossy(&err));
    let drawn = screen.0.lock().unwrap().clone();
    assert!(drawn.contains("exporting ck-2"), "{drawn:?}");
    assert!(!drawn.contains("ck-9"), "{drawn:?}");
    assert!(!drawn.contains('%'), "{drawn:?}");

    // Through run_with (stderr not a terminal): no bar, so no second connection: the
    // delete, then the wait's polls of the list until the merge of ck-1 (here: of ck-9,
    // another checkpoint) is no longer reported: one.
    calls.lock().unwrap().clear();
    let r = ctl(&sock, &["checkpoint", "delete", "ck-1"]);
    assert_eq!(r.status, 0, "{}", r.err);
    assert_eq!(r.err, "");
    assert_eq!(
        *calls.lock().unwrap(),
        [
            ApiRequest::DeleteCheckpoint("ck-1".into()),
            ApiRequest::ListCheckpoints
        ]
    );
}
