//! The HTTP layer of every route: which bodies it accepts and what request they become, 400 for
//! bad bodies, 404, 405, 413, keep-alive, the typed client — and that a rejected request never
//! reaches the VMM. The handler here only records calls and answers fixed replies; what the VMM
//! answers in each state is tested against the real `strata` in `tests/tests/api.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

mod common;

use std::path::PathBuf;

use api::types::{
    ApplyCheckpoint, CheckpointConfig, CheckpointType, CreateCheckpoint, DiskFormat, ExecRequest,
    ExportCheckpoint,
};
use api::{ApiRequest, LifecycleAction};
use common::recorder::{self, Recorder};
use common::{get, http, post, put};
use serde_json::json;

struct Env {
    _dir: tempfile::TempDir,
    sock: PathBuf,
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
fn lifecycle_accepts_no_body_or_an_empty_object() {
    let e = env();
    assert_eq!(post(&e.sock, "/v1/vm/pause", "{}").status, 200);
    assert_eq!(post(&e.sock, "/v1/vm/resume", " \n").status, 200);
    assert_eq!(http(&e.sock, "POST", "/v1/vm/stop", None).status, 200);
    assert_eq!(post(&e.sock, "/v1/vm/start", " { } ").status, 200);
    use LifecycleAction::*;
    assert_eq!(
        e.recorder.calls(),
        [Pause, Resume, Stop, Start].map(ApiRequest::Lifecycle)
    );
}

#[test]
fn lifecycle_with_any_other_body_is_400_and_never_reaches_the_vmm() {
    let e = env();
    for body in [
        r#"{"force": true}"#,
        "[]",
        "null",
        "true",
        "\"x\"",
        "{",
        "pause",
        "{}{}",
    ] {
        let r = post(&e.sock, "/v1/vm/pause", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(e.recorder.calls(), [], "a rejected request reached the VMM");
}

#[test]
fn exec_rejects_bad_bodies_without_reaching_the_vmm() {
    let e = env();
    for body in [
        "",
        "{",
        "{}",
        r#"{"argv":[]}"#,
        r#"{"argv":"ls"}"#,
        r#"{"argv":[1,2]}"#,
        r#"{"argv":["ls"],"timeout_s":0}"#,
        r#"{"argv":["ls"],"timeout_s":3601}"#,
        r#"{"argv":["ls"],"timeout_s":-1}"#,
        r#"{"argv":["ls"],"timeout_s":1.5}"#,
        r#"{"argv":["ls"],"timeout_s":"5"}"#,
        r#"{"argv":["ls"],"cwd":"/"}"#,
        r#"[["ls"]]"#,
    ] {
        let r = post(&e.sock, "/v1/guest/exec", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(e.recorder.calls(), [], "a rejected request reached the VMM");
}

#[test]
fn unknown_routes_are_404_json_and_never_reach_the_vmm() {
    let e = env();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/vm/"),
        ("POST", "/v1/vm/reboot"),
        ("GET", "/v2/vm"),
        ("GET", "/v1/checkpoints/ck-1/changes/0"),
        ("POST", "/v1/checkpoints/ck-1/apply/now"),
        ("POST", "/v1/checkpoints/ck-1/revert"),
        ("POST", "/v1/checkpoints/revert/now"),
        ("GET", "/v1/checkpoints/ck-1/export/x"),
        ("GET", "/v1/checkpoint"),
        ("DELETE", "/v1/nothing"),
        ("POST", "/v1/vm/pause/now"),
    ] {
        let r = http(&e.sock, method, path, None);
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.code(), "not_found");
    }
    assert_eq!(e.recorder.calls(), []);
}

#[test]
fn wrong_method_is_405_with_allow_and_never_reaches_the_vmm() {
    let e = env();
    for (method, path, allow) in [
        ("DELETE", "/v1/vm", "GET"),
        ("POST", "/v1/vm", "GET"),
        ("GET", "/v1/vm/pause", "POST"),
        ("PUT", "/v1/vm/stop", "POST"),
        ("POST", "/v1/vm/checkpoint-config", "GET, PUT"),
        ("PATCH", "/v1/guest", "GET"),
        ("GET", "/v1/guest/exec", "POST"),
        ("HEAD", "/v1/vm/start", "POST"),
        ("DELETE", "/v1/checkpoints", "GET, POST"),
        ("PUT", "/v1/checkpoints", "GET, POST"),
        ("POST", "/v1/checkpoints/ck-1", "GET, DELETE"),
        ("PUT", "/v1/checkpoints/ck-1", "GET, DELETE"),
        ("GET", "/v1/checkpoints/ck-1/apply", "POST"),
        ("GET", "/v1/checkpoints/revert", "POST"),
        ("DELETE", "/v1/checkpoints/revert", "POST"),
        ("GET", "/v1/checkpoints/ck-1/export", "POST"),
        ("DELETE", "/v1/checkpoints/ck-1/export", "POST"),
        ("POST", "/v1/checkpoints/ck-1/changes", "GET"),
        ("DELETE", "/v1/checkpoints/ck-1/changes", "GET"),
    ] {
        let r = http(&e.sock, method, path, None);
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        if method != "HEAD" {
            assert_eq!(r.code(), "method_not_allowed");
        }
    }
    assert_eq!(e.recorder.calls(), []);
}

#[test]
fn bodies_over_one_mib_are_413_and_never_reach_the_vmm() {
    let e = env();
    let big = format!(
        r#"{{"type":"standard","location":"/{}"}}"#,
        "a".repeat(api::server::MAX_BODY_BYTES)
    );
    let r = put(&e.sock, "/v1/vm/checkpoint-config", &big);
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "payload_too_large");
    let argv: Vec<String> = (0..200_000).map(|i| i.to_string()).collect();
    let big = json!({ "argv": argv }).to_string();
    assert!(big.len() > api::server::MAX_BODY_BYTES);
    assert_eq!(post(&e.sock, "/v1/guest/exec", &big).status, 413);
    let big = json!({ "name": "n".repeat(api::server::MAX_BODY_BYTES) }).to_string();
    assert_eq!(post(&e.sock, "/v1/checkpoints", &big).status, 413);
    let big = format!(
        r#"{{"save_current":true{}}}"#,
        " ".repeat(api::server::MAX_BODY_BYTES)
    );
    assert_eq!(
        post(&e.sock, "/v1/checkpoints/ck-1/apply", &big).status,
        413
    );
    let big = format!("{{{}}}", " ".repeat(api::server::MAX_BODY_BYTES));
    assert_eq!(post(&e.sock, "/v1/checkpoints/revert", &big).status, 413);
    let big = json!({ "destination": format!("/{}", "d".repeat(api::server::MAX_BODY_BYTES)) })
        .to_string();
    assert_eq!(
        post(&e.sock, "/v1/checkpoints/ck-1/export", &big).status,
        413
    );
    assert_eq!(e.recorder.calls(), []);
}

#[test]
fn chunked_body_over_one_mib_is_413() {
    use std::io::{Read, Write};
    let e = env();
    let mut s = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(common::HANG_GUARD)).unwrap();
    let head = "PUT /v1/vm/checkpoint-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = s.write_all(head.as_bytes());
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..20 {
                let frame = format!("{:x}\r\n", chunk.len());
                if s.write_all(frame.as_bytes()).is_err()
                    || s.write_all(&chunk).is_err()
                    || s.write_all(b"\r\n").is_err()
                {
                    return;
                }
            }
            let _ = s.write_all(b"0\r\n\r\n");
        })
    };
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    writer.join().unwrap();
    let r = common::parse(&out);
    assert_eq!(r.status, 413);
    assert_eq!(e.recorder.calls(), []);
}

