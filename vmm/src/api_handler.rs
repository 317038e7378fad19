//! Answers API calls from the control loop.
//!
//! 1. The API server (its own thread, see the `api` crate) turns an HTTP request into an
//!    [`ApiCall`] and hands it to the handler built by [`handler`], which forwards it into the
//!    control loop's event channel; the loop wakes on the channel (it blocks on nothing else).
//! 2. The control loop calls [`answer`] with the [`Machine`]: state queries and lifecycle calls
//!    are answered there and then, so they are ordered with guest events.
//! 3. Calls that talk to the guest agent (guest info, exec, shutdown) are checked against the
//!    state in the loop, then run on a worker thread that owns the reply, so a slow guest never
//!    holds up the loop, the vCPUs or other API clients.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use api::types::{
    AgentStatus, CheckpointInfo, CheckpointList, CheckpointSizes, Consistency, ConsoleInfo,
    DiskInfo, ExecResponse, GuestInfo, TakenType, VmConfigInfo, VmInfo, VsockInfo,
};
use api::{ApiCall, ApiError, ApiHandler, ApiReply, ApiRequest, ApiResponse, LifecycleAction};

use crate::agent::{AgentClient, AgentError};
use crate::config::Kernel;
use crate::runner::{LifecycleError, Machine, VmState};
use crate::vm::VmEvent;

/// How long to wait for the agent's handshake and short replies.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The handler the API server calls: forwards every call into the control loop.
pub fn handler(events: Sender<VmEvent>) -> ApiHandler {
    Arc::new(move |call: ApiCall| {
        // A closed channel means the VMM is exiting; the server answers the dropped call.
        let _ = events.send(VmEvent::Api(call));
    })
}

fn api_state(state: VmState) -> api::types::VmState {
    match state {
        VmState::Running => api::types::VmState::Running,
        VmState::Paused => api::types::VmState::Paused,
        VmState::Off => api::types::VmState::Off,
    }
}

/// The VM as `GET /v1/vm` shows it.
pub fn vm_info(machine: &Machine) -> VmInfo {
    let c = machine.config();
    VmInfo {
        state: api_state(machine.state()),
        config: VmConfigInfo {
            vcpus: u32::from(c.vcpus),
            memory_mib: c.memory >> 20,
            kernel: match &c.kernel {
                Kernel::TestGuest => "embedded test guest".to_string(),
                Kernel::File(p) => p.display().to_string(),
            },
            cmdline: c.cmdline.clone(),
            disks: c
                .disks
                .iter()
                .map(|d| DiskInfo {
                    path: d.path.display().to_string(),
                    readonly: d.read_only,
                })
                .collect(),
            vsock: c.vsock.as_ref().map(|v| VsockInfo {
                cid: v.cid,
                socket: v.socket.display().to_string(),
            }),
        },
        checkpoint_config: machine.checkpoint_config.clone(),
        current_checkpoint: machine
            .store
            .as_ref()
            .and_then(|s| s.current().map(str::to_string)),
        last_exit: machine.last_exit.clone(),
        console: ConsoleInfo {
            dropped_bytes: machine.platform().console().dropped_bytes(),
        },
    }
}

fn lifecycle_error(e: LifecycleError) -> ApiError {
    match e {
        LifecycleError::WrongState(w) => ApiError::invalid_state(w.to_string()),
        other => ApiError::internal(format!("{other}")),
    }
}

fn agent_error(e: AgentError) -> ApiError {
    if e.is_unavailable() {
        ApiError::agent_unreachable(e.to_string())
    } else {
        match e {
            // The agent answered but refused: the request was bad for it.
            AgentError::Agent { .. } => ApiError::bad_request(e.to_string()),
            other => ApiError::agent_unreachable(other.to_string()),
        }
    }
}

