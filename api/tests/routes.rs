//! Every route of the API against the fake VMM: right answers in every state, 409 in the wrong
//! state, 400 for bad bodies, 404, 405, 413, and that a rejected request never reaches the VMM
//! and so changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

mod common;

use std::path::PathBuf;

use api::types::{CheckpointType, VmState};
use common::fake::Fake;
use common::{get, http, post, put};
use serde_json::json;

struct Env {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    fake: Fake,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let fake = Fake::start(&sock);
    Env {
        _dir: dir,
        sock,
        fake,
    }
}

const STATES: [VmState; 3] = [VmState::Running, VmState::Paused, VmState::Off];

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Off => "off",
    }
}

/// The transition rules: the state after `action` from `from`, or None for a 409.
fn expected(action: &str, from: VmState) -> Option<VmState> {
    use VmState::*;
    match (action, from) {
        ("start", Off) => Some(Running),
        ("pause", Running) => Some(Paused),
        ("resume", Paused) => Some(Running),
        ("stop" | "shutdown", Running | Paused) => Some(Off),
        _ => None,
    }
}

#[test]
fn get_vm_reports_every_state_with_the_full_shape() {
    let e = env();
    for s in STATES {
        e.fake.set_state(s);
        let r = get(&e.sock, "/v1/vm");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(v["state"], state_name(s));
        assert_eq!(v["config"]["vcpus"], 2);
        assert_eq!(v["config"]["disks"][0]["readonly"], false);
        assert_eq!(v["config"]["vsock"]["cid"], 3);
        assert_eq!(
            v["checkpoint_config"],
            json!({"type": "production", "location": null})
        );
        assert!(v["current_checkpoint"].is_null());
        assert!(v.as_object().unwrap().contains_key("last_exit"));
    }
}

#[test]
fn every_lifecycle_action_from_every_state_follows_the_rules() {
    let e = env();
    for action in ["start", "pause", "resume", "stop", "shutdown"] {
        for from in STATES {
            e.fake.set_state(from);
            let r = post(&e.sock, &format!("/v1/vm/{action}"), "");
            match expected(action, from) {
                Some(to) => {
                    assert_eq!(r.status, 200, "{action} from {from}: {}", r.body);
                    assert_eq!(r.json()["state"], state_name(to));
                    assert_eq!(e.fake.snapshot().state, to);
                }
                None => {
                    assert_eq!(r.status, 409, "{action} from {from}: {}", r.body);
                    assert_eq!(r.code(), "invalid_state");
                    assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
                    assert_eq!(e.fake.snapshot().state, from, "409 changed the state");
                }
            }
        }
    }
}

#[test]
fn lifecycle_accepts_no_body_or_an_empty_object() {
    let e = env();
    assert_eq!(post(&e.sock, "/v1/vm/pause", "{}").status, 200);
    assert_eq!(post(&e.sock, "/v1/vm/resume", " \n").status, 200);
    assert_eq!(http(&e.sock, "POST", "/v1/vm/pause", None).status, 200);
    assert_eq!(post(&e.sock, "/v1/vm/resume", " { } ").status, 200);
}

#[test]
fn lifecycle_with_any_other_body_is_400_and_changes_nothing() {
    let e = env();
    let calls = e.fake.calls();
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
    assert_eq!(e.fake.calls(), calls, "a rejected request reached the VMM");
    assert_eq!(get(&e.sock, "/v1/vm").json()["state"], "running");
}

#[test]
fn checkpoint_config_defaults_to_production_without_location() {
    let e = env();
    let r = get(&e.sock, "/v1/vm/checkpoint-config");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"type": "production", "location": null}));
}

#[test]
fn checkpoint_config_put_stores_every_type_in_every_state() {
    let e = env();
    for s in STATES {
        e.fake.set_state(s);
        for t in ["disabled", "standard", "production", "production-only"] {
            let body = json!({"type": t, "location": "/var/lib/strata/ckpt"}).to_string();
            let r = put(&e.sock, "/v1/vm/checkpoint-config", &body);
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["type"], t);
            let g = get(&e.sock, "/v1/vm/checkpoint-config").json();
            assert_eq!(g, json!({"type": t, "location": "/var/lib/strata/ckpt"}));
        }
    }
    // Absent and null location both mean "no location".
    let r = put(
        &e.sock,
        "/v1/vm/checkpoint-config",
        r#"{"type":"standard"}"#,
    );
    assert_eq!(r.json(), json!({"type": "standard", "location": null}));
    let r = put(
        &e.sock,
        "/v1/vm/checkpoint-config",
        r#"{"type":"disabled","location":null}"#,
    );
    assert_eq!(r.json(), json!({"type": "disabled", "location": null}));
    assert_eq!(
        get(&e.sock, "/v1/vm").json()["checkpoint_config"]["type"],
        "disabled"
    );
}

#[test]
fn checkpoint_config_put_rejects_bad_bodies_and_changes_nothing() {
    let e = env();
    put(
        &e.sock,
        "/v1/vm/checkpoint-config",
        r#"{"type":"standard","location":"/keep"}"#,
    );
    let calls = e.fake.calls();
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
        let r = put(&e.sock, "/v1/vm/checkpoint-config", body);
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(e.fake.calls(), calls, "a rejected request reached the VMM");
    let g = get(&e.sock, "/v1/vm/checkpoint-config").json();
    assert_eq!(g, json!({"type": "standard", "location": "/keep"}));
}

