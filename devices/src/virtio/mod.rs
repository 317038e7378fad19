//! Virtio devices (virtio 1.x, "modern" only) and their MMIO transport.
//!
//! A device is split the usual way:
//! - [`mmio::MmioTransport`] is what the guest's driver talks to on the MMIO bus (virtio spec
//!   1.2, section 4.2.2, register layout version 2): feature negotiation, queue set-up, status,
//!   interrupt status/acknowledge and the device-specific config space;
//! - a [`VirtioDevice`] implements the device type (block, vsock): its features, its config
//!   space, and what happens when the driver sets DRIVER_OK (`activate`);
//! - queue work runs on the device's own event loop thread ([`EventLoop`]): the guest's queue
//!   notifications arrive on eventfds that the VMM registers as KVM ioeventfds, and used-buffer
//!   notifications leave through an [`Interrupt`] whose eventfd is a KVM irqfd. No queue work
//!   happens on a vCPU thread.

pub mod block;
mod event_loop;
pub mod mmio;
pub mod vsock;

pub use event_loop::EventLoop;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

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

/// A device's interrupt line: the MMIO InterruptStatus register plus the irqfd behind it.
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt that signals `irq`.
    pub fn new(irq: EventFd) -> Arc<Self> {
        Arc::new(Self {
            status: AtomicU32::new(0),
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

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd the VMM registers as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.irq
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
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using the queues and guest memory.
    fn reset(&mut self);
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
