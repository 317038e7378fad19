//! The server as a whole: the socket file, load from concurrent clients, clients that hang, and
//! a VMM that does not answer. The VMM is a handler that records calls and answers fixed
//! replies (`common::recorder`), or one written for the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api::{ApiCall, ApiHandler, ApiRequest, ApiServer, LifecycleAction, ServerOptions};
use common::recorder::{self, Recorder};
use common::{get, HANG_GUARD};

#[test]
fn socket_is_created_owner_only_and_removed_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut recorder = Recorder::start(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    recorder.server.take().unwrap().shutdown();
    assert!(!sock.exists());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves a socket file nobody accepts on
    let recorder = Recorder::start(&sock);
    assert_eq!(get(&sock, "/v1/vm").status, 200);
    assert_eq!(recorder.calls(), [ApiRequest::GetVm]);
}

#[test]
fn live_socket_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let first = Recorder::start(&sock);
    let handler: ApiHandler = Arc::new(|_call: ApiCall| {});
    let err = ApiServer::start(&sock, handler).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "another process is listening on socket {} (another VMM using the same path?)",
            sock.display()
        )
    );
    // The first server still answers.
    assert_eq!(get(&sock, "/v1/vm").status, 200);
    assert_eq!(first.calls(), [ApiRequest::GetVm]);
}

#[test]
fn thousand_requests_from_sixteen_clients_all_reach_the_vmm_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let recorder = Recorder::start(&sock);
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let sock = sock.clone();
            let next = next.clone();
            std::thread::spawn(move || {
                let client = api::Client::new(&sock).unwrap();
                let mut done = 0;
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= 1000 {
                        return done;
                    }
                    // Each client decodes the answer as the kind it asked for.
                    match n % 4 {
                        0 => assert_eq!(client.vm().unwrap(), recorder::vm_info()),
                        1 => {
                            client.checkpoint_config().unwrap();
                        }
                        2 => assert_eq!(client.guest().unwrap(), recorder::guest_info()),
                        _ => {
                            let r = client
                                .exec(&api::types::ExecRequest {
                                    argv: vec!["echo".into(), n.to_string()],
                                    timeout_s: None,
                                })
                                .unwrap();
                            assert_eq!(r, recorder::exec_response());
                        }
                    }
                    done += 1;
                }
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 1000);
    // Every request reached the VMM exactly once, as sent.
    let calls = recorder.calls();
    assert_eq!(calls.len(), 1000);
    let mut execs: Vec<usize> = calls
        .iter()
        .filter_map(|c| match c {
            ApiRequest::GuestExec(e) => Some(e.argv[1].parse().unwrap()),
            _ => None,
        })
        .collect();
    execs.sort_unstable();
    assert_eq!(execs, (0..1000).filter(|n| n % 4 == 3).collect::<Vec<_>>());
}

/// Whether the server still holds `s` open: nothing to read yet, and no EOF.
fn still_open(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open = matches!(
        (&*s).read(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    s.set_nonblocking(false).unwrap();
    open
}

/// One client stops in the middle of its headers, another in the middle of its body, a third
/// sends nothing.
fn hanging_clients(sock: &std::path::Path) -> [UnixStream; 3] {
    let mut half_head = UnixStream::connect(sock).unwrap();
    half_head
        .write_all(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut half_body = UnixStream::connect(sock).unwrap();
    half_body
        .write_all(
            b"PUT /v1/vm/checkpoint-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ty",
        )
        .unwrap();
    let idle = UnixStream::connect(sock).unwrap();
    [half_head, half_body, idle]
}

#[test]
fn clients_hanging_mid_request_do_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // Far longer than the test takes, so the hanging clients stay connected throughout.
    let options = ServerOptions {
        read_timeout: Duration::from_secs(600),
        ..ServerOptions::default()
    };
    let recorder = Recorder::start_with(&sock, options);
    let hanging = hanging_clients(&sock);

    // Each of these blocks until answered (or fails the test as hung).
    for _ in 0..20 {
        assert_eq!(get(&sock, "/v1/vm").status, 200);
    }
    // They were answered while the three were still hanging, not after the server dropped them.
    for (i, s) in hanging.iter().enumerate() {
        assert!(still_open(s), "hanging client {i} was dropped");
    }
    assert_eq!(recorder.calls(), vec![ApiRequest::GetVm; 20]);
}

#[test]
fn clients_hanging_mid_request_are_dropped_after_the_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let options = ServerOptions {
        read_timeout: Duration::from_secs(1),
        ..ServerOptions::default()
    };
    let recorder = Recorder::start_with(&sock, options);
    for (i, mut s) in hanging_clients(&sock).into_iter().enumerate() {
        s.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut out = Vec::new();
        // EOF (or a reset) is the server closing; a read timeout is the connection kept open.
        if let Err(e) = s.read_to_end(&mut out) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "hanging client {i} was kept open for {HANG_GUARD:?}"
            );
        }
    }
    // The half-sent PUT never reached the VMM.
    assert_eq!(recorder.calls(), []);
}