/// Runs `work` against the guest agent on a worker thread and replies from there.
fn with_agent(
    machine: &Machine,
    call_reply: api::Responder,
    work: impl FnOnce(&mut AgentClient) -> ApiResponse + Send + 'static,
) {
    if machine.state() != VmState::Running {
        call_reply.send(Err(ApiError::invalid_state(format!(
            "the guest agent can only be reached while the VM is running; it is {}",
            machine.state().name()
        ))));
        return;
    }
    let Some(vsock) = machine.config().vsock.clone() else {
        call_reply.send(Err(ApiError::agent_unreachable(
            "this VM has no vsock device, so there is no guest agent (start it with --vsock)",
        )));
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("api-agent".into())
        .spawn(move || {
            let reply = AgentClient::connect(&vsock.socket, AGENT_TIMEOUT)
                .map_err(agent_error)
                .and_then(|mut agent| work(&mut agent));
            call_reply.send(reply);
        });
    if let Err(e) = spawned {
        log::error!("cannot start an agent worker thread: {e}");
    }
}

/// Asks the guest, through its agent, to power off; the control loop answers the call when
/// the VM is off (or gives up after a while).
fn shutdown(machine: &Machine, reply: api::Responder) {
    let Some(vsock) = machine.config().vsock.clone() else {
        reply.send(Err(ApiError::agent_unreachable(
            "this VM has no vsock device, so there is no guest agent to ask to shut down; \
             use stop for a hard power-off",
        )));
        return;
    };
    let events = machine.events();
    let spawned = std::thread::Builder::new()
        .name("api-shutdown".into())
        .spawn(move || {
            let asked = AgentClient::connect(&vsock.socket, AGENT_TIMEOUT)
                .and_then(|mut agent| agent.exec(&["poweroff".to_string()], 30));
            match asked {
                // The guest may go before its agent can answer: a dropped connection is the
                // request taking effect.
                Ok(_) | Err(AgentError::Io { .. }) => {
                    let _ = events.send(VmEvent::AwaitPowerOff(reply));
                }
                Err(e) => reply.send(Err(agent_error(e))),
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the shutdown thread: {e}");
    }
}

/// A checkpoint as the API shows it.
fn checkpoint_info(
    machine: &mut Machine,
    m: &snapshot::manifest::Manifest,
) -> Result<CheckpointInfo, ApiError> {
    let store = machine.store().map_err(|e| e.to_api())?;
    let location = store.location().to_path_buf();
    Ok(CheckpointInfo {
        id: m.id.clone(),
        name: m.name.clone(),
        kind: match m.kind {
            snapshot::manifest::CheckpointType::Standard => TakenType::Standard,
            snapshot::manifest::CheckpointType::Production => TakenType::Production,
        },
        parent: m.parent.clone(),
        created: m.created.as_str().to_string(),
        consistency: match m.consistency {
            snapshot::manifest::Consistency::Standard => Consistency::Standard,
            snapshot::manifest::Consistency::ApplicationConsistent => {
                Consistency::ApplicationConsistent
            }
            snapshot::manifest::Consistency::CrashConsistent => Consistency::CrashConsistent,
        },
        path: store.checkpoint_dir(&m.id).display().to_string(),
        sizes: CheckpointSizes {
            state: m.sizes.state,
            memory: m.sizes.memory,
            disk_layers: m.sizes.disk_layers,
        },
        current: store.current() == Some(m.id.as_str()),
        fallback_reason: m.fallback_reason.clone(),
        paused_us: m.paused_us,
        frozen_us: m.frozen_us,
        agent_freeze: m.agent_freeze.clone(),
        disks: m
            .disks
            .iter()
            .map(|d| d.top(&location).display().to_string())
            .collect(),
    })
}

/// `GET /v1/checkpoints`.
fn list_checkpoints(machine: &mut Machine) -> Result<CheckpointList, ApiError> {
    let store = machine.store().map_err(|e| e.to_api())?;
    let all = store
        .list()
        .map_err(|e| crate::checkpoint::CheckpointError::from(e).to_api())?;
    let current = store.current().map(str::to_string);
    let checkpoints = all
        .iter()
        .map(|m| checkpoint_info(machine, m))
        .collect::<Result<_, _>>()?;
    Ok(CheckpointList {
        checkpoints,
        current,
    })
}

/// Answers one call.
pub fn answer(machine: &mut Machine, call: ApiCall) {
    let ApiCall { request, reply } = call;
    let vm = |m: &Machine| Ok(ApiReply::Vm(vm_info(m)));
    let response = match request {
        ApiRequest::GetVm => vm(machine),
        ApiRequest::Lifecycle(action) => {
            let done = match action {
                LifecycleAction::Start => machine.start(),
                LifecycleAction::Pause => machine.pause(),
                LifecycleAction::Resume => machine.resume(),
                LifecycleAction::Stop => machine.stop(),
                LifecycleAction::Shutdown => {
                    if let Err(e) = machine.check_can_shutdown() {
                        reply.send(Err(lifecycle_error(e)));
                        return;
                    }
                    shutdown(machine, reply);
                    return;
                }
            };
            done.map_err(lifecycle_error).and_then(|()| vm(machine))
        }
        ApiRequest::GetCheckpointConfig => Ok(ApiReply::CheckpointConfig(
            machine.checkpoint_config.clone(),
        )),
        ApiRequest::PutCheckpointConfig(config) => match config.validate() {
            Ok(())
                if config.location != machine.checkpoint_config.location
                    && machine
                        .store
                        .as_ref()
                        .is_some_and(|s| !s.active().is_empty()) =>
            {
                Err(ApiError::invalid_state(format!(
                    "the VM runs on layers in its checkpoint location {}; the location \
                     cannot change while it does",
                    machine
                        .checkpoint_config
                        .location
                        .as_deref()
                        .unwrap_or_default()
                )))
            }
            Ok(()) => {
                machine.checkpoint_config = config;
                Ok(ApiReply::CheckpointConfig(
                    machine.checkpoint_config.clone(),
                ))
            }
            Err(e) => Err(ApiError::bad_request(e)),
        },
        ApiRequest::CreateCheckpoint(req) => machine
            .create_checkpoint(req.name.as_deref(), req.kind)
            .map_err(|e| e.to_api())
            .and_then(|(m, _)| checkpoint_info(machine, &m).map(ApiReply::Checkpoint)),
        ApiRequest::ListCheckpoints => list_checkpoints(machine).map(ApiReply::Checkpoints),
        ApiRequest::GetCheckpoint(id) => machine
            .store()
            .and_then(|s| Ok(s.get(&id)?))
            .map_err(|e| e.to_api())
            .and_then(|m| checkpoint_info(machine, &m).map(ApiReply::Checkpoint)),
        ApiRequest::ApplyCheckpoint { id, request } => {
            if request.save_current {
                Err(ApiError::invalid_state(
                    "save_current is not available yet: take a checkpoint first, then apply",
                ))
            } else {
                machine
                    .apply_checkpoint(&id)
                    .map_err(|e| e.to_api())
                    .and_then(|()| vm(machine))
            }
        }
        ApiRequest::GetGuest => {
            with_agent(machine, reply, |agent| {
                let info = agent.info().map_err(agent_error)?;
                let info = match info {
                    serde_json::Value::Object(map) => map,
                    other => {
                        let mut map = serde_json::Map::new();
                        map.insert("value".into(), other);
                        map
                    }
                };
                Ok(ApiReply::Guest(GuestInfo {
                    agent: AgentStatus::Connected,
                    info,
                }))
            });
            return;
        }
        ApiRequest::GuestExec(req) => {
            let timeout = u64::from(req.timeout());
            with_agent(machine, reply, move |agent| {
                let r = agent.exec(&req.argv, timeout).map_err(agent_error)?;
                Ok(ApiReply::Exec(ExecResponse {
                    exit_code: r.exit_code,
                    stdout: r.stdout,
                    stderr: r.stderr,
                }))
            });
            return;
        }
    };
    reply.send(response);
}
