//! Virtio devices (virtio 1.x, "modern" only) and their MMIO transport.
//!
//! A device is split the usual way:
//! - [`mmio::MmioTransport`] is what the guest's driver talks to on the MMIO bus (virtio spec
//!   1.2, section 4.2.2, register layout version 2): feature negotiation, queue set-up, status,
//!   interrupt status/acknowledge and the device-specific config space;
//! - a [`VirtioDevice`] implements the device type (block, vsock): its features, its config
//!   space, and what it does with its queues once the driver sets DRIVER_OK;
//! - [`queue::VirtQueue`] is the one queue-service helper every device uses: it pops chains
//!   with the checks the guest's ring needs (avail index, head index, chain walk, addresses,
//!   the device's limits), bounds the work done per wakeup and reports a broken ring as a
//!   [`queue::QueueError`];
//! - [`EventLoop`] is the device's own thread.
//!
//! # Threads and who owns what
//!
//! - **vCPU threads** only touch the transport (behind the MMIO bus's mutex). Every register
//!   read is answered from state the transport owns: its own registers, the device's identity
//!   and features and its config space, all copied once when the transport is created (no
//!   device config space of ours changes at run time), and the [`Interrupt`]'s atomics. A vCPU
//!   never takes the device's mutex and never waits for the device thread: a queue
//!   notification is an eventfd the VMM registers as a KVM ioeventfd (or that the transport
//!   signals); DRIVER_OK and reset are posted to the device thread through its [`Mailbox`].
//! - **Queue ownership.** Until DRIVER_OK the transport owns each queue's *configuration*
//!   (size, ring addresses, ready). At DRIVER_OK it validates them and *moves* the queues into
//!   an [`Activation`] posted to the device thread; from then on the device thread alone owns
//!   the live queues (next avail, next used, event index) and the transport keeps none. On
//!   reset the device thread drops them and the transport starts again from fresh queues, as
//!   the spec's reset requires. A save (the VM is paused) asks the device for its live queues
//!   ([`VirtioDevice::queue_states`]); a restore posts them to the device thread as an
//!   activation.
//! - **Reset is asynchronous**, as virtio 1.2 (4.2.2.1, 2.4) allows: a write of 0 to Status
//!   posts a reset; Status keeps reading its old value until the device thread has stopped
//!   using the rings, then reads 0. The vCPU never waits; a driver waits for the 0 (Linux's
//!   and the test guest's do). Writes other than 0 to Status are ignored meanwhile.
//! - **The device thread** ([`EventLoop`]) runs the device's event subscriber: queue
//!   eventfds, the mailbox, and whatever else the device watches (vsock: its host sockets). All
//!   guest memory and ring accesses of a device happen there. It can be **paused**
//!   ([`EventLoop::pause`] returns once the device finished the event it was serving; the
//!   thread then touches neither guest memory nor rings nor host sockets until
//!   [`EventLoop::resume`]) and it reports its own death (an event-manager error or a panic)
//!   through a [`FailureSink`]; the VMM stops the VM with that reason.
//! - **A broken queue** (the guest published an avail index more than a queue size ahead, a
//!   head index past the queue, a descriptor chain that loops or leaves guest memory, a
//!   descriptor beyond the device's advertised limits) makes the device stop serving and set
//!   DEVICE_NEEDS_RESET with a configuration-change interrupt (virtio 1.2, 2.1.1 and 2.1.2)
//!   through [`Interrupt::set_needs_reset`]. It stays that way until the driver resets the
//!   device. Nothing spins: each wakeup serves at most a queue's size of chains, and a device
//!   that has more work signals itself to come back after the other events.

pub mod block;
mod event_loop;
pub mod mmio;
pub mod queue;
pub mod vsock;

