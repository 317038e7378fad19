//! vCPU threads.
//!
//! Each vCPU runs on its own thread as a small state machine — `Running`, `Paused`, `Exited` —
//! driven by [`VcpuCommand`]s on a channel. To get a vCPU's attention while it is inside
//! `KVM_RUN`, the VMM sends the thread a real-time signal whose handler sets `immediate_exit`
//! in that vCPU's `kvm_run`: the ioctl returns `EINTR` at once, or, if the signal landed just
//! before the thread entered the guest, does not enter it at all (KVM API, "immediate_exit").
//! Before parking, a vCPU re-enters `KVM_RUN` once with `immediate_exit` set so that a port or
//! MMIO access it just completed is committed to its registers (KVM API, section on KVM_RUN:
//! "userspace can ... complete pending operations without actually running the guest").
//!
//! Every port and MMIO exit goes through [`handle_exit`] and the buses, so exit handling is a
//! plain function that tests can call.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Why a vCPU stopped running the guest on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for power-off through a KVM system event.
    PowerOff,
    /// The guest reset: a triple fault or a KVM reset event.
    Reset,
    /// KVM reported a guest crash.
    Crash,
    /// KVM could not run the guest any more; the text says why.
    Failed(String),
}

/// A message from a vCPU thread to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuReport {
    /// Which vCPU.
    pub index: u8,
    /// What happened.
    pub stop: VcpuStop,
}

/// Where vCPU threads report their stops.
pub type ReportSink = std::sync::Arc<dyn Fn(VcpuReport) + Send + Sync>;

/// What the VMM can ask of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Stop running the guest until `Resume`.
    Pause,
    /// Run the guest again.
    Resume,
    /// End the thread.
    Exit,
}

/// A vCPU thread's acknowledgement of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    /// The vCPU is paused, its state committed.
    Paused,
    /// The vCPU runs again.
    Resumed,
}

/// What to do after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// Stop and tell the VMM.
    Stop(VcpuStop),
}