#[test]
fn client_that_never_reads_its_answer_does_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let recorder = Recorder::start(&sock);
    // Pipelines 5,000 requests and reads nothing: their answers (megabytes) cannot all fit in
    // the socket buffers, so the server's writes back up. The writer blocks too once the
    // server stops reading; it ends when the server closes the connection.
    const SENT: usize = 5000;
    let greedy = UnixStream::connect(&sock).unwrap();
    let mut writer = greedy.try_clone().unwrap();
    std::thread::spawn(move || {
        let req = b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..SENT {
            if writer.write_all(req).is_err() {
                return;
            }
        }
    });
    // The server is working on the greedy client's requests.
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while recorder.count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never took the greedy client's requests"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Each of these blocks until answered (or fails the test as hung).
    for _ in 0..10 {
        assert_eq!(get(&sock, "/v1/vm").status, 200);
    }
    // Those were answered while the greedy client's answers were backed up: the server is
    // stuck on it (its answers do not fit in the socket buffers), and not on the others.
    let greedy_answered = recorder.count() - 10;
    assert!(
        greedy_answered < SENT,
        "all {SENT} pipelined requests were answered: nothing backed up"
    );
    drop(greedy);
}

fn server_with(handler: ApiHandler, options: ServerOptions) -> (tempfile::TempDir, ApiServer) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let server = ApiServer::start_with(&sock, handler, options).unwrap();
    (dir, server)
}

#[test]
fn vmm_that_never_answers_is_a_500_after_the_timeout() {
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    let handler: ApiHandler = Arc::new(move |call| h.lock().unwrap().push(call));
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let (_dir, server) = server_with(handler, options);
    let r = get(server.path(), "/v1/vm");
    assert_eq!(r.status, 500);
    assert_eq!(r.code(), "internal");
    assert!(r.body.contains("did not answer"), "{}", r.body);
}

#[test]
fn vmm_that_drops_the_call_is_a_500() {
    let handler: ApiHandler = Arc::new(drop);
    let (_dir, server) = server_with(handler, ServerOptions::default());
    let r = common::post(server.path(), "/v1/vm/pause", "");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("dropped"), "{}", r.body);
}

#[test]
fn vmm_answer_of_the_wrong_kind_or_undocumented_code_is_a_500() {
    let handler: ApiHandler = Arc::new(|call: ApiCall| {
        let response = match call.request {
            api::ApiRequest::GetVm => Ok(api::ApiReply::CheckpointConfig(Default::default())),
            _ => Err(api::ApiError::not_found("no such thing")),
        };
        call.reply.send(response);
    });
    let (_dir, server) = server_with(handler, ServerOptions::default());
    assert_eq!(get(server.path(), "/v1/vm").status, 500);
    let r = get(server.path(), "/v1/vm/checkpoint-config");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("no such thing"));
}

#[test]
fn handler_is_called_on_the_api_thread_and_may_answer_later() {
    let handler: ApiHandler = Arc::new(|call: ApiCall| {
        assert_eq!(std::thread::current().name(), Some("strata-api"));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            call.reply.send(Ok(recorder::fixed_reply(&call.request)));
        });
    });
    let (_dir, server) = server_with(handler, ServerOptions::default());
    let c = api::Client::new(server.path()).unwrap();
    assert_eq!(
        c.lifecycle(LifecycleAction::Pause).unwrap(),
        recorder::vm_info()
    );
}

/// A VMM that answers every call with its fixed reply after `delay`, from another thread.
fn slow_handler(delay: Duration) -> ApiHandler {
    Arc::new(move |call: ApiCall| {
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            call.reply.send(Ok(recorder::fixed_reply(&call.request)));
        });
    })
}