pub use event_loop::{DeviceFailure, EventLoop, FailureSink, LoopError};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// VIRTIO_F_VERSION_1: the device is modern (virtio 1.x).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the MMIO InterruptStatus register plus the irqfd behind it, and the
/// DEVICE_NEEDS_RESET bit the device thread sets for the transport's Status register.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt that signals `irq`.
    pub fn new(irq: EventFd) -> Arc<Self> {
        Arc::new(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// The device cannot go on: DEVICE_NEEDS_RESET is set in Status and the driver gets a
    /// configuration-change interrupt (virtio 1.2, 2.1.2). Only the first call interrupts.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.trigger(INT_CONFIG);
        }
    }

    /// Whether the device asked to be reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The device was reset: no interrupt pending, no reset needed.
    pub(crate) fn clear(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
    }

    /// Restores InterruptStatus and the needs-reset bit (snapshot restore).
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// The eventfd the VMM registers as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.irq
    }
}

/// What a device needs to start serving: posted by the transport at DRIVER_OK (or by a restore).
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues, configured by the driver; from now on the device thread owns them.
    pub queues: Vec<Queue>,
    /// The negotiated features.
    pub features: u64,
}

/// A request from the transport to the device thread.
enum Command {
    Activate(Activation),
    Reset(u64),
}

/// How the transport (on a vCPU thread) hands work to the device thread without waiting for it:
/// a short queue of commands behind a mutex that is only ever held to push or take, and an
/// eventfd that wakes the device's [`EventLoop`]. The transport never has more than a reset and
/// an activation outstanding (it refuses to re-initialise a device whose reset is pending), so
/// the queue is bounded.
pub struct Mailbox {
    commands: Mutex<VecDeque<Command>>,
    evt: EventFd,
    /// The last reset generation the device thread finished.
    reset_done: AtomicU64,
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            commands: Mutex::new(VecDeque::new()),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reset_done: AtomicU64::new(0),
        }))
    }

    fn post(&self, c: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(c);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio: cannot wake the device thread: {e}");
        }
    }

    /// Asks the device thread to start serving.
    pub(crate) fn activate(&self, a: Activation) {
        self.post(Command::Activate(a));
    }

    /// Asks the device thread to reset; [`Mailbox::reset_done`] reaches `generation` when it
    /// has.
    pub(crate) fn reset(&self, generation: u64) {
        self.post(Command::Reset(generation));
    }

    /// The last reset generation the device thread finished.
    pub(crate) fn reset_done(&self) -> u64 {
        self.reset_done.load(Ordering::SeqCst)
    }

    /// The eventfd the device thread watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// On the device thread: carries out what the transport asked, in order.
    pub fn deliver(&self, device: &mut dyn VirtioDevice) {
        let _ = self.evt.read();
        loop {
            let next = self
                .commands
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            match next {
                None => return,
                Some(Command::Reset(generation)) => {
                    device.reset();
                    self.reset_done.store(generation, Ordering::SeqCst);
                }
                Some(Command::Activate(a)) => {
                    let interrupt = a.interrupt.clone();
                    if let Err(e) = device.activate(a.mem, a.interrupt, a.queues, a.features) {
                        log::warn!("virtio: activation failed: {e}");
                        interrupt.set_needs_reset();
                    }
                }
            }
        }
    }
}

/// Errors a device reports when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up the queues the device needs.
    #[error("queue {0} is not ready or not valid")]
    BadQueue(usize),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// What a device type implements; the transport does the rest.
///
/// The transport calls only the first four methods, once, when it is created. `activate`,
/// `reset` and `queue_states` run on the device thread (through the [`Mailbox`]), or, for
/// tests and snapshots, wherever the caller has made sure the device thread is not running.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific config space. It is fixed for the device's life: the transport
    /// answers reads from a copy, and writes to it are ignored.
    fn config_space(&self) -> Vec<u8>;
    /// The driver set DRIVER_OK: start serving `queues` with the negotiated `features`. Must
    /// not serve the queues itself: it signals its own queue eventfds so that requests queued
    /// before DRIVER_OK are served by the event loop.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using the queues and guest memory.
    fn reset(&mut self);
    /// The live queues' state (empty when not active), for a snapshot.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
}

/// Writes `value`'s little-endian bytes at `offset` of a config space into `data`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, out) in data.iter_mut().enumerate() {
        *out = start
            .checked_add(i)
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}
