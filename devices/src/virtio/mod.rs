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
//!   never takes the device's mutex: a queue notification is an eventfd the VMM registers as a
//!   KVM ioeventfd (or that the transport signals); DRIVER_OK and reset are posted to the
//!   device thread through its [`Mailbox`]. The one wait is a reset's, bounded (below).
//! - **Queue ownership.** Until DRIVER_OK the transport owns each queue's *configuration*
//!   (size, ring addresses, ready). At DRIVER_OK it validates them and *moves* the queues into
//!   an [`Activation`] posted to the device thread; from then on the device thread alone owns
//!   the live queues (next avail, next used, event index) and the transport keeps none. On
//!   reset the device thread drops them and the transport starts again from fresh queues, as
//!   the spec's reset requires. A save (the VM is paused) asks the device for its live queues
//!   ([`VirtioDevice::queue_states`]); a restore posts them to the device thread as an
//!   activation.
//! - **Reset is synchronous with the Status write whenever the device lets it be**, because
//!   Linux's virtio-mmio driver does not wait for Status to read 0 after writing it (it reads
//!   Status and re-initialises at once; QEMU resets synchronously too). A device that was never
//!   activated since its last reset is reset in the transport at once. Otherwise the transport
//!   resets its own state, posts the reset to the device thread and the vCPU waits, at most
//!   [`mmio::RESET_TIMEOUT`] (250 ms), on the mailbox's condition variable for the device
//!   thread to have reset the device. The device thread looks for a posted reset between
//!   descriptor chains ([`Interrupt::reset_pending`], checked by [`queue::VirtQueue::serve`]),
//!   not only between wakeups, so the wait is at most the one request in hand; that request,
//!   once done, is not put on the used ring (the driver gave it up), and nothing reaches the
//!   rings after the reset. Then Status reads 0 at once.
//! - **A device stuck longer** (a request blocked in its backend), **paused or gone** is not
//!   waited for (longer): the reset stays pending and the vCPU goes on; a warning is logged
//!   once. Until the device thread has done it, Status reads the driver's new bits plus
//!   DEVICE_NEEDS_RESET (never 0, so a driver that follows the spec and waits for 0 waits),
//!   and the driver's writes are applied to the transport's own state as usual (features and
//!   queue configuration belong to the transport anyway): Linux's immediate re-initialisation
//!   goes through, and its DRIVER_OK activation is queued in the mailbox behind the reset, so
//!   the device starts on the new rings only after it let go of the old ones. A reset
//!   supersedes whatever is still queued in the mailbox (it stays bounded, however often a
//!   guest resets a stuck device), and resets while one is pending do not wait again.
//! - **Pause and reset.** The VMM pauses vCPUs before devices, so a paused device is not
//!   normally reset; when it is (a pause being undone, a failed resume), the mailbox knows its
//!   thread is parked and the vCPU does not wait: the reset completes when the thread resumes.
//!   A device thread asked to pause while a vCPU waits on its reset delivers the mailbox
//!   before it parks, so the reset completes and neither waits for the other.
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// A device's line to its transport: the MMIO InterruptStatus register plus the irqfd behind
/// it, the DEVICE_NEEDS_RESET bit the device thread sets for the transport's Status register,
/// and the reset handshake (which reset the transport posted last, which one the device thread
/// has done), which a device serving its queues checks between two descriptor chains
/// ([`Interrupt::reset_pending`]).
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    /// Generation of the last reset the transport posted to the device thread.
    resets_posted: AtomicU64,
    /// Generation of the last reset the device thread has done.
    resets_done: AtomicU64,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt that signals `irq`.
    pub fn new(irq: EventFd) -> Arc<Self> {
        Arc::new(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            resets_posted: AtomicU64::new(0),
            resets_done: AtomicU64::new(0),
            irq,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            crate::rate_limited!(log::Level::Warn, "virtio: cannot raise interrupt: {e}");
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

    /// Whether the driver reset the device and the device thread has not done that reset yet.
    /// A device serving its queues stops between two descriptor chains when this is true and
    /// puts nothing more on its rings ([`queue::VirtQueue::serve`] does both), so that the
    /// reset, which its event loop carries out next, waits for at most the request in hand.
    pub fn reset_pending(&self) -> bool {
        self.resets_done.load(Ordering::SeqCst) < self.resets_posted.load(Ordering::SeqCst)
    }

    /// The transport posts a reset: returns its generation.
    pub(crate) fn post_reset(&self) -> u64 {
        self.resets_posted.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The generation of the last reset the device thread has done.
    pub(crate) fn resets_done(&self) -> u64 {
        self.resets_done.load(Ordering::SeqCst)
    }

    /// On the device thread, once the device stopped using its queues: reset `generation` is
    /// done. InterruptStatus and DEVICE_NEEDS_RESET are cleared here, after anything the
    /// device set before it stopped.
    fn complete_reset(&self, generation: u64) {
        self.clear();
        self.resets_done.fetch_max(generation, Ordering::SeqCst);
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
    Reset {
        generation: u64,
        interrupt: Arc<Interrupt>,
    },
}

/// What the transport and the device thread share in a [`Mailbox`].
struct Inbox {
    commands: VecDeque<Command>,
    /// A device thread is running and not paused: it will take the commands soon.
    serving: bool,
}

/// How the transport (on a vCPU thread) hands work to the device thread: a short queue of
/// commands behind a mutex that is only ever held to push, take or check, an eventfd that
/// wakes the device's [`EventLoop`], and a condition variable on which a vCPU waits, with a
/// bound, for a reset to be done.
///
/// The queue is bounded: a reset supersedes everything still queued (a queued activation would
/// only be undone by it), so it holds at most a reset and the activation that followed it,
/// however often a guest resets a device whose thread is stuck.
pub struct Mailbox {
    inbox: Mutex<Inbox>,
    changed: Condvar,
    evt: EventFd,
}

impl Mailbox {
    /// An empty mailbox, not yet served by a device thread.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inbox: Mutex::new(Inbox {
                commands: VecDeque::new(),
                serving: false,
            }),
            changed: Condvar::new(),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if let Err(e) = self.evt.write(1) {
            crate::rate_limited!(
                log::Level::Warn,
                "virtio: cannot wake the device thread: {e}"
            );
        }
    }

    /// Asks the device thread to start serving.
    pub(crate) fn activate(&self, a: Activation) {
        self.lock().commands.push_back(Command::Activate(a));
        self.wake();
    }

    /// Asks the device thread to do reset `generation` (from [`Interrupt::post_reset`]);
    /// whatever is still queued is superseded by it.
    pub(crate) fn reset(&self, generation: u64, interrupt: Arc<Interrupt>) {
        {
            let mut inbox = self.lock();
            inbox.commands.clear();
            inbox.commands.push_back(Command::Reset {
                generation,
                interrupt,
            });
        }
        self.wake();
    }

    /// On a vCPU thread: waits at most `bound` for the device thread to have done reset
    /// `generation` of `interrupt`. Returns at once, false, when no device thread serves the
    /// mailbox (none started, paused, or gone): it could not do the reset before the bound.
    pub(crate) fn wait_reset(
        &self,
        interrupt: &Interrupt,
        generation: u64,
        bound: Duration,
    ) -> bool {
        let deadline = Instant::now().checked_add(bound);
        let mut inbox = self.lock();
        loop {
            if interrupt.resets_done() >= generation {
                return true;
            }
            if !inbox.serving {
                return false;
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => bound,
            };
            if left.is_zero() {
                return false;
            }
            inbox = self
                .changed
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The device thread starts serving the mailbox (`true`), or parks or ends (`false`);
    /// a vCPU waiting for a reset stops waiting when it cannot be served.
    pub(crate) fn set_serving(&self, serving: bool) {
        self.lock().serving = serving;
        self.changed.notify_all();
    }

    /// The eventfd the device thread watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// On the device thread: carries out what the transport asked, in order.
    pub fn deliver(&self, device: &mut dyn VirtioDevice) {
        let _ = self.evt.read();
        loop {
            let next = self.lock().commands.pop_front();
            match next {
                None => return,
                Some(Command::Reset {
                    generation,
                    interrupt,
                }) => {
                    device.reset();
                    interrupt.complete_reset(generation);
                    // Under the lock: a vCPU that checked the generation is waiting by now.
                    let _inbox = self.lock();
                    self.changed.notify_all();
                }
                Some(Command::Activate(a)) => {
                    let interrupt = a.interrupt.clone();
                    if let Err(e) = device.activate(a.mem, a.interrupt, a.queues, a.features) {
                        crate::rate_limited!(log::Level::Warn, "virtio: activation failed: {e}");
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
    /// The driver reset the device: stop using the queues and guest memory. Runs on the device
    /// thread between two of its events; a device that serves its queues through
    /// [`queue::VirtQueue::serve`] has already stopped between two chains once the reset was
    /// posted ([`Interrupt::reset_pending`]).
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