/// Handles one `KVM_RUN` exit: port and MMIO accesses go to the buses.
pub fn handle_exit(exit: VcpuExit, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                log::trace!("read of unclaimed port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                log::trace!("write to unclaimed port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                log::debug!("read of unclaimed MMIO address {addr:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                log::debug!("write to unclaimed MMIO address {addr:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        VcpuExit::Shutdown => ExitAction::Stop(VcpuStop::Reset),
        VcpuExit::SystemEvent(kind, _) => ExitAction::Stop(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
            KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
            KVM_SYSTEM_EVENT_CRASH => VcpuStop::Crash,
            other => VcpuStop::Failed(format!("unknown KVM system event {other}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(VcpuStop::Failed(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => {
            ExitAction::Stop(VcpuStop::Failed("KVM internal error".to_string()))
        }
        other => ExitAction::Stop(VcpuStop::Failed(format!("unexpected KVM exit {other:?}"))),
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread before
        // it first runs and cleared before the mapping goes away; a single byte store is
        // async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal that kicks vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), kick_handler)
}

/// The VMM's handle on a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    commands: Sender<VcpuCommand>,
    acks: Receiver<VcpuAck>,
    thread: Option<JoinHandle<()>>,
}

/// Errors driving a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be started.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The thread is gone.
    #[error("vCPU {0} is not running")]
    Gone(u8),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
}

/// How long a vCPU may take to acknowledge a command.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread; reports go to `reports`.
    pub fn spawn(
        index: u8,
        fd: VcpuFd,
        pio: Bus,
        mmio: Bus,
        reports: ReportSink,
    ) -> Result<Self, VcpuError> {
        let (commands, command_rx) = mpsc::channel();
        let (ack_tx, acks) = mpsc::channel();
        let vcpu = Vcpu {
            index,
            fd,
            pio,
            mmio,
            commands: command_rx,
            acks: ack_tx,
            reports,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu.run())
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(Self {
            index,
            commands,
            acks,
            thread: Some(thread),
        })
    }

    /// Sends a command and kicks the thread out of the guest.
    pub fn send(&self, command: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(command)
            .map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // The thread may already have exited; then there is nothing to kick.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    /// Waits for the acknowledgement of a command.
    pub fn wait_ack(&self) -> Result<VcpuAck, VcpuError> {
        self.acks.recv_timeout(ACK_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.index, ACK_TIMEOUT),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.index),
        })
    }

    /// Ends the thread and waits for it.
    pub fn exit(mut self) {
        let _ = self.send(VcpuCommand::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

enum State {
    Running,
    Paused,
    Exited,
}

struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    commands: Receiver<VcpuCommand>,
    acks: Sender<VcpuAck>,
    reports: ReportSink,
}

impl Vcpu {
    fn run(mut self) {
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut state = State::Running;
        loop {
            state = match state {
                State::Running => self.running(),
                State::Paused => self.paused(),
                State::Exited => break,
            };
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    /// Applies a command; `None` means keep running.
    fn command(&mut self, command: VcpuCommand) -> Option<State> {
        match command {
            VcpuCommand::Pause => {
                self.complete_pending_io();
                let _ = self.acks.send(VcpuAck::Paused);
                Some(State::Paused)
            }
            VcpuCommand::Resume => {
                let _ = self.acks.send(VcpuAck::Resumed);
                None
            }
            VcpuCommand::Exit => Some(State::Exited),
        }
    }

    fn running(&mut self) -> State {
        loop {
            match self.commands.try_recv() {
                Ok(c) => {
                    if let Some(next) = self.command(c) {
                        return next;
                    }
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return State::Exited,
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.pio, &self.mmio),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitAction::Continue
                }
                Err(e) => ExitAction::Stop(VcpuStop::Failed(format!("KVM_RUN failed: {e}"))),
            };
            self.fd.set_kvm_immediate_exit(0);
            if let ExitAction::Stop(stop) = action {
                let stop = self.describe(stop);
                (self.reports)(VcpuReport {
                    index: self.index,
                    stop,
                });
                return self.stopped();
            }
        }
    }

    /// Adds where the guest was to a failure.
    fn describe(&mut self, stop: VcpuStop) -> VcpuStop {
        match stop {
            VcpuStop::Failed(why) => {
                let run = self.fd.get_kvm_run();
                let detail = if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says the `internal` member of the union is valid.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    format!(" (suberror {})", internal.suberror)
                } else {
                    String::new()
                };
                let rip = self
                    .fd
                    .get_regs()
                    .map(|r| format!(" at RIP {:#x}", r.rip))
                    .unwrap_or_default();
                VcpuStop::Failed(format!("vCPU {}: {why}{detail}{rip}", self.index))
            }
            other => other,
        }
    }

    /// After reporting a stop: wait for the VMM's decision, never entering the guest again.
    fn stopped(&mut self) -> State {
        loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Exit) | Err(_) => return State::Exited,
                Ok(VcpuCommand::Pause) => {
                    let _ = self.acks.send(VcpuAck::Paused);
                }
                Ok(VcpuCommand::Resume) => {
                    let _ = self.acks.send(VcpuAck::Resumed);
                }
            }
        }
    }

    fn paused(&mut self) -> State {
        loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Resume) => {
                    let _ = self.acks.send(VcpuAck::Resumed);
                    return State::Running;
                }
                Ok(VcpuCommand::Pause) => {
                    let _ = self.acks.send(VcpuAck::Paused);
                }
                Ok(VcpuCommand::Exit) | Err(_) => return State::Exited,
            }
        }
    }

    /// Re-enters KVM_RUN with immediate_exit so KVM finishes an in-flight port or MMIO
    /// instruction without running more guest code.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Ok(exit) => {
                log::debug!("vCPU {}: exit while completing I/O: {exit:?}", self.index)
            }
            Err(e) => log::warn!("vCPU {}: completing pending I/O: {e}", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Port(u8);
    impl BusDevice for Port {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn port_exits_go_through_the_bus() {
        let mut pio = Bus::new();
        let port = Arc::new(Mutex::new(Port(0)));
        pio.insert(port.clone(), 0x80, 1).unwrap();
        let mmio = Bus::new();

        let out = handle_exit(VcpuExit::IoOut(0x80, &[0x42]), &pio, &mmio);
        let mut data = [0u8; 1];
        let inn = handle_exit(VcpuExit::IoIn(0x80, &mut data), &pio, &mmio);

        assert_eq!((out, inn), (ExitAction::Continue, ExitAction::Continue));
        assert_eq!(data, [0x42]);
    }

    #[test]
    fn odd_accesses_do_not_stop_the_vcpu() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let mut data = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x1234, &mut data), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff; 4]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1, 2]), &pio, &mmio),
            ExitAction::Continue
        );
    }

    #[test]
    fn guest_power_events_stop_the_vcpu() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &pio, &mmio),
            ExitAction::Stop(VcpuStop::Reset)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &pio,
                &mmio
            ),
            ExitAction::Stop(VcpuStop::PowerOff)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &pio, &mmio),
            ExitAction::Stop(VcpuStop::Failed(_))
        ));
    }
}