#[test]
fn keep_alive_connection_serves_many_requests() {
    use std::io::{BufRead, BufReader, Read, Write};
    let e = env();
    let mut s = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(common::HANG_GUARD)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for _ in 0..3 {
        s.write_all(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let v: api::types::VmInfo = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, recorder::vm_info());
    }
    assert_eq!(e.recorder.calls(), vec![ApiRequest::GetVm; 3]);
}

#[test]
fn typed_client_sends_every_route_and_decodes_every_answer() {
    let e = env();
    let c = api::Client::new(&e.sock).unwrap();
    assert_eq!(c.vm().unwrap(), recorder::vm_info());
    for action in LifecycleAction::ALL {
        assert_eq!(c.lifecycle(action).unwrap(), recorder::vm_info());
    }
    assert_eq!(c.checkpoint_config().unwrap(), CheckpointConfig::default());
    let cfg = CheckpointConfig {
        kind: CheckpointType::ProductionOnly,
        location: Some("/ck".into()),
    };
    assert_eq!(
        c.set_checkpoint_config(&cfg).unwrap(),
        CheckpointConfig::default()
    );
    assert_eq!(c.guest().unwrap(), recorder::guest_info());
    let exec = ExecRequest {
        argv: vec!["echo".into(), "x y".into()],
        timeout_s: Some(2),
    };
    assert_eq!(c.exec(&exec).unwrap(), recorder::exec_response());
    let create = CreateCheckpoint {
        name: Some("before upgrade".into()),
        kind: Some(CheckpointType::Standard),
    };
    assert_eq!(
        c.create_checkpoint(&create).unwrap(),
        recorder::checkpoint_info()
    );
    assert_eq!(c.checkpoints().unwrap(), recorder::checkpoint_list());
    assert_eq!(c.checkpoint("ck-2").unwrap(), recorder::checkpoint_info());
    let apply = ApplyCheckpoint { save_current: true };
    assert_eq!(
        c.apply_checkpoint("ck-1", &apply).unwrap(),
        recorder::vm_info()
    );
    assert_eq!(c.revert().unwrap(), recorder::vm_info());
    let export = ExportCheckpoint {
        destination: "/backup/x y".into(),
        disk_format: DiskFormat::Strata,
    };
    assert_eq!(
        c.export_checkpoint("ck-2", &export).unwrap(),
        recorder::export_info()
    );
    assert_eq!(
        c.checkpoint_changes("ck-2", Some("ck-1")).unwrap(),
        recorder::changes_info()
    );
    assert_eq!(
        c.checkpoint_changes("ck-2", None).unwrap(),
        recorder::changes_info()
    );
    assert_eq!(
        c.delete_checkpoint("ck-1").unwrap(),
        recorder::checkpoint_list()
    );

    let mut sent = vec![ApiRequest::GetVm];
    sent.extend(LifecycleAction::ALL.map(ApiRequest::Lifecycle));
    sent.extend([
        ApiRequest::GetCheckpointConfig,
        ApiRequest::PutCheckpointConfig(cfg),
        ApiRequest::GetGuest,
        ApiRequest::GuestExec(exec),
        ApiRequest::CreateCheckpoint(create),
        ApiRequest::ListCheckpoints,
        ApiRequest::GetCheckpoint("ck-2".into()),
        ApiRequest::ApplyCheckpoint {
            id: "ck-1".into(),
            request: apply,
        },
        ApiRequest::RevertCheckpoint,
        ApiRequest::ExportCheckpoint {
            id: "ck-2".into(),
            request: export,
        },
        ApiRequest::CheckpointChanges {
            id: "ck-2".into(),
            since: Some("ck-1".into()),
        },
        ApiRequest::CheckpointChanges {
            id: "ck-2".into(),
            since: None,
        },
        ApiRequest::DeleteCheckpoint("ck-1".into()),
    ]);
    assert_eq!(e.recorder.calls(), sent);
}