#[test]
fn checkpoint_create_and_apply_wait_longer_than_the_reply_timeout() {
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    let (_dir, server) = server_with(slow_handler(Duration::from_millis(600)), options);
    let r = common::post(server.path(), "/v1/checkpoints", "{}");
    assert_eq!(r.status, 201, "{}", r.body);
    let r = common::post(server.path(), "/v1/checkpoints/ck-1/apply", "");
    assert_eq!(r.status, 200, "{}", r.body);
    // An ordinary call with the same VMM is cut off.
    let r = get(server.path(), "/v1/checkpoints");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("did not answer"), "{}", r.body);
}

#[test]
fn checkpoint_calls_are_still_bounded_by_the_checkpoint_reply_timeout() {
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(100),
        checkpoint_reply_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let (_dir, server) = server_with(slow_handler(Duration::from_secs(5)), options);
    let start = std::time::Instant::now();
    let r = common::post(server.path(), "/v1/checkpoints", "{}");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("did not answer"), "{}", r.body);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn client_waits_longer_for_checkpoint_create_and_apply() {
    let (_dir, server) = server_with(
        slow_handler(Duration::from_millis(600)),
        ServerOptions::default(),
    );
    let c = api::Client::new(server.path())
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let info = c
        .create_checkpoint(&api::types::CreateCheckpoint::default())
        .unwrap();
    assert_eq!(info, recorder::checkpoint_info());
    let vm = c
        .apply_checkpoint("ck-1", &api::types::ApplyCheckpoint::default())
        .unwrap();
    assert_eq!(vm, recorder::vm_info());
    // An ordinary call with the same client gives up.
    let err = c.checkpoints().unwrap_err();
    assert!(matches!(err, api::ClientError::Timeout { .. }), "{err:?}");
}

#[test]
fn vmm_errors_pass_through_where_documented() {
    use api::{ApiError, ApiReply};
    let handler: ApiHandler = Arc::new(|call: ApiCall| {
        let response: Result<ApiReply, ApiError> = match &call.request {
            ApiRequest::CreateCheckpoint(c) if c.name.as_deref() == Some("busy") => {
                Err(ApiError::invalid_state("checkpoints are disabled"))
            }
            ApiRequest::CreateCheckpoint(_) => Err(ApiError::agent_unreachable(
                "production-only: the guest agent cannot be reached",
            )),
            ApiRequest::GetCheckpoint(id) => {
                Err(ApiError::not_found(format!("no checkpoint {id}")))
            }
            ApiRequest::ApplyCheckpoint { .. } => {
                Err(ApiError::invalid_state("cannot apply: the VM is paused"))
            }
            // Not documented for the list: a bug.
            _ => Err(ApiError::agent_unreachable("no agent")),
        };
        call.reply.send(response);
    });
    let (_dir, server) = server_with(handler, ServerOptions::default());
    let sock = server.path();
    for (method, path, body, status, code) in [
        (
            "POST",
            "/v1/checkpoints",
            r#"{"name":"busy"}"#,
            409,
            "invalid_state",
        ),
        ("POST", "/v1/checkpoints", "{}", 503, "agent_unreachable"),
        ("GET", "/v1/checkpoints/ck-9", "", 404, "not_found"),
        (
            "POST",
            "/v1/checkpoints/ck-9/apply",
            "",
            409,
            "invalid_state",
        ),
        ("GET", "/v1/checkpoints", "", 500, "internal"),
    ] {
        let r = common::http(sock, method, path, Some(body.as_bytes()));
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(r.code(), code, "{method} {path}");
    }
}

