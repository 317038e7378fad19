//! Answers API calls from the control loop.
//!
//! 1. The API server (its own thread, see the `api` crate) turns an HTTP request into an
//!    [`ApiCall`] and hands it to the handler built by [`handler`], which forwards it into the
//!    control loop's event channel; the loop wakes on the channel (it blocks on nothing else).
//! 2. The control loop calls [`answer`] with the [`Machine`]: state queries and lifecycle calls
//!    are answered there and then, so they are ordered with guest events.
//! 3. Calls that talk to the guest agent (guest info, exec, shutdown) are checked against the
//!    state in the loop, then run on a worker thread that owns the reply, so a slow guest never
//!    holds up the loop, the vCPUs or other API clients. At most [`MAX_AGENT_CALLS`] run at
//!    once (each holds a thread and a vsock connection); one more is refused at once with 503
//!    `agent_unreachable` saying the agent is busy, rather than queued behind a slow guest.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use api::types::{
    AgentStatus, ChangesInfo, CheckpointInfo, CheckpointList, CheckpointSizes, Consistency,
    ConsoleInfo, DiskChanges, DiskInfo, ExecResponse, ExportInfo, Extent, GuestInfo, Progress,
    TakenType, VmConfigInfo, VmInfo, VsockInfo,
};
use api::{ApiCall, ApiError, ApiHandler, ApiReply, ApiRequest, ApiResponse, LifecycleAction};

use crate::agent::{AgentClient, AgentError, CallSlot, CallSlots};
use crate::config::Kernel;
use crate::runner::{LifecycleError, Machine, VmState};
use crate::vm::VmEvent;

/// How long to wait for the agent's handshake and short replies.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most API calls talking to the guest agent at once.
pub const MAX_AGENT_CALLS: usize = 8;

/// The API's agent calls in flight (one VMM per process).
static AGENT_CALLS: CallSlots = CallSlots::new(MAX_AGENT_CALLS);