#[test]
fn checkpoint_routes_map_to_their_requests() {
    let e = env();
    let r = post(&e.sock, "/v1/checkpoints", "{}");
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let taken: api::types::CheckpointInfo = serde_json::from_str(&r.body).unwrap();
    assert_eq!(taken, recorder::checkpoint_info());
    let r = post(
        &e.sock,
        "/v1/checkpoints",
        r#"{"name":"before upgrade","type":"production-only"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        post(&e.sock, "/v1/checkpoints", r#"{"name":null,"type":null}"#).status,
        201
    );
    assert_eq!(get(&e.sock, "/v1/checkpoints").status, 200);
    let long_id = "a".repeat(api::types::MAX_CHECKPOINT_ID_LEN);
    for id in ["ck-1", "_", "A-b_9", &long_id] {
        let r = get(&e.sock, &format!("/v1/checkpoints/{id}"));
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    let r = post(
        &e.sock,
        "/v1/checkpoints/ck-1/apply",
        r#"{"save_current":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let vm: api::types::VmInfo = serde_json::from_str(&r.body).unwrap();
    assert_eq!(vm, recorder::vm_info());

    let apply = |id: &str, save_current| ApiRequest::ApplyCheckpoint {
        id: id.into(),
        request: ApplyCheckpoint { save_current },
    };
    let mut expected = vec![
        ApiRequest::CreateCheckpoint(CreateCheckpoint::default()),
        ApiRequest::CreateCheckpoint(CreateCheckpoint {
            name: Some("before upgrade".into()),
            kind: Some(CheckpointType::ProductionOnly),
        }),
        ApiRequest::CreateCheckpoint(CreateCheckpoint::default()),
        ApiRequest::ListCheckpoints,
    ];
    expected
        .extend(["ck-1", "_", "A-b_9", &long_id].map(|id| ApiRequest::GetCheckpoint(id.into())));
    expected.push(apply("ck-1", true));
    assert_eq!(e.recorder.calls(), expected);
}

#[test]
fn apply_accepts_no_body_or_an_empty_object() {
    let e = env();
    assert_eq!(
        http(&e.sock, "POST", "/v1/checkpoints/a/apply", None).status,
        200
    );
    assert_eq!(post(&e.sock, "/v1/checkpoints/b/apply", "").status, 200);
    assert_eq!(post(&e.sock, "/v1/checkpoints/c/apply", " \n").status, 200);
    assert_eq!(post(&e.sock, "/v1/checkpoints/d/apply", "{}").status, 200);
    assert_eq!(
        post(
            &e.sock,
            "/v1/checkpoints/e/apply",
            r#"{"save_current":false}"#
        )
        .status,
        200
    );
    let defaults = |id: &str| ApiRequest::ApplyCheckpoint {
        id: id.into(),
        request: ApplyCheckpoint::default(),
    };
    assert_eq!(e.recorder.calls(), ["a", "b", "c", "d", "e"].map(defaults));
}

#[test]
fn create_without_a_body_is_400() {
    let e = env();
    for r in [
        http(&e.sock, "POST", "/v1/checkpoints", None),
        post(&e.sock, "/v1/checkpoints", " "),
    ] {
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("request body required"), "{}", r.body);
    }
    assert_eq!(e.recorder.calls(), []);
}

#[test]
fn create_rejects_bad_bodies_naming_the_problem_without_reaching_the_vmm() {
    let e = env();
    let long = json!({ "name": "n".repeat(api::types::MAX_CHECKPOINT_NAME_CHARS + 1) }).to_string();
    for (body, says) in [
        ("{", "malformed JSON"),
        ("[]", "JSON object"),
        ("null", "JSON object"),
        (r#"{"nmae":"x"}"#, "unknown field `nmae`"),
        (r#"{"name":5}"#, "invalid type"),
        (r#"{"name":""}"#, "name must be 1 to 128 characters, not 0"),
        (&long, "name must be 1 to 128 characters, not 129"),
        (r#"{"name":"a\u0001b"}"#, "control characters"),
        (r#"{"name":"a\nb"}"#, "control characters"),
        (r#"{"type":"disabled"}"#, "disabled"),
        (r#"{"type":"snapshot"}"#, "unknown variant `snapshot`"),
        (r#"{"save_current":true}"#, "unknown field `save_current`"),
    ] {
        let r = post(&e.sock, "/v1/checkpoints", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "body {body:?}: {message}");
    }
    assert_eq!(e.recorder.calls(), [], "a rejected request reached the VMM");
}

#[test]
fn apply_rejects_bad_bodies_without_reaching_the_vmm() {
    let e = env();
    for (body, says) in [
        ("{", "malformed JSON"),
        ("[]", "JSON object"),
        ("null", "JSON object"),
        ("true", "JSON object"),
        (r#"{"force":true}"#, "unknown field `force`"),
        (r#"{"save_current":"yes"}"#, "invalid type"),
        (r#"{"save_current":null}"#, "invalid type"),
        (r#"{"save_current":1}"#, "invalid type"),
        ("{}{}", "malformed JSON"),
    ] {
        let r = post(&e.sock, "/v1/checkpoints/ck-1/apply", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "body {body:?}: {message}");
    }
    assert_eq!(e.recorder.calls(), [], "a rejected request reached the VMM");
}

#[test]
fn ids_that_cannot_be_checkpoints_are_404_without_reaching_the_vmm() {
    let e = env();
    let too_long = "a".repeat(api::types::MAX_CHECKPOINT_ID_LEN + 1);
    for id in [
        "-x", "a.b", "..", "a%20b", "%2e", "a%2Fb", "a~b", "a+b", &too_long,
    ] {
        for (method, path) in [
            ("GET", format!("/v1/checkpoints/{id}")),
            ("POST", format!("/v1/checkpoints/{id}/apply")),
            ("DELETE", format!("/v1/checkpoints/{id}")),
            ("POST", format!("/v1/checkpoints/{id}/export")),
            ("GET", format!("/v1/checkpoints/{id}/changes")),
            ("GET", format!("/v1/checkpoints/{id}/changes?since=ck-1")),
            // An id that cannot be one is a 404 whatever the method.
            ("PUT", format!("/v1/checkpoints/{id}")),
        ] {
            let r = http(&e.sock, method, &path, Some(b"{}"));
            assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
            assert_eq!(r.code(), "not_found");
            assert!(
                r.body.contains("no checkpoint"),
                "{method} {path}: {}",
                r.body
            );
        }
    }
    for path in ["/v1/checkpoints/", "/v1/checkpoints//apply"] {
        let r = http(&e.sock, "POST", path, None);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.code(), "not_found");
    }
    // Through the typed client too: the id is encoded, not a broken request.
    let c = api::Client::new(&e.sock).unwrap();
    for id in ["a b", "a/b", "", "-x", "é", ".."] {
        let err = c.checkpoint(id).unwrap_err();
        assert_eq!(err.api_code(), Some("not_found"), "{id:?}: {err}");
        let err = c
            .apply_checkpoint(id, &ApplyCheckpoint::default())
            .unwrap_err();
        assert_eq!(err.api_code(), Some("not_found"), "{id:?}: {err}");
        let err = c.delete_checkpoint(id).unwrap_err();
        assert_eq!(err.api_code(), Some("not_found"), "{id:?}: {err}");
        let err = c.checkpoint_changes(id, None).unwrap_err();
        assert_eq!(err.api_code(), Some("not_found"), "{id:?}: {err}");
    }
    // `revert` is the revert call, never an id.
    for path in [
        "/v1/checkpoints/revert/apply",
        "/v1/checkpoints/revert/changes",
    ] {
        let r = http(&e.sock, "POST", path, None);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.body.contains("reserved"), "{path}: {}", r.body);
    }
    assert_eq!(e.recorder.calls(), [], "a bad id reached the VMM");
}

#[test]
fn revert_accepts_no_body_or_an_empty_object_and_nothing_else() {
    let e = env();
    for body in [None, Some(""), Some(" \n"), Some("{}"), Some(" { } ")] {
        let r = http(
            &e.sock,
            "POST",
            "/v1/checkpoints/revert",
            body.map(str::as_bytes),
        );
        assert_eq!(r.status, 200, "body {body:?}: {}", r.body);
        let vm: api::types::VmInfo = serde_json::from_str(&r.body).unwrap();
        assert_eq!(vm, recorder::vm_info());
    }
    assert_eq!(e.recorder.calls(), vec![ApiRequest::RevertCheckpoint; 5]);
    for body in [r#"{"save_current":true}"#, "[]", "null", "{", "{}{}"] {
        let r = post(&e.sock, "/v1/checkpoints/revert", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(e.recorder.count(), 5, "a rejected revert reached the VMM");
}

#[test]
fn delete_maps_to_its_request_and_answers_the_list() {
    let e = env();
    let r = http(&e.sock, "DELETE", "/v1/checkpoints/ck-1", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let list: api::types::CheckpointList = serde_json::from_str(&r.body).unwrap();
    assert_eq!(list, recorder::checkpoint_list());
    // A body is ignored, as for a GET.
    let r = http(
        &e.sock,
        "DELETE",
        "/v1/checkpoints/ck-2",
        Some(b"{\"force\":1}"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        e.recorder.calls(),
        [
            ApiRequest::DeleteCheckpoint("ck-1".into()),
            ApiRequest::DeleteCheckpoint("ck-2".into())
        ]
    );
}

#[test]
fn export_answers_201_and_defaults_to_raw_disks() {
    let e = env();
    let r = post(
        &e.sock,
        "/v1/checkpoints/ck-2/export",
        r#"{"destination":"/backup/ck-2"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let info: api::types::ExportInfo = serde_json::from_str(&r.body).unwrap();
    assert_eq!(info, recorder::export_info());
    let r = post(
        &e.sock,
        "/v1/checkpoints/ck-2/export",
        r#"{"destination":"/b","disk_format":"strata"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let export = |destination: &str, disk_format| ApiRequest::ExportCheckpoint {
        id: "ck-2".into(),
        request: ExportCheckpoint {
            destination: destination.into(),
            disk_format,
        },
    };
    assert_eq!(
        e.recorder.calls(),
        [
            export("/backup/ck-2", DiskFormat::Raw),
            export("/b", DiskFormat::Strata)
        ]
    );
}

#[test]
fn export_rejects_bad_bodies_naming_the_problem_without_reaching_the_vmm() {
    let e = env();
    for (body, says) in [
        ("", "request body required"),
        ("{", "malformed JSON"),
        ("[]", "JSON object"),
        ("{}", "missing field `destination`"),
        (
            r#"{"destination":"backup"}"#,
            "destination must be an absolute path, not \"backup\"",
        ),
        (r#"{"destination":""}"#, "absolute path"),
        (r#"{"destination":"./b"}"#, "absolute path"),
        (r#"{"destination":"/a\u0000b"}"#, "NUL"),
        (r#"{"destination":null}"#, "invalid type"),
        (
            r#"{"destination":"/b","disk_format":"qcow2"}"#,
            "unknown variant `qcow2`",
        ),
        (
            r#"{"destination":"/b","disk_format":"RAW"}"#,
            "unknown variant `RAW`",
        ),
        (r#"{"destination":"/b","disk_format":null}"#, "invalid type"),
        (
            r#"{"destination":"/b","format":"raw"}"#,
            "unknown field `format`",
        ),
    ] {
        let r = post(&e.sock, "/v1/checkpoints/ck-1/export", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "body {body:?}: {message}");
    }
    assert_eq!(e.recorder.calls(), [], "a rejected request reached the VMM");
}

#[test]
fn changes_maps_since_from_the_query() {
    let e = env();
    for path in [
        "/v1/checkpoints/ck-2/changes",
        "/v1/checkpoints/ck-2/changes?",
        "/v1/checkpoints/ck-2/changes?since=ck-1",
        "/v1/checkpoints/ck-2/changes?since=ck%2D1&",
    ] {
        let r = get(&e.sock, path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let changes: api::types::ChangesInfo = serde_json::from_str(&r.body).unwrap();
        assert_eq!(changes, recorder::changes_info());
    }
    let changes = |since: Option<&str>| ApiRequest::CheckpointChanges {
        id: "ck-2".into(),
        since: since.map(str::to_owned),
    };
    assert_eq!(
        e.recorder.calls(),
        [
            changes(None),
            changes(None),
            changes(Some("ck-1")),
            changes(Some("ck-1"))
        ]
    );
}

#[test]
fn changes_query_errors_are_400_naming_the_problem_without_reaching_the_vmm() {
    let e = env();
    let long = "a".repeat(api::types::MAX_CHECKPOINT_ID_LEN + 1);
    for (query, says) in [
        ("limit=3", "unknown query parameter \"limit\""),
        ("since=ck-1&until=ck-2", "unknown query parameter \"until\""),
        ("since=a&since=b", "more than once"),
        ("since=", "cannot be a checkpoint id"),
        ("since", "cannot be a checkpoint id"),
        ("since=a.b", "since \"a.b\" cannot be a checkpoint id"),
        ("since=-x", "cannot be a checkpoint id"),
        ("since=a%2Fb", "since \"a/b\" cannot be a checkpoint id"),
        (&format!("since={long}"), "cannot be a checkpoint id"),
        ("since=revert", "reserved"),
        ("since=%zz", "malformed query component"),
    ] {
        let path = format!("/v1/checkpoints/ck-2/changes?{query}");
        let r = get(&e.sock, &path);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{path}: {message}");
    }
    // Through the typed client: a since that cannot be an id is encoded, and refused.
    let c = api::Client::new(&e.sock).unwrap();
    for since in ["a b", "a&since=b", "é", ""] {
        let err = c.checkpoint_changes("ck-2", Some(since)).unwrap_err();
        assert_eq!(err.api_code(), Some("bad_request"), "{since:?}: {err}");
    }
    assert_eq!(e.recorder.calls(), [], "a rejected request reached the VMM");
}

#[test]
fn other_routes_ignore_their_query() {
    let e = env();
    assert_eq!(get(&e.sock, "/v1/vm?since=x.y&z").status, 200);
    assert_eq!(get(&e.sock, "/v1/checkpoints?limit=1").status, 200);
    assert_eq!(
        http(&e.sock, "DELETE", "/v1/checkpoints/ck-1?force=1", None).status,
        200
    );
    assert_eq!(
        e.recorder.calls(),
        [
            ApiRequest::GetVm,
            ApiRequest::ListCheckpoints,
            ApiRequest::DeleteCheckpoint("ck-1".into())
        ]
    );
}

#[test]
fn a_deleted_checkpoint_is_gone_until_taken_again() {
    // The recorder's one rule, which schemathesis relies on.
    let e = env();
    assert_eq!(
        http(&e.sock, "DELETE", "/v1/checkpoints/ck-2", None).status,
        200
    );
    for (method, path) in [
        ("GET", "/v1/checkpoints/ck-2"),
        ("DELETE", "/v1/checkpoints/ck-2"),
        ("GET", "/v1/checkpoints/ck-2/changes"),
        ("GET", "/v1/checkpoints/ck-3/changes?since=ck-2"),
    ] {
        let r = http(&e.sock, method, path, None);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    assert_eq!(post(&e.sock, "/v1/checkpoints", "{}").status, 201);
    assert_eq!(get(&e.sock, "/v1/checkpoints/ck-2").status, 200);
}
