//! Runs a VM to its end and owns its lifecycle.
//!
//! The control loop is the only place that changes what runs: it receives [`VmEvent`]s — from
//! devices (the guest powered off, reset or panicked), from vCPU threads (KVM stopped the
//! guest), from the console (the user quit) and, with an API socket, API calls — on one
//! channel, and applies them to the [`Machine`] in the order they came.
//!
//! Lifecycle: `running` ⇄ `paused` (pause/resume), `running|paused → off` (stop, guest power
//! off), `off → running` (start: a cold boot from the disks). Without an API socket the VMM
//! exits when the guest powers off or panics; with one it stays up in `off` so the VM can be
//! inspected, checkpointed and started again.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use devices::GuestEvent;

use crate::config::{ConsoleConfig, VmConfig};
use crate::console::{self, RawTerminal};
use crate::vcpu::{self, VcpuError, VcpuStop};
use crate::vm::{Platform, Vm, VmError, VmEvent};

/// How a VM's run ended, when it ended the way a guest may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest reset and rebooting was disabled.
    Reset,
    /// The user quit from the console.
    Quit,
}

/// Errors that end a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The console could not be set up.
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The guest reported a panic.
    #[error("the guest panicked")]
    GuestPanic,
    /// KVM stopped running the guest.
    #[error("the guest stopped: {0}")]
    GuestFailed(String),
    /// A vCPU thread stopped answering.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The API socket cannot be served.
    #[error(transparent)]
    Api(#[from] api::ServerError),
    /// The checkpoint location cannot be created.
    #[error("cannot create the checkpoint location {path}")]
    StateDir {
        /// The folder.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint store or the checkpoint to restore.
    #[error(transparent)]
    Checkpoint(crate::checkpoint::CheckpointError),
}

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// vCPUs run the guest.
    Running,
    /// vCPUs are stopped; memory and devices are kept.
    Paused,
    /// No guest is running.
    Off,
}

impl VmState {
    /// The state's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Off => "off",
        }
    }
}

/// A lifecycle call made in a state that does not allow it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot {action} a VM that is {state}")]
pub struct WrongState {
    /// What was asked.
    pub action: &'static str,
    /// The state it was asked in.
    pub state: &'static str,
}

