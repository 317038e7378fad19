//! vCPU threads.
//!
//! Each vCPU runs on its own thread as a small state machine — `Running`, `Paused`, `Stopped`
//! (it reported a stop), `Exited` — driven by [`VcpuRequest`]s on a channel. Every request gets
//! exactly one [`VcpuReply`] on the vCPU's reply channel, tagged with the request's sequence
//! number so that a late reply to a request whose wait timed out is never taken for the answer
//! to a later one. [`ask_all`] asks every vCPU at once (all are kicked before any reply is
//! awaited) and collects the replies against one deadline. KVM vCPU ioctls (saving and
//! restoring state included) run on the vCPU's own thread, as the KVM API asks. To get a vCPU's attention while it is inside
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::vstate::vcpu::{StateCaps, VcpuState};

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

/// What the VMM can ask of a vCPU thread. Every request gets exactly one [`VcpuReply`].
#[derive(Debug)]
pub enum VcpuRequest {
    /// Stop running the guest until `Resume`; answered once the vCPU is out of the guest with
    /// its state committed.
    Pause,
    /// Run the guest again.
    Resume,
    /// Save the vCPU's KVM state (only while paused).
    SaveState,
    /// Put this state onto the vCPU (only while paused, before it first runs).
    RestoreState(Box<VcpuState>),
    /// End the thread (answered just before it ends).
    Exit,
}

impl VcpuRequest {
    fn name(&self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SaveState => "save state",
            Self::RestoreState(_) => "restore state",
            Self::Exit => "exit",
        }
    }
}

/// A vCPU thread's answer to a [`VcpuRequest`].
#[derive(Debug)]
pub enum VcpuReply {
    /// The vCPU is paused, its state committed.
    Paused,
    /// The vCPU runs again.
    Resumed,
    /// The saved state.
    State(Box<VcpuState>),
    /// The state was restored.
    Restored,
    /// The thread is ending.
    Exiting,
    /// The request could not be carried out; the vCPU is in the state it was in before.
    Failed(String),
}

/// A request with the number that pairs it with its reply.
struct Envelope {
    seq: u64,
    request: VcpuRequest,
}

/// A reply to request `seq`.
struct Answer {
    seq: u64,
    reply: VcpuReply,
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

/// How a vCPU thread starts.
pub struct VcpuSetup {
    /// Its index (and APIC id).
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// The port bus.
    pub pio: Bus,
    /// The MMIO bus.
    pub mmio: Bus,
    /// Where it reports stops.
    pub reports: ReportSink,
    /// What this KVM can save and restore.
    pub caps: Arc<StateCaps>,
    /// Start paused (a restore puts state on it first) instead of running the guest.
    pub start_paused: bool,
}

/// The VMM's handle on a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    requests: Sender<Envelope>,
    replies: Receiver<Answer>,
    next_seq: AtomicU64,
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
    /// The thread answered that it could not do what was asked.
    #[error("vCPU {index} could not {request}: {reason}")]
    Refused {
        /// Which vCPU.
        index: u8,
        /// What was asked.
        request: &'static str,
        /// Why not.
        reason: String,
    },
    /// The thread answered something else than the request calls for (a bug).
    #[error("vCPU {index} answered {reply} to {request}")]
    Unexpected {
        /// Which vCPU.
        index: u8,
        /// What was asked.
        request: &'static str,
        /// The reply.
        reply: String,
    },
}

impl VcpuError {
    /// The vCPU the error is about.
    pub fn index(&self) -> u8 {
        match self {
            Self::Spawn(i, _) | Self::Gone(i) | Self::Timeout(i, _) => *i,
            Self::Refused { index, .. } | Self::Unexpected { index, .. } => *index,
        }
    }
}

/// How long a vCPU may take to answer a request. A vCPU out of the guest answers in
/// microseconds, one in the guest as soon as the kick lands; this only catches a thread that
/// is stuck (in a device, in the kernel) so that the VMM can report it instead of hanging.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(20);

/// A ticket for a reply: which vCPU, which request.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    seq: u64,
    request: &'static str,
    asked: Instant,
}

