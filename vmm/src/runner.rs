//! Runs a VM to its end: boot, wait for what the guest or the user does, reboot on reset.

use std::sync::mpsc;

use devices::GuestEvent;

use crate::config::{ConsoleConfig, VmConfig};
use crate::console::{self, RawTerminal};
use crate::vcpu::{self, VcpuStop};
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
}

/// What the control loop does with an event.
enum Next {
    Reboot,
    End(Result<Outcome, RunError>),
}

fn decide(event: VmEvent, config: &VmConfig) -> Next {
    let reset = || {
        if config.reboot {
            Next::Reboot
        } else {
            Next::End(Ok(Outcome::Reset))
        }
    };
    match event {
        VmEvent::Guest(GuestEvent::PowerOff)
        | VmEvent::Vcpu(vcpu::VcpuReport {
            stop: VcpuStop::PowerOff,
            ..
        }) => Next::End(Ok(Outcome::PowerOff)),
        VmEvent::Guest(GuestEvent::Reset)
        | VmEvent::Vcpu(vcpu::VcpuReport {
            stop: VcpuStop::Reset,
            ..
        }) => reset(),
        VmEvent::Guest(GuestEvent::Panic)
        | VmEvent::Vcpu(vcpu::VcpuReport {
            stop: VcpuStop::Crash,
            ..
        }) => Next::End(Err(RunError::GuestPanic)),
        VmEvent::Vcpu(vcpu::VcpuReport {
            stop: VcpuStop::Failed(why),
            ..
        }) => Next::End(Err(RunError::GuestFailed(why))),
        VmEvent::Quit => Next::End(Ok(Outcome::Quit)),
    }
}

/// Validates `config`, then boots and runs the VM until it powers off, panics or fails.
pub fn run(config: &VmConfig) -> Result<Outcome, RunError> {
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

    loop {
        let vm = Vm::boot(&platform, config, &events)?;
        // `events` is held here, so recv only fails if every sender is gone, which cannot be.
        let Ok(event) = event_rx.recv() else {
            vm.shutdown();
            return Ok(Outcome::Quit);
        };
        vm.shutdown();
        match decide(event, config) {
            Next::End(result) => return result,
            Next::Reboot => {
                log::info!("guest reset: rebooting");
                // Drop what the old VM said after the event that ended it.
                while event_rx.try_recv().is_ok() {}
                platform.reset_serial();
            }
        }
    }
}