#[test]
fn guest_answers_when_running_409_otherwise_503_without_agent() {
    let e = env();
    let r = get(&e.sock, "/v1/guest");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["agent"], "connected");
    assert_eq!(r.json()["info"]["hostname"], "fake");
    for s in [VmState::Paused, VmState::Off] {
        e.fake.set_state(s);
        let r = get(&e.sock, "/v1/guest");
        assert_eq!(r.status, 409);
        assert_eq!(r.code(), "invalid_state");
    }
    e.fake.set_state(VmState::Running);
    e.fake.state.lock().unwrap().agent = false;
    let r = get(&e.sock, "/v1/guest");
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "agent_unreachable");
}

#[test]
fn exec_relays_output_and_exit_code() {
    let e = env();
    let r = post(
        &e.sock,
        "/v1/guest/exec",
        r#"{"argv":["echo","hi","there"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"exit_code": 0, "stdout": "hi there\n", "stderr": ""})
    );
    let r = post(
        &e.sock,
        "/v1/guest/exec",
        r#"{"argv":["exit","3"],"timeout_s":5}"#,
    );
    assert_eq!(r.json()["exit_code"], 3);
    let r = post(
        &e.sock,
        "/v1/guest/exec",
        r#"{"argv":["true"],"timeout_s":null}"#,
    );
    assert_eq!(r.status, 200);
}

#[test]
fn exec_in_the_wrong_state_is_409_and_without_agent_503() {
    let e = env();
    for s in [VmState::Paused, VmState::Off] {
        e.fake.set_state(s);
        let r = post(&e.sock, "/v1/guest/exec", r#"{"argv":["true"]}"#);
        assert_eq!(r.status, 409);
    }
    e.fake.set_state(VmState::Running);
    e.fake.state.lock().unwrap().agent = false;
    let r = post(&e.sock, "/v1/guest/exec", r#"{"argv":["true"]}"#);
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "agent_unreachable");
}

#[test]
fn exec_rejects_bad_bodies_without_reaching_the_vmm() {
    let e = env();
    let calls = e.fake.calls();
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
    assert_eq!(e.fake.calls(), calls);
}

#[test]
fn unknown_routes_are_404_json_and_change_nothing() {
    let e = env();
    let calls = e.fake.calls();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/vm/"),
        ("POST", "/v1/vm/reboot"),
        ("GET", "/v2/vm"),
        ("GET", "/v1/checkpoints/nope"),
        ("DELETE", "/v1/nothing"),
        ("POST", "/v1/vm/pause/now"),
    ] {
        let r = http(&e.sock, method, path, None);
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.code(), "not_found");
    }
    assert_eq!(e.fake.calls(), calls);
}

#[test]
fn wrong_method_is_405_with_allow_and_changes_nothing() {
    let e = env();
    let calls = e.fake.calls();
    for (method, path, allow) in [
        ("DELETE", "/v1/vm", "GET"),
        ("POST", "/v1/vm", "GET"),
        ("GET", "/v1/vm/pause", "POST"),
        ("PUT", "/v1/vm/stop", "POST"),
        ("POST", "/v1/vm/checkpoint-config", "GET, PUT"),
        ("PATCH", "/v1/guest", "GET"),
        ("GET", "/v1/guest/exec", "POST"),
        ("HEAD", "/v1/vm/start", "POST"),
    ] {
        let r = http(&e.sock, method, path, None);
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        if method != "HEAD" {
            assert_eq!(r.code(), "method_not_allowed");
        }
    }
    assert_eq!(e.fake.calls(), calls);
    assert_eq!(get(&e.sock, "/v1/vm").json()["state"], "running");
}

#[test]
fn bodies_over_one_mib_are_413_and_change_nothing() {
    let e = env();
    let calls = e.fake.calls();
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
    assert_eq!(e.fake.calls(), calls);
    assert_eq!(
        get(&e.sock, "/v1/vm/checkpoint-config").json()["type"],
        "production"
    );
}

#[test]
fn chunked_body_over_one_mib_is_413() {
    use std::io::{Read, Write};
    let e = env();
    let mut s = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
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
}

#[test]
fn keep_alive_connection_serves_many_requests() {
    use std::io::{BufRead, BufReader, Read, Write};
    let e = env();
    let mut s = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
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
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["state"], "running");
    }
}

#[test]
fn typed_client_round_trips_every_route() {
    let e = env();
    let c = api::Client::new(&e.sock).unwrap();
    assert_eq!(c.vm().unwrap().state, VmState::Running);
    let vm = c.lifecycle(api::LifecycleAction::Pause).unwrap();
    assert_eq!(vm.state, VmState::Paused);
    let err = c.lifecycle(api::LifecycleAction::Pause).unwrap_err();
    assert_eq!(err.api_code(), Some("invalid_state"));
    c.lifecycle(api::LifecycleAction::Resume).unwrap();
    let cfg = api::types::CheckpointConfig {
        kind: CheckpointType::Standard,
        location: Some("/ck".into()),
    };
    assert_eq!(c.set_checkpoint_config(&cfg).unwrap(), cfg);
    assert_eq!(c.checkpoint_config().unwrap(), cfg);
    assert_eq!(c.guest().unwrap().info["version"], "fake-1");
    let out = c
        .exec(&api::types::ExecRequest {
            argv: vec!["echo".into(), "x".into()],
            timeout_s: Some(2),
        })
        .unwrap();
    assert_eq!(out.stdout, "x\n");
}
