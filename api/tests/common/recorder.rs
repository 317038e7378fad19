//! A stand-in for the VMM in the HTTP layer's tests: it records every call that reaches it and
//! answers each kind of request with one fixed reply.
//!
//! It keeps no state and has no rules on purpose, but one: a checkpoint it was asked to delete
//! is gone (404) for every later call that names it, until a create answers with that id again
//! — schemathesis checks that a deleted resource is not served any more. What the VMM answers — which lifecycle action
//! is allowed in which state, the state it reports, `last_exit`, the checkpoint settings it
//! stores, the guest agent — is tested against the real `strata` in `tests/tests/api.rs`, so
//! there is one set of rules, the VMM's. Here a test can only check what the server did with a
//! request: answer it itself (404, 405, 400, 413) or hand it on, parsed, to the VMM.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use api::types::{
    AgentStatus, ChangesInfo, CheckpointConfig, CheckpointInfo, CheckpointList, DiskChanges,
    ExecResponse, ExportInfo, Extent, GuestInfo, VmInfo,
};
use api::{ApiCall, ApiError, ApiReply, ApiRequest, ApiResponse, ApiServer, ServerOptions};

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
        let deleted = Mutex::new(HashSet::new());
        let handler: api::ApiHandler = Arc::new(move |call: ApiCall| {
            let response = answer(&call.request, &mut deleted.lock().unwrap());
            seen.lock().unwrap().push(call.request);
            call.reply.send(response);
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

/// The fixed reply, or 404 for a checkpoint in `deleted` (which a delete adds to and a create
/// takes its checkpoint's id from).
fn answer(request: &ApiRequest, deleted: &mut HashSet<String>) -> ApiResponse {
    let gone = |id: &str| {
        Err(ApiError::not_found(format!(
            "no checkpoint {id:?}: it was deleted"
        )))
    };
    let named: Vec<&String> = match request {
        ApiRequest::DeleteCheckpoint(id) => {
            if !deleted.insert(id.clone()) {
                return gone(id);
            }
            vec![]
        }
        ApiRequest::CreateCheckpoint(_) => {
            deleted.remove(&checkpoint_info().id);
            vec![]
        }
        ApiRequest::GetCheckpoint(id)
        | ApiRequest::ApplyCheckpoint { id, .. }
        | ApiRequest::ExportCheckpoint { id, .. } => vec![id],
        ApiRequest::CheckpointChanges { id, since } => std::iter::once(id).chain(since).collect(),
        _ => vec![],
    };
    match named.into_iter().find(|id| deleted.contains(*id)) {
        Some(id) => gone(id),
        None => Ok(fixed_reply(request)),
    }
}

/// The one reply for each kind of request.
pub fn fixed_reply(request: &ApiRequest) -> ApiReply {
    match request {
        ApiRequest::GetVm
        | ApiRequest::Lifecycle(_)
        | ApiRequest::ApplyCheckpoint { .. }
        | ApiRequest::RevertCheckpoint => ApiReply::Vm(vm_info()),
        ApiRequest::GetCheckpointConfig | ApiRequest::PutCheckpointConfig(_) => {
            ApiReply::CheckpointConfig(CheckpointConfig::default())
        }
        ApiRequest::CreateCheckpoint(_) | ApiRequest::GetCheckpoint(_) => {
            ApiReply::Checkpoint(checkpoint_info())
        }
        ApiRequest::ListCheckpoints | ApiRequest::DeleteCheckpoint(_) => {
            ApiReply::Checkpoints(checkpoint_list())
        }
        ApiRequest::ExportCheckpoint { .. } => ApiReply::Export(export_info()),
        ApiRequest::CheckpointChanges { .. } => ApiReply::Changes(changes_info()),
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

/// The fixed `CheckpointInfo`.
pub fn checkpoint_info() -> CheckpointInfo {
    serde_json::from_value(serde_json::json!({
        "id": "ck-2",
        "name": "recorded",
        "type": "standard",
        "parent": "ck-1",
        "created": "2024-05-01T10:00:00Z",
        "consistency": "standard",
        "path": "/tmp/ck/ck-2",
        "sizes": {"state": 20480, "memory": 67108864, "disk_layers": 1536},
        "current": true,
        "fallback_reason": "the guest agent did not answer",
        "disks": ["/tmp/ck/ck-2/disk0.strata"],
    }))
    .unwrap()
}

/// The fixed `CheckpointList`: an older checkpoint and [`checkpoint_info`], the current one.
pub fn checkpoint_list() -> CheckpointList {
    let older: CheckpointInfo = serde_json::from_value(serde_json::json!({
        "id": "ck-1",
        "name": "first",
        "type": "production",
        "parent": null,
        "created": "2024-05-01T09:00:00Z",
        "consistency": "crash-consistent",
        "path": "/tmp/ck/ck-1",
        "sizes": {"state": 0, "memory": 0, "disk_layers": 3221225472u64},
        "current": false,
        "disks": ["/tmp/ck/ck-1/disk0.strata"],
        "children": ["ck-2"],
    }))
    .unwrap();
    CheckpointList {
        checkpoints: vec![older, checkpoint_info()],
        current: Some("ck-2".into()),
        progress: None,
        shared_layers: Vec::new(),
    }
}

/// The fixed `ExportInfo`: a standard checkpoint exported as raw disks.
pub fn export_info() -> ExportInfo {
    ExportInfo {
        id: "ck-2".into(),
        destination: "/tmp/export".into(),
        disks: vec!["/tmp/export/disk0.raw".into()],
        state: Some("/tmp/export/state.bin".into()),
        memory: Some("/tmp/export/memory.bin".into()),
        bytes: 67_129_344,
    }
}

/// The fixed `ChangesInfo`: two extents on the first disk, none on the second.
pub fn changes_info() -> ChangesInfo {
    ChangesInfo {
        id: "ck-2".into(),
        since: Some("ck-1".into()),
        disks: vec![
            DiskChanges {
                index: 0,
                virtual_size: 64 << 20,
                granularity: 65536,
                extents: vec![
                    Extent {
                        offset: 0,
                        length: 65536,
                    },
                    Extent {
                        offset: 1 << 20,
                        length: 131_072,
                    },
                ],
            },
            DiskChanges {
                index: 1,
                virtual_size: 16 << 20,
                granularity: 65536,
                extents: vec![],
            },
        ],
    }
}