impl VcpuHandle {
    /// Starts a vCPU thread; stops are reported to `setup.reports`.
    pub fn spawn(setup: VcpuSetup) -> Result<Self, VcpuError> {
        let index = setup.index;
        let (requests, request_rx) = mpsc::channel();
        let (reply_tx, replies) = mpsc::channel();
        let vcpu = Vcpu {
            index,
            fd: setup.fd,
            pio: setup.pio,
            mmio: setup.mmio,
            caps: setup.caps,
            requests: request_rx,
            replies: reply_tx,
            reports: setup.reports,
        };
        let start = if setup.start_paused {
            State::Paused
        } else {
            State::Running
        };
        let thread = crate::sandbox::spawn_vcpu(format!("vcpu{index}"), move || vcpu.run(start))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(Self {
            index,
            requests,
            replies,
            next_seq: AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends a request and kicks the thread out of the guest; the reply comes through
    /// [`Self::reply`] with the returned ticket.
    pub fn ask(&self, request: VcpuRequest) -> Result<Pending, VcpuError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let name = request.name();
        self.requests
            .send(Envelope { seq, request })
            .map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // The thread may already have exited; then there is nothing to kick.
            let _ = t.kill(kick_signal());
        }
        Ok(Pending {
            seq,
            request: name,
            asked: Instant::now(),
        })
    }

    /// Waits until `deadline` for the reply to `pending`; replies to earlier requests (ones
    /// whose wait timed out) are dropped. A `Failed` reply becomes [`VcpuError::Refused`].
    pub fn reply(&self, pending: Pending, deadline: Instant) -> Result<VcpuReply, VcpuError> {
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(wait) {
                Ok(Answer { seq, .. }) if seq < pending.seq => continue,
                Ok(Answer {
                    reply: VcpuReply::Failed(reason),
                    ..
                }) => {
                    return Err(VcpuError::Refused {
                        index: self.index,
                        request: pending.request,
                        reason,
                    })
                }
                Ok(Answer { reply, .. }) => return Ok(reply),
                Err(RecvTimeoutError::Timeout) => {
                    let waited = deadline.saturating_duration_since(pending.asked);
                    return Err(VcpuError::Timeout(self.index, waited));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.index)),
            }
        }
    }

    /// Ends the thread and waits for it.
    pub fn exit(mut self) {
        let _ = self.ask(VcpuRequest::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

/// Sends each vCPU the request `make` builds for it — all of them first, kicking each — then
/// collects every reply (each within [`REPLY_DEADLINE`] of the sending). The results are in
/// vCPU order.
pub fn ask_all(
    vcpus: &[VcpuHandle],
    make: impl FnMut(usize) -> VcpuRequest,
) -> Vec<Result<VcpuReply, VcpuError>> {
    ask_all_within(vcpus, make, REPLY_DEADLINE)
}

/// [`ask_all`] with replies awaited for `within` instead of [`REPLY_DEADLINE`].
pub fn ask_all_within(
    vcpus: &[VcpuHandle],
    mut make: impl FnMut(usize) -> VcpuRequest,
    within: Duration,
) -> Vec<Result<VcpuReply, VcpuError>> {
    let sent: Vec<_> = vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| v.ask(make(i)))
        .collect();
    let deadline = Instant::now() + within;
    vcpus
        .iter()
        .zip(sent)
        .map(|(v, sent)| sent.and_then(|p| v.reply(p, deadline)))
        .collect()
}

/// Pauses every vCPU — all are asked at once, then every reply is awaited for `within` — and
/// returns once all are out of the guest with their state committed.
///
/// A pause that cannot complete (a vCPU does not answer in time, for instance because its
/// thread is stuck in a device access; its thread is gone; it refuses) asks every vCPU to run
/// again — the one that failed too, so that one that answers late runs on instead of staying
/// parked — and returns the first failure, naming the vCPU and why: the vCPUs are never left
/// half paused.
pub fn pause_all(vcpus: &[VcpuHandle], within: Duration) -> Result<(), VcpuError> {
    let replies = ask_all_within(vcpus, |_| VcpuRequest::Pause, within);
    let mut failure = None;
    for (v, reply) in vcpus.iter().zip(replies) {
        let r = expect_reply(v.index(), "pause", reply, |r| match r {
            VcpuReply::Paused => Ok(()),
            other => Err(other),
        });
        if let (Err(e), None) = (r, &failure) {
            failure = Some(e);
        }
    }
    match failure {
        None => Ok(()),
        Some(e) => {
            resume_all_after_failure(vcpus, within, "undoing a pause");
            Err(e)
        }
    }
}

/// Asks every vCPU to run again after a failed pause (or before pausing devices failed);
/// what goes wrong is logged, prefixed with `context`.
pub fn resume_all_after_failure(vcpus: &[VcpuHandle], within: Duration, context: &str) {
    let replies = ask_all_within(vcpus, |_| VcpuRequest::Resume, within);
    for (v, reply) in vcpus.iter().zip(replies) {
        if let Err(e) = reply {
            log::warn!("{context}: vCPU {}: {e}", v.index());
        }
    }
}

/// Checks that a reply is the one `want` picks out; anything else is [`VcpuError::Unexpected`].
pub fn expect_reply<T>(
    index: u8,
    request: &'static str,
    reply: Result<VcpuReply, VcpuError>,
    want: impl FnOnce(VcpuReply) -> Result<T, VcpuReply>,
) -> Result<T, VcpuError> {
    want(reply?).map_err(|other| VcpuError::Unexpected {
        index,
        request,
        reply: format!("{other:?}"),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    /// The vCPU reported a stop and never enters the guest again.
    Stopped,
    Exited,
}

struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    caps: Arc<StateCaps>,
    requests: Receiver<Envelope>,
    replies: Sender<Answer>,
    reports: ReportSink,
}

impl Vcpu {
    fn run(mut self, start: State) {
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut state = start;
        loop {
            state = match state {
                State::Running => self.running(),
                State::Paused | State::Stopped => self.parked(state),
                State::Exited => break,
            };
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    fn answer(&self, seq: u64, reply: VcpuReply) {
        // The VMM may have stopped waiting (it dropped the handle); nothing to do then.
        let _ = self.replies.send(Answer { seq, reply });
    }

    /// Carries out a request in `state`; returns the state to go on in.
    fn handle(&mut self, state: State, Envelope { seq, request }: Envelope) -> State {
        let (next, reply) = match (request, state) {
            (VcpuRequest::Exit, _) => (State::Exited, VcpuReply::Exiting),
            (VcpuRequest::Pause, State::Running) => {
                self.complete_pending_io();
                // Tell the guest's kvmclock it was stopped on purpose, so that it does not
                // report soft lockups (KVM API, KVM_KVMCLOCK_CTRL). Fails harmlessly when the
                // guest does not use kvmclock.
                let _ = self.fd.kvmclock_ctrl();
                (State::Paused, VcpuReply::Paused)
            }
            (VcpuRequest::Pause, s) => (s, VcpuReply::Paused),
            (VcpuRequest::Resume, State::Stopped) => (State::Stopped, VcpuReply::Resumed),
            (VcpuRequest::Resume, _) => (State::Running, VcpuReply::Resumed),
            (VcpuRequest::SaveState, State::Running) => (
                State::Running,
                VcpuReply::Failed("it is running; pause it first".into()),
            ),
            (VcpuRequest::SaveState, s) => (
                s,
                match crate::vstate::vcpu::save(&self.fd, &self.caps) {
                    Ok(st) => VcpuReply::State(Box::new(st)),
                    Err(e) => VcpuReply::Failed(error_chain(&e)),
                },
            ),
            (VcpuRequest::RestoreState(_), State::Running) => (
                State::Running,
                VcpuReply::Failed("it is running; pause it first".into()),
            ),
            (VcpuRequest::RestoreState(st), s) => (
                s,
                match crate::vstate::vcpu::restore(&self.fd, &st, &self.caps) {
                    Ok(()) => VcpuReply::Restored,
                    Err(e) => VcpuReply::Failed(error_chain(&e)),
                },
            ),
        };
        self.answer(seq, reply);
        next
    }

    fn running(&mut self) -> State {
        loop {
            match self.requests.try_recv() {
                Ok(envelope) => {
                    let next = self.handle(State::Running, envelope);
                    if next != State::Running {
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
                return State::Stopped;
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

    /// Paused, or stopped after reporting a stop (then it never enters the guest again): waits
    /// for requests, answering each.
    fn parked(&mut self, mut state: State) -> State {
        loop {
            let Ok(envelope) = self.requests.recv() else {
                return State::Exited;
            };
            let next = self.handle(state, envelope);
            if next == State::Running || next == State::Exited {
                return next;
            }
            state = next;
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

/// An error and its sources, for a reply.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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

    /// Two vCPU threads on a fresh VM, started paused (they never run guest code).
    fn paused_vcpus(vm: &kvm_ioctls::VmFd, n: u8) -> Vec<VcpuHandle> {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let caps = StateCaps::get(&kvm, &cpuid).unwrap();
        (0..n)
            .map(|index| {
                let fd = vm.create_vcpu(u64::from(index)).unwrap();
                fd.set_cpuid2(&cpuid).unwrap();
                VcpuHandle::spawn(VcpuSetup {
                    index,
                    fd,
                    pio: Bus::new(),
                    mmio: Bus::new(),
                    reports: Arc::new(|_| {}),
                    caps: caps.clone(),
                    start_paused: true,
                })
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn every_vcpu_answers_and_a_gone_one_is_named() {
        install_kick_handler().unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mut vcpus = paused_vcpus(&vm, 2);
        let gone = vcpus.pop().unwrap();
        let ticket = gone.ask(VcpuRequest::Exit).unwrap();
        let exiting = gone.reply(ticket, Instant::now() + REPLY_DEADLINE);
        vcpus.push(gone);

        let paused = ask_all(&vcpus, |_| VcpuRequest::Pause);
        let saved = ask_all(&vcpus[..1], |_| VcpuRequest::SaveState);

        assert!(matches!(exiting, Ok(VcpuReply::Exiting)));
        assert!(matches!(paused[0], Ok(VcpuReply::Paused)));
        assert!(matches!(paused[1], Err(VcpuError::Gone(1))));
        assert!(matches!(saved[0], Ok(VcpuReply::State(_))));
        for v in vcpus {
            v.exit();
        }
    }

    /// A port whose first read blocks until the test releases it (a vCPU stuck in a device
    /// access); it tells the test when a vCPU is inside.
    struct StuckPort {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }
    impl BusDevice for StuckPort {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            let _ = self.entered.send(());
            // Returns at once once the test dropped its sender.
            let _ = self.release.recv();
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn a_pause_a_vcpu_never_answers_resumes_the_others_and_names_it() {
        install_kick_handler().unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let caps = StateCaps::get(&kvm, &cpuid).unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let memory = crate::memory::create(16 << 20).unwrap();
        let host = memory.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 16 << 20,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `memory` is one 16 MiB mapping that outlives the VM (it is declared before
        // the vCPUs, which are joined before the end of the test).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        // vCPU 0 at 1 MiB: `in al, 0x80` (stuck in the port), then `hlt` forever.
        let entry = GuestAddress(0x10_0000);
        memory
            .write_slice(&[0xe4, 0x80, 0xf4, 0xeb, 0xfd], entry)
            .unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let mut pio = Bus::new();
        let port = StuckPort {
            entered: entered_tx,
            release: release_rx,
        };
        pio.insert(Arc::new(Mutex::new(port)), 0x80, 1).unwrap();
        // vCPU 1 is an AP that waits for a SIPI in KVM_RUN: it answers as soon as kicked.
        let vcpus: Vec<VcpuHandle> = (0..2u8)
            .map(|index| {
                let fd = vm.create_vcpu(u64::from(index)).unwrap();
                fd.set_cpuid2(&cpuid).unwrap();
                if index == 0 {
                    crate::arch::regs::setup_boot_vcpu(&fd, &memory, entry).unwrap();
                }
                VcpuHandle::spawn(VcpuSetup {
                    index,
                    fd,
                    pio: pio.clone(),
                    mmio: Bus::new(),
                    reports: Arc::new(|r| panic!("vCPU stopped: {r:?}")),
                    caps: caps.clone(),
                    start_paused: false,
                })
                .unwrap()
            })
            .collect();
        // Hang guard only.
        entered
            .recv_timeout(Duration::from_secs(120))
            .expect("vCPU 0 never reached the port");
        let is_running = |v: &VcpuHandle| {
            let ticket = v.ask(VcpuRequest::SaveState).unwrap();
            matches!(
                v.reply(ticket, Instant::now() + REPLY_DEADLINE),
                Err(VcpuError::Refused { .. })
            )
        };

        let failed = pause_all(&vcpus, Duration::from_secs(2));
        let others_run = is_running(&vcpus[1]);
        drop(release);
        // The stuck vCPU takes the late pause and the resume in order: it runs on too.
        let stuck_runs_on = is_running(&vcpus[0]);
        let paused = pause_all(&vcpus, REPLY_DEADLINE);
        let saved = ask_all(&vcpus, |_| VcpuRequest::SaveState);
        for v in vcpus {
            v.exit();
        }

        match failed {
            Err(VcpuError::Timeout(0, waited)) => assert!(waited >= Duration::from_secs(2)),
            other => panic!("the pause did not name vCPU 0: {other:?}"),
        }
        assert!(others_run, "vCPU 1 was left paused");
        assert!(stuck_runs_on, "vCPU 0 was left paused");
        paused.unwrap();
        assert!(saved.iter().all(|r| matches!(r, Ok(VcpuReply::State(_)))));
    }

    #[test]
    fn a_late_reply_is_not_taken_for_the_next_one() {
        install_kick_handler().unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpus = paused_vcpus(&vm, 1);
        let v = &vcpus[0];
        // Asked, but never waited for (as after a timeout).
        let _stale = v.ask(VcpuRequest::SaveState).unwrap();

        let ticket = v.ask(VcpuRequest::Pause).unwrap();
        let reply = v.reply(ticket, Instant::now() + REPLY_DEADLINE);

        assert!(matches!(reply, Ok(VcpuReply::Paused)), "{reply:?}");
        for v in vcpus {
            v.exit();
        }
    }
}