/// Errors of lifecycle calls.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Not allowed in this state.
    #[error(transparent)]
    WrongState(#[from] WrongState),
    /// Booting failed.
    #[error(transparent)]
    Boot(#[from] VmError),
    /// A vCPU did not answer.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Pausing or resuming the vCPUs or the devices failed.
    #[error(transparent)]
    Pause(#[from] crate::vm::PauseError),
}

/// The VM and what it takes to (re)build it.
pub struct Machine {
    pub(crate) platform: Platform,
    pub(crate) config: VmConfig,
    pub(crate) events: Sender<VmEvent>,
    pub(crate) vm: Option<Vm>,
    pub(crate) paused: bool,
    /// The generation of the VM that runs (see [`VmEvent::generation`]).
    pub(crate) generation: u64,
    /// The checkpoint store, once opened (see [`Machine::store`]).
    pub(crate) store: Option<snapshot::store::Store>,
    /// The long checkpoint operation running now (an export), for `GET /v1/checkpoints`.
    pub(crate) progress: std::sync::Arc<std::sync::Mutex<Option<api::types::Progress>>>,
    /// Why the guest last stopped running, if it did.
    pub last_exit: Option<String>,
    /// The checkpoint settings (`GET/PUT /v1/vm/checkpoint-config`).
    pub checkpoint_config: api::types::CheckpointConfig,
    /// The checkpoint just applied while its new active layers are being recorded: the VM's
    /// disks are held until then (`Machine::settle_held`).
    pub(crate) held: Option<String>,
    /// The folds a checkpoint delete left, stepped by the control loop between calls.
    pub(crate) folding: Option<crate::checkpoint::Folding>,
}

impl Machine {
    /// A machine for `config`, off; events go to `events`.
    pub fn new(platform: Platform, config: VmConfig, events: Sender<VmEvent>) -> Self {
        Self {
            platform,
            config: config.clone(),
            events,
            vm: None,
            paused: false,
            generation: 0,
            store: None,
            progress: Default::default(),
            last_exit: None,
            checkpoint_config: config.checkpoint.clone(),
            held: None,
            folding: None,
        }
    }

    /// A sender into the control loop.
    pub fn events(&self) -> Sender<VmEvent> {
        self.events.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The platform (KVM, console).
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        match (&self.vm, self.paused) {
            (None, _) => VmState::Off,
            (Some(_), true) => VmState::Paused,
            (Some(_), false) => VmState::Running,
        }
    }

    fn require(&self, action: &'static str, allowed: &[VmState]) -> Result<(), WrongState> {
        let state = self.state();
        if allowed.contains(&state) {
            Ok(())
        } else {
            Err(WrongState {
                action,
                state: state.name(),
            })
        }
    }

    /// Cold-boots the guest from its kernel and disks.
    pub fn start(&mut self) -> Result<(), LifecycleError> {
        self.require("start", &[VmState::Off])?;
        if let Err(e) = self.settle_held() {
            log::error!("{}", crate::error_line(&e));
        }
        self.settle_folds_for_boot();
        self.generation += 1;
        let events = crate::vm::EventTx::new(&self.events, self.generation);
        self.vm = Some(Vm::boot(&self.platform, &self.boot_config(), &events)?);
        self.paused = false;
        self.last_exit = None;
        Ok(())
    }

    /// Stops every vCPU; returns when all are out of the guest.
    pub fn pause(&mut self) -> Result<(), LifecycleError> {
        self.require("pause", &[VmState::Running])?;
        if let Some(vm) = &self.vm {
            vm.pause()?;
        }
        self.paused = true;
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) -> Result<(), LifecycleError> {
        self.require("resume", &[VmState::Paused])?;
        if let Some(vm) = &self.vm {
            if self.held.is_some() {
                vm.resume_holding_disks()?;
            } else {
                vm.resume()?;
            }
        }
        self.paused = false;
        Ok(())
    }

    /// Whether the guest can be asked to shut down now.
    pub fn check_can_shutdown(&self) -> Result<(), LifecycleError> {
        Ok(self.require("shut down", &[VmState::Running])?)
    }

    /// Powers the VM off at once, like pulling the plug.
    pub fn stop(&mut self) -> Result<(), LifecycleError> {
        self.require("stop", &[VmState::Running, VmState::Paused])?;
        self.halt("stopped");
        Ok(())
    }

    /// Tears the running VM down (if any) and records why.
    pub fn halt(&mut self, why: &str) {
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
        }
        self.paused = false;
        self.last_exit = Some(why.to_string());
    }
}

/// What the control loop does with a guest or vCPU event.
#[derive(Debug, PartialEq, Eq)]
enum GuestOutcome {
    PowerOff,
    Reset,
    Panic,
    Failed(String),
}

fn classify(event: &VmEvent) -> Option<GuestOutcome> {
    Some(match event {
        VmEvent::Guest(_, GuestEvent::PowerOff)
        | VmEvent::Vcpu(
            _,
            vcpu::VcpuReport {
                stop: VcpuStop::PowerOff,
                ..
            },
        ) => GuestOutcome::PowerOff,
        VmEvent::Guest(_, GuestEvent::Reset)
        | VmEvent::Vcpu(
            _,
            vcpu::VcpuReport {
                stop: VcpuStop::Reset,
                ..
            },
        ) => GuestOutcome::Reset,
        VmEvent::Guest(_, GuestEvent::Panic)
        | VmEvent::Vcpu(
            _,
            vcpu::VcpuReport {
                stop: VcpuStop::Crash,
                ..
            },
        ) => GuestOutcome::Panic,
        VmEvent::Vcpu(
            _,
            vcpu::VcpuReport {
                stop: VcpuStop::Failed(why),
                ..
            },
        ) => GuestOutcome::Failed(why.clone()),
        VmEvent::DeviceFailed(_, f) => GuestOutcome::Failed(f.to_string()),
        VmEvent::Quit
        | VmEvent::Api(_)
        | VmEvent::AwaitPowerOff(_)
        | VmEvent::LayersRecorded(_) => return None,
    })
}

/// Validates `config`, then boots and runs the VM until it powers off, panics or fails.
pub fn run(config: &VmConfig) -> Result<Outcome, RunError> {
    launch(config, Launch::Boot)
}

/// Like [`run`], but the VM starts as a standard checkpoint left it (`strata restore`): one of
/// the store at the configuration's checkpoint location, or an export folder.
pub fn restore(config: &VmConfig, from: &crate::cli::RestoreFrom) -> Result<Outcome, RunError> {
    launch(config, Launch::Restore(from))
}

/// How [`launch`] starts the VM.
enum Launch<'a> {
    /// A cold boot from the (active) disks.
    Boot,
    /// From a checkpoint.
    Restore(&'a crate::cli::RestoreFrom),
}

fn launch(config: &VmConfig, how: Launch<'_>) -> Result<Outcome, RunError> {
    config.validate(crate::config::host_memory_mib())?;
    vcpu::install_kick_handler().map_err(RunError::Signal)?;
    let platform = Platform::new(console::output(&config.console)?)?;
    let (events, event_rx) = mpsc::channel();

    // Raw mode lasts until this function returns, whatever the outcome.
    let _terminal = match config.console {
        ConsoleConfig::Stdio => {
            let raw = RawTerminal::stdin();
            let quit_tx = events.clone();
            console::spawn_stdin(
                devices::legacy::SerialInput::new(platform.serial()),
                raw.is_some(),
                Box::new(move || {
                    let _ = quit_tx.send(VmEvent::Quit);
                }),
            )?;
            raw
        }
        _ => None,
    };

    // The server lives as long as this function: dropping it removes the socket.
    let _server = match &config.api_socket {
        Some(path) => Some(crate::sandbox::start_api_server(
            path,
            crate::api_handler::handler(events.clone()),
        )?),
        None => None,
    };
    let mut machine = Machine::new(platform, config.clone(), events);
    // The checkpoint location given at start (`--state-dir`, or the one a restore uses) is
    // created if it does not exist yet.
    if let Some(location) = &machine.checkpoint_config.location {
        std::fs::create_dir_all(location).map_err(|source| RunError::StateDir {
            path: location.into(),
            source,
        })?;
    }
    match how {
        Launch::Boot => {
            // With a checkpoint location, the VM boots from its active layers.
            if machine.checkpoint_config.location.is_some() {
                machine.store().map_err(RunError::Checkpoint)?;
            }
            machine.start().map_err(boot_error)?;
        }
        Launch::Restore(crate::cli::RestoreFrom::Store { id, .. }) => {
            machine.apply_checkpoint(id).map_err(RunError::Checkpoint)?;
        }
        Launch::Restore(crate::cli::RestoreFrom::Export { dir, .. }) => {
            machine.apply_export(dir).map_err(RunError::Checkpoint)?;
        }
    }
    control_loop(&mut machine, &event_rx)
}

fn boot_error(e: LifecycleError) -> RunError {
    match e {
        LifecycleError::Boot(e) => RunError::Vm(e),
        LifecycleError::Vcpu(e) => RunError::Vcpu(e),
        LifecycleError::WrongState(w) => RunError::GuestFailed(w.to_string()),
        LifecycleError::Pause(e) => RunError::GuestFailed(e.to_string()),
    }
}

/// How long a guest asked to shut down may take before the caller is told it did not.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Shutdown calls waiting for the VM to be off, with their deadline and the generation of the
/// VM they asked.
#[derive(Default)]
struct PendingShutdowns(Vec<(api::Responder, Instant, u64)>);

impl PendingShutdowns {
    /// How long the loop may block before the next deadline.
    fn wait(&self) -> Option<Duration> {
        self.0
            .iter()
            .map(|(_, deadline, _)| deadline.saturating_duration_since(Instant::now()))
            .min()
    }

    /// Answers the calls whose VM is off now or was replaced (a reboot, an applied checkpoint),
    /// and
    /// those whose time ran out.
    fn settle(&mut self, machine: &Machine) {
        let now = Instant::now();
        let off = machine.state() == VmState::Off;
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.0)
                .into_iter()
                .partition(|(_, deadline, generation)| {
                    off || *deadline <= now || *generation != machine.generation
                });
        self.0 = waiting;
        for (reply, _, generation) in done {
            if off {
                reply.send(Ok(api::ApiReply::Vm(crate::api_handler::vm_info(machine))));
            } else if generation != machine.generation {
                reply.send(Err(api::ApiError::invalid_state(
                    "the VM asked to shut down was replaced before it powered off (it rebooted, \
                     or a checkpoint was applied); the VM that runs now was not asked",
                )));
            } else {
                reply.send(Err(api::ApiError::agent_unreachable(format!(
                    "the guest was asked to shut down but is still running after {}s",
                    SHUTDOWN_TIMEOUT.as_secs()
                ))));
            }
        }
    }
}