/// A slot for one more agent call, or the 503 that says the agent is busy.
fn agent_slot() -> Result<CallSlot<'static>, ApiError> {
    AGENT_CALLS.try_take().ok_or_else(|| {
        ApiError::agent_unreachable(format!(
            "the guest agent is busy: {} calls to it are in flight, the most at once; try \
             again when one has finished",
            AGENT_CALLS.max()
        ))
    })
}

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
    let slot = match agent_slot() {
        Ok(slot) => slot,
        Err(e) => {
            call_reply.send(Err(e));
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("api-agent".into())
        .spawn(move || {
            let _slot = slot;
            crate::sandbox::enter(crate::sandbox::ThreadKind::Agent);
            let reply = AgentClient::connect(&vsock.socket, AGENT_TIMEOUT)
                .map_err(agent_error)
                .and_then(|mut agent| work(&mut agent));
            call_reply.send(reply);
        });
    if let Err(e) = spawned {
        // The closure, with the reply, is gone: the server answers the dropped call with a 500.
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
    let slot = match agent_slot() {
        Ok(slot) => slot,
        Err(e) => {
            reply.send(Err(e));
            return;
        }
    };
    let events = machine.events();
    let spawned = std::thread::Builder::new()
        .name("api-shutdown".into())
        .spawn(move || {
            let _slot = slot;
            crate::sandbox::enter(crate::sandbox::ThreadKind::Agent);
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
    // Children in commit order (list() is in commit order).
    let children = store
        .list()
        .map_err(|e| crate::checkpoint::CheckpointError::from(e).to_api())?
        .into_iter()
        .filter(|c| c.parent.as_deref() == Some(m.id.as_str()))
        .map(|c| c.id)
        .collect();
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
        children,
        disks: m
            .disks
            .iter()
            .map(|d| d.top(&location).display().to_string())
            .collect(),
    })
}

/// `GET /v1/checkpoints`.
fn list_checkpoints(machine: &mut Machine) -> Result<CheckpointList, ApiError> {
    let Some(store) = machine.existing_store().map_err(|e| e.to_api())? else {
        return Ok(CheckpointList::default());
    };
    let all = store
        .list()
        .map_err(|e| crate::checkpoint::CheckpointError::from(e).to_api())?;
    let current = store.current().map(str::to_string);
    let shared_layers = crate::checkpoint::fold::hidden_layers(store)
        .map_err(|e| e.to_api())?
        .into_iter()
        .map(|(disk, path, branches)| api::types::SharedLayer {
            disk,
            path: path.display().to_string(),
            branches: u32::try_from(branches).unwrap_or(u32::MAX),
        })
        .collect();
    let checkpoints = all
        .iter()
        .map(|m| checkpoint_info(machine, m))
        .collect::<Result<_, _>>()?;
    let progress = machine
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(CheckpointList {
        checkpoints,
        current,
        progress,
        shared_layers,
    })
}

/// Exports a checkpoint on a worker thread (the copy can take minutes; the VM and the API go
/// on), publishing its progress for `GET /v1/checkpoints`. One export at a time.
fn export(
    machine: &mut Machine,
    id: &str,
    request: &api::types::ExportCheckpoint,
    reply: api::Responder,
) {
    // The folds of a delete change layers an export may read: they finish first.
    machine.finish_folding();
    if machine
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
    {
        reply.send(Err(ApiError::invalid_state(
            "another export is running; wait for it to finish",
        )));
        return;
    }
    let format = match request.disk_format {
        api::types::DiskFormat::Raw => disk::ops::ConvertFormat::Raw,
        api::types::DiskFormat::Strata => disk::ops::ConvertFormat::Strata,
    };
    let job = match machine.prepare_export(id, std::path::Path::new(&request.destination), format) {
        Ok(job) => job,
        Err(e @ crate::checkpoint::CheckpointError::Export { .. }) => {
            reply.send(Err(ApiError::bad_request(crate::error_line(&e))));
            return;
        }
        Err(e) => {
            reply.send(Err(e.to_api()));
            return;
        }
    };
    // After the checkpoint is found (404 first), before anything is written.
    if let Err(why) =
        crate::sandbox::check_export_destination(std::path::Path::new(&request.destination))
    {
        reply.send(Err(ApiError::bad_request(why)));
        return;
    }
    let progress = machine.progress.clone();
    let on_spawn_failure = machine.progress.clone();
    let set = move |p: Option<Progress>| *progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    set(Some(Progress {
        operation: api::types::PROGRESS_EXPORT.to_string(),
        checkpoint: id.to_string(),
        done: 0,
        total: 0,
    }));
    let id = id.to_string();
    let spawned = std::thread::Builder::new()
        .name("export".into())
        .spawn(move || {
            crate::sandbox::enter(crate::sandbox::ThreadKind::Export);
            let result = job.run(&mut |done, total| {
                set(Some(Progress {
                    operation: api::types::PROGRESS_EXPORT.to_string(),
                    checkpoint: id.clone(),
                    done: done.min(total),
                    total,
                }))
            });
            set(None);
            reply.send(match result {
                Ok(r) => Ok(ApiReply::Export(ExportInfo {
                    id,
                    destination: r.destination.display().to_string(),
                    disks: r.disks.iter().map(|p| p.display().to_string()).collect(),
                    state: r.state.map(|p| p.display().to_string()),
                    memory: r.memory.map(|p| p.display().to_string()),
                    bytes: r.bytes,
                })),
                Err(e @ crate::checkpoint::CheckpointError::Export { .. }) => {
                    Err(ApiError::bad_request(crate::error_line(&e)))
                }
                Err(e) => Err(e.to_api()),
            });
        });
    if let Err(e) = spawned {
        log::error!("cannot start an export thread: {e}");
        *on_spawn_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
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
                // Folds run in the store they were planned in.
                machine.finish_folding();
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
        ApiRequest::GetCheckpoint(id) => {
            let location = machine
                .checkpoint_config
                .location
                .clone()
                .unwrap_or_default();
            machine
                .existing_store()
                .and_then(|s| match s {
                    Some(s) => Ok(s.get(&id)?),
                    None => Err(snapshot::Error::NotFound {
                        location: location.into(),
                        id: id.clone(),
                    }
                    .into()),
                })
                .map_err(|e| e.to_api())
                .and_then(|m| checkpoint_info(machine, &m).map(ApiReply::Checkpoint))
        }
        ApiRequest::ApplyCheckpoint { id, request } => {
            let applied = if request.save_current {
                machine.apply_saving_current(&id).map(|_| ())
            } else {
                machine.apply_checkpoint(&id)
            };
            // The VM already runs (its disks held); the answer waits until the new layers
            // are recorded, so an apply answered OK survives a crash of the VMM.
            applied
                .and_then(|()| machine.settle_held())
                .map_err(|e| e.to_api())
                .and_then(|()| vm(machine))
        }
        ApiRequest::RevertCheckpoint => machine
            .revert()
            .and_then(|()| machine.settle_held())
            .map_err(|e| e.to_api())
            .and_then(|()| vm(machine)),
        ApiRequest::DeleteCheckpoint(id) => match machine.delete_checkpoint(&id) {
            Ok(gone) => {
                if !gone.is_empty() {
                    log::info!("deleted checkpoint {id}; removed layers {gone:?}");
                }
                list_checkpoints(machine).map(ApiReply::Checkpoints)
            }
            Err(e) => Err(e.to_api()),
        },
        ApiRequest::ExportCheckpoint { id, request } => {
            export(machine, &id, &request, reply);
            return;
        }
        ApiRequest::CheckpointChanges { id, since } => machine
            .checkpoint_changes(&id, since.as_deref())
            .map_err(|e| e.to_api())
            .map(|maps| {
                ApiReply::Changes(ChangesInfo {
                    id: id.clone(),
                    since: since.clone(),
                    disks: maps
                        .into_iter()
                        .enumerate()
                        .map(|(i, m)| DiskChanges {
                            index: i as u32,
                            virtual_size: m.virtual_size,
                            granularity: m.cluster_size,
                            extents: m
                                .ranges
                                .iter()
                                .map(|r| Extent {
                                    offset: r.offset,
                                    length: r.length,
                                })
                                .collect(),
                        })
                        .collect(),
                })
            }),
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