#[test]
fn revert_delete_and_export_wait_longer_than_the_reply_timeout() {
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    let (_dir, server) = server_with(slow_handler(Duration::from_millis(600)), options);
    let sock = server.path();
    let r = common::post(sock, "/v1/checkpoints/revert", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::http(sock, "DELETE", "/v1/checkpoints/ck-1", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::post(
        sock,
        "/v1/checkpoints/ck-1/export",
        r#"{"destination":"/e"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // The changed-block map is an ordinary call.
    let r = get(sock, "/v1/checkpoints/ck-2/changes?since=ck-1");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("did not answer"), "{}", r.body);
}

#[test]
fn long_checkpoint_calls_are_bounded_by_the_checkpoint_reply_timeout() {
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(100),
        checkpoint_reply_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let (_dir, server) = server_with(slow_handler(Duration::from_secs(5)), options);
    let sock = server.path();
    let start = std::time::Instant::now();
    for (method, path, body) in [
        ("POST", "/v1/checkpoints/revert", "{}"),
        ("DELETE", "/v1/checkpoints/ck-1", ""),
        (
            "POST",
            "/v1/checkpoints/ck-1/export",
            r#"{"destination":"/e"}"#,
        ),
    ] {
        let r = common::http(sock, method, path, Some(body.as_bytes()));
        assert_eq!(r.status, 500, "{method} {path}");
        assert!(r.body.contains("did not answer"), "{}", r.body);
    }
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn client_waits_longer_for_revert_delete_and_export() {
    let (_dir, server) = server_with(
        slow_handler(Duration::from_millis(600)),
        ServerOptions::default(),
    );
    let c = api::Client::new(server.path())
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    assert_eq!(c.revert().unwrap(), recorder::vm_info());
    assert_eq!(
        c.delete_checkpoint("ck-1").unwrap(),
        recorder::checkpoint_list()
    );
    let export = api::types::ExportCheckpoint {
        destination: "/e".into(),
        disk_format: api::types::DiskFormat::Raw,
    };
    assert_eq!(
        c.export_checkpoint("ck-1", &export).unwrap(),
        recorder::export_info()
    );
    // The changed-block map is an ordinary call: the same client gives up.
    let err = c.checkpoint_changes("ck-2", None).unwrap_err();
    assert!(matches!(err, api::ClientError::Timeout { .. }), "{err:?}");
}

#[test]
fn vmm_errors_of_the_new_checkpoint_calls_pass_through_where_documented() {
    use api::{ApiError, ApiReply};
    let handler: ApiHandler = Arc::new(|call: ApiCall| {
        let response: Result<ApiReply, ApiError> = match &call.request {
            ApiRequest::RevertCheckpoint => Err(ApiError::not_found("no checkpoint to revert to")),
            ApiRequest::DeleteCheckpoint(id) if id == "busy" => {
                Err(ApiError::invalid_state("an export of busy is running"))
            }
            ApiRequest::DeleteCheckpoint(id) => {
                Err(ApiError::not_found(format!("no checkpoint {id}")))
            }
            ApiRequest::ExportCheckpoint { .. } => Err(ApiError::bad_request(
                "cannot write /e: the folder is not empty",
            )),
            ApiRequest::CheckpointChanges { since: Some(_), .. } => {
                Err(ApiError::bad_request("ck-1 is not an ancestor of ck-2"))
            }
            // Not documented for these: bugs.
            ApiRequest::CheckpointChanges { .. } => Err(ApiError::agent_unreachable("no agent")),
            _ => Err(ApiError::bad_request("not documented for a revert")),
        };
        call.reply.send(response);
    });
    let (_dir, server) = server_with(handler, ServerOptions::default());
    let sock = server.path();
    for (method, path, body, status, code) in [
        ("POST", "/v1/checkpoints/revert", "", 404, "not_found"),
        ("DELETE", "/v1/checkpoints/busy", "", 409, "invalid_state"),
        ("DELETE", "/v1/checkpoints/ck-9", "", 404, "not_found"),
        (
            "POST",
            "/v1/checkpoints/ck-1/export",
            r#"{"destination":"/e"}"#,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/checkpoints/ck-2/changes?since=ck-1",
            "",
            400,
            "bad_request",
        ),
        ("GET", "/v1/checkpoints/ck-2/changes", "", 500, "internal"),
    ] {
        let r = common::http(sock, method, path, Some(body.as_bytes()));
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(r.code(), code, "{method} {path}");
    }
}

#[test]
fn list_is_answered_while_a_long_call_waits() {
    // The VMM holds the delete; the server still serves the list on another connection.
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    let handler: ApiHandler = Arc::new(move |call: ApiCall| match call.request {
        ApiRequest::DeleteCheckpoint(_) => h.lock().unwrap().push(call),
        _ => call.reply.send(Ok(recorder::fixed_reply(&call.request))),
    });
    let (_dir, server) = server_with(handler, ServerOptions::default());
    let sock = server.path().to_path_buf();
    let deleting = {
        let sock = sock.clone();
        std::thread::spawn(move || common::http(&sock, "DELETE", "/v1/checkpoints/ck-1", None))
    };
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while held.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the delete never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(&sock, "/v1/checkpoints").status, 200);
    let call = held.lock().unwrap().pop().unwrap();
    call.reply.send(Ok(recorder::fixed_reply(&call.request)));
    assert_eq!(deleting.join().unwrap().status, 200);
}