/// How often folds held back by an export are looked at again.
const FOLD_RECHECK: Duration = Duration::from_millis(200);

/// Applies events until the run ends.
fn control_loop(machine: &mut Machine, events: &Receiver<VmEvent>) -> Result<Outcome, RunError> {
    let mut shutdowns = PendingShutdowns::default();
    loop {
        // Folds a delete left run a step at a time whenever no event waits; held back by an
        // export, they are looked at again every FOLD_RECHECK.
        let event = if machine.folds_runnable() {
            match events.try_recv() {
                Ok(event) => event,
                Err(TryRecvError::Empty) => {
                    machine.fold_step();
                    shutdowns.settle(machine);
                    continue;
                }
                Err(TryRecvError::Disconnected) => return Ok(Outcome::Quit),
            }
        } else {
            let wait = match (shutdowns.wait(), machine.folds_pending()) {
                (Some(w), true) => Some(w.min(FOLD_RECHECK)),
                (None, true) => Some(FOLD_RECHECK),
                (w, false) => w,
            };
            // The machine holds a sender, so the channel never disconnects while it lives.
            match wait {
                Some(wait) => match events.recv_timeout(wait) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => {
                        shutdowns.settle(machine);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(Outcome::Quit),
                },
                None => match events.recv() {
                    Ok(event) => event,
                    Err(_) => return Ok(Outcome::Quit),
                },
            }
        };
        if let Some(outcome) = handle(machine, &mut shutdowns, event)? {
            return Ok(outcome);
        }
    }
}

