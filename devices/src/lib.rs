//! Strata's emulated devices.
//!
//! This crate owns everything the guest sees as hardware besides the CPU and memory:
//! - [`bus`]: the port-I/O and MMIO buses every guest access is dispatched through;
//! - [`legacy`]: the 8250 serial port (COM1), the i8042 controller (only its CPU-reset line),
//!   the ACPI power-management registers of a hardware-reduced platform (sleep control/status and
//!   the reset register) and the pvpanic port;
//! - [`ratelimit`]: the per-call-site limit on log lines a guest can trigger;
//! - [`virtio`]: the virtio-mmio transport, the virtio-blk and virtio-vsock devices, the queue
//!   service they share and their pausable event loop threads (its module docs give the
//!   threading and ownership model).
//!
//! Devices never touch `/dev/kvm`: they raise interrupts through an [`vmm_sys_util::eventfd::EventFd`]
//! that the VMM registers as a KVM irqfd, and they report guest power requests through a
//! [`GuestEventSink`], so every device can be unit-tested without KVM.

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod virtio;

use std::sync::Arc;

/// A request the guest made through a device that ends or restarts the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest asked to power off (ACPI sleep state S5).
    PowerOff,
    /// The guest asked for a reset (i8042 CPU reset line, ACPI reset register).
    Reset,
    /// The guest reported a panic (pvpanic).
    Panic,
}

/// Where devices report [`GuestEvent`]s; the VMM's control loop is on the other side.
pub type GuestEventSink = Arc<dyn Fn(GuestEvent) + Send + Sync>;
