//! A fake VMM for the API's tests: a thread that answers `ApiCall`s from a small in-memory state
//! machine with the VMM's transition rules (pause only when running, resume only when paused,
//! start only when off, stop and shutdown only when running or paused), an agent that can be
//! switched off, and a counter of the calls that reached it.
//!
//! Shared by the integration tests and `examples/fake_server.rs` through `#[path]`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use api::types::{
    AgentStatus, CheckpointConfig, DiskInfo, ExecRequest, ExecResponse, GuestInfo, VmConfigInfo,
    VmInfo, VmState, VsockInfo,
};
use api::{
    ApiCall, ApiError, ApiReply, ApiRequest, ApiResponse, ApiServer, LifecycleAction, ServerOptions,
};

/// What the fake VMM holds.
#[derive(Debug, Clone)]
pub struct FakeState {
    pub state: VmState,
    pub checkpoint_config: CheckpointConfig,
    pub agent: bool,
    pub last_exit: Option<String>,
}

impl Default for FakeState {
    fn default() -> Self {
        FakeState {
            state: VmState::Running,
            checkpoint_config: CheckpointConfig::default(),
            agent: true,
            last_exit: None,
        }
    }
}

/// A running fake VMM with its API server.
pub struct Fake {
    pub server: Option<ApiServer>,
    pub state: Arc<Mutex<FakeState>>,
    pub calls: Arc<AtomicUsize>,
}

impl Fake {
    /// Serves the fake on `path` with default options.
    pub fn start(path: &Path) -> Fake {
        Self::start_with(path, ServerOptions::default())
    }

    /// Serves the fake on `path`.
    pub fn start_with(path: &Path, options: ServerOptions) -> Fake {
        Self::try_start_with(path, options).unwrap()
    }

    /// Serves the fake on `path`, or says why it cannot.
    pub fn try_start_with(path: &Path, options: ServerOptions) -> Result<Fake, api::ServerError> {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<ApiCall>();
        {
            let state = state.clone();
            let calls = calls.clone();
            std::thread::spawn(move || {
                for call in rx {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let response = answer(&mut state.lock().unwrap(), call.request);
                    call.reply.send(response);
                }
            });
        }
        let handler: api::ApiHandler = Arc::new(move |call| {
            let _ = tx.send(call);
        });
        let server = ApiServer::start_with(path, handler, options)?;
        Ok(Fake {
            server: Some(server),
            state,
            calls,
        })
    }

    pub fn set_state(&self, s: VmState) {
        self.state.lock().unwrap().state = s;
    }

    pub fn snapshot(&self) -> FakeState {
        self.state.lock().unwrap().clone()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn vm_info(s: &FakeState) -> VmInfo {
    VmInfo {
        state: s.state,
        config: VmConfigInfo {
            vcpus: 2,
            memory_mib: 64,
            kernel: "test-guest".into(),
            cmdline: "console=ttyS0".into(),
            disks: vec![DiskInfo {
                path: "/tmp/disk0.strata".into(),
                readonly: false,
            }],
            vsock: Some(VsockInfo {
                cid: 3,
                socket: "/tmp/vsock.sock".into(),
            }),
        },
        checkpoint_config: s.checkpoint_config.clone(),
        current_checkpoint: None,
        last_exit: s.last_exit.clone(),
    }
}

fn require_agent(s: &FakeState) -> Result<(), ApiError> {
    if s.state != VmState::Running {
        return Err(ApiError::invalid_state(format!(
            "the guest agent needs a running VM; the VM is {}",
            s.state
        )));
    }
    if !s.agent {
        return Err(ApiError::agent_unreachable(
            "the guest agent does not answer",
        ));
    }
    Ok(())
}

fn exec(req: &ExecRequest) -> ExecResponse {
    let ok = |stdout: String| ExecResponse {
        exit_code: 0,
        stdout,
        stderr: String::new(),
    };
    match req.argv[0].as_str() {
        "echo" => ok(format!("{}\n", req.argv[1..].join(" "))),
        "true" => ok(String::new()),
        "exit" => ExecResponse {
            exit_code: req.argv.get(1).and_then(|a| a.parse().ok()).unwrap_or(1),
            stdout: String::new(),
            stderr: "exiting\n".into(),
        },
        other => ExecResponse {
            exit_code: 127,
            stdout: String::new(),
            stderr: format!("{other}: not found\n"),
        },
    }
}

/// The fake's transition rules.
pub fn answer(s: &mut FakeState, request: ApiRequest) -> ApiResponse {
    use LifecycleAction::*;
    use VmState::*;
    match request {
        ApiRequest::GetVm => Ok(ApiReply::Vm(vm_info(s))),
        ApiRequest::Lifecycle(action) => {
            let next = match (action, s.state) {
                (Start, Off) => Running,
                (Pause, Running) => Paused,
                (Resume, Paused) => Running,
                (Stop | Shutdown, Running | Paused) => Off,
                (action, state) => {
                    return Err(ApiError::invalid_state(format!(
                        "cannot {} the VM: it is {state}",
                        action.as_str()
                    )))
                }
            };
            s.state = next;
            match action {
                Stop => s.last_exit = Some("stop".into()),
                Shutdown => s.last_exit = Some("poweroff".into()),
                _ => {}
            }
            Ok(ApiReply::Vm(vm_info(s)))
        }
        ApiRequest::GetCheckpointConfig => {
            Ok(ApiReply::CheckpointConfig(s.checkpoint_config.clone()))
        }
        ApiRequest::PutCheckpointConfig(c) => {
            s.checkpoint_config = c;
            Ok(ApiReply::CheckpointConfig(s.checkpoint_config.clone()))
        }
        ApiRequest::GetGuest => {
            require_agent(s)?;
            let info =
                serde_json::json!({"version": "fake-1", "hostname": "fake", "kernel": "none"});
            let serde_json::Value::Object(info) = info else {
                unreachable!()
            };
            Ok(ApiReply::Guest(GuestInfo {
                agent: AgentStatus::Connected,
                info,
            }))
        }
        ApiRequest::GuestExec(req) => {
            require_agent(s)?;
            Ok(ApiReply::Exec(exec(&req)))
        }
    }
}