/// Applies one event; `Some` when the run ends with it.
fn handle(
    machine: &mut Machine,
    shutdowns: &mut PendingShutdowns,
    event: VmEvent,
) -> Result<Option<Outcome>, RunError> {
    let event = match event {
        VmEvent::Api(call) => {
            crate::api_handler::answer(machine, call);
            shutdowns.settle(machine);
            return Ok(None);
        }
        VmEvent::LayersRecorded(generation) => {
            if generation == machine.generation {
                if let Err(e) = machine.settle_held() {
                    log::error!("{}", crate::error_line(&e));
                }
            }
            return Ok(None);
        }
        VmEvent::AwaitPowerOff(reply) => {
            shutdowns
                .0
                .push((reply, Instant::now() + SHUTDOWN_TIMEOUT, machine.generation));
            shutdowns.settle(machine);
            return Ok(None);
        }
        other => other,
    };
    // Events of a VM that is gone (a second vCPU reporting the same reset, a device event
    // racing a stop, anything the VM sent before an apply replaced it) are stale.
    if event
        .generation()
        .is_some_and(|g| g != machine.generation || machine.state() == VmState::Off)
    {
        return Ok(None);
    }
    let Some(outcome) = classify(&event) else {
        machine.halt("quit");
        return Ok(Some(Outcome::Quit));
    };
    // With an API socket the VMM outlives its guest: it waits, off, for the next call.
    let stays_up = machine.config().api_socket.is_some();
    match outcome {
        GuestOutcome::PowerOff => {
            machine.halt("poweroff");
            if !stays_up {
                return Ok(Some(Outcome::PowerOff));
            }
        }
        GuestOutcome::Reset if !machine.config().reboot => {
            machine.halt("reset");
            if !stays_up {
                return Ok(Some(Outcome::Reset));
            }
        }
        GuestOutcome::Reset => {
            log::info!("guest reset: rebooting");
            machine.halt("reset");
            machine.platform().reset_serial();
            machine.start().map_err(boot_error)?;
        }
        GuestOutcome::Panic => {
            machine.halt("panic");
            if !stays_up {
                return Err(RunError::GuestPanic);
            }
            log::error!("the guest panicked; the VM is off");
        }
        GuestOutcome::Failed(why) => {
            machine.halt(&format!("error: {why}"));
            if !stays_up {
                return Err(RunError::GuestFailed(why));
            }
            log::error!("the guest stopped: {why}; the VM is off");
        }
    }
    shutdowns.settle(machine);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_device_thread_stops_the_vm_with_its_reason() {
        let event = VmEvent::DeviceFailed(
            0,
            devices::virtio::DeviceFailure {
                device: "virtio-blk0".into(),
                reason: "it panicked: boom".into(),
            },
        );
        assert_eq!(
            classify(&event),
            Some(GuestOutcome::Failed(
                "device virtio-blk0 stopped: it panicked: boom".into()
            ))
        );
    }
}
