//! A stand-in for the VMM in the HTTP layer's tests: it records every call that reaches it and
//! answers each kind of request with one fixed reply.
//!
//! It keeps no state and has no rules on purpose. What the VMM answers — which lifecycle action
//! is allowed in which state, the state it reports, `last_exit`, the checkpoint settings it
//! stores, the guest agent — is tested against the real `strata` in `tests/tests/api.rs`, so
//! there is one set of rules, the VMM's. Here a test can only check what the server did with a
//! request: answer it itself (404, 405, 400, 413) or hand it on, parsed, to the VMM.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use api::types::{AgentStatus, CheckpointConfig, ExecResponse, GuestInfo, VmInfo};
use api::{ApiCall, ApiReply, ApiRequest, ApiServer, ServerOptions};

/// The API server with a handler that records calls and answers fixed replies.
pub struct Recorder {
    pub server: Option<ApiServer>,
    calls: Arc<Mutex<Vec<ApiRequest>>>,
}

impl Recorder {
    /// Serves on `path` with default options.
    pub fn start(path: &Path) -> Recorder {
        Self::start_with(path, ServerOptions::default())
    }

    /// Serves on `path`.
    pub fn start_with(path: &Path, options: ServerOptions) -> Recorder {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let handler: api::ApiHandler = Arc::new(move |call: ApiCall| {
            let reply = fixed_reply(&call.request);
            seen.lock().unwrap().push(call.request);
            call.reply.send(Ok(reply));
        });
        let server = ApiServer::start_with(path, handler, options).unwrap();
        Recorder {
            server: Some(server),
            calls,
        }
    }

    /// Every request that reached the handler, in order.
    pub fn calls(&self) -> Vec<ApiRequest> {
        self.calls.lock().unwrap().clone()
    }

    /// How many requests reached the handler.
    pub fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

/// The one reply for each kind of request.
pub fn fixed_reply(request: &ApiRequest) -> ApiReply {
    match request {
        ApiRequest::GetVm | ApiRequest::Lifecycle(_) => ApiReply::Vm(vm_info()),
        ApiRequest::GetCheckpointConfig | ApiRequest::PutCheckpointConfig(_) => {
            ApiReply::CheckpointConfig(CheckpointConfig::default())
        }
        ApiRequest::GetGuest => ApiReply::Guest(guest_info()),
        ApiRequest::GuestExec(_) => ApiReply::Exec(exec_response()),
    }
}

/// The fixed `VmInfo` (parsed from JSON so that fields the test does not name keep their
/// defaults).
pub fn vm_info() -> VmInfo {
    serde_json::from_value(serde_json::json!({
        "state": "running",
        "config": {
            "vcpus": 2,
            "memory_mib": 64,
            "kernel": "recorded",
            "cmdline": "console=ttyS0",
            "disks": [{"path": "/tmp/disk0.strata", "readonly": false}],
            "vsock": {"cid": 3, "socket": "/tmp/vsock.sock"},
        },
        "checkpoint_config": {"type": "production", "location": null},
        "current_checkpoint": null,
        "last_exit": null,
    }))
    .unwrap()
}

/// The fixed `GuestInfo`.
pub fn guest_info() -> GuestInfo {
    let serde_json::Value::Object(info) = serde_json::json!({"agent": "recorded"}) else {
        unreachable!()
    };
    GuestInfo {
        agent: AgentStatus::Connected,
        info,
    }
}

/// The fixed `ExecResponse`.
pub fn exec_response() -> ExecResponse {
    ExecResponse {
        exit_code: 0,
        stdout: "recorded\n".into(),
        stderr: String::new(),
    }
}
