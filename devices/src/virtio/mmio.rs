//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2.2).
//!
//! The transport owns feature negotiation, the device status, and each queue's configuration
//! until DRIVER_OK; then it moves the queues to the device thread (see the threading model in
//! [`crate::virtio`]) and keeps none. Guest accesses arrive on vCPU threads through the MMIO bus;
//! register reads come from the transport's own state (the device's identity, features, queue
//! maxima and config space are copied when the transport is created) and never wait for the
//! device; DRIVER_OK and reset are posted to the device thread's [`Mailbox`].
//!
//! # Reset
//!
//! Linux's virtio-mmio driver does not wait after writing 0 to Status (`vm_reset` is one
//! `writel`): it reads Status and writes ACKNOWLEDGE, DRIVER, the features, FEATURES_OK, the
//! queue registers and DRIVER_OK straight away. So a reset is synchronous with the write, as in
//! QEMU, whenever the device lets it be:
//! - a device that was never activated since the last reset (no queues handed over) is reset
//!   in the transport at once;
//! - otherwise the transport's own state (features, selectors, queue configuration, status) is
//!   reset at once, a reset is posted to the device thread, and the vCPU waits at most
//!   [`RESET_TIMEOUT`] for the device thread to say it stopped using the rings. The device
//!   checks for a posted reset between two descriptor chains, so this wait is at most the one
//!   request in hand. Acknowledged (the normal case): Status reads 0 at once and the driver's
//!   next writes are taken normally.
//! - A device stuck longer in its backend (a request blocked in I/O) is not waited for any
//!   longer: the reset stays pending, logged once. Until the device thread has done it, Status
//!   reads the bits the driver wrote since the reset plus DEVICE_NEEDS_RESET, so never 0: a
//!   driver that waits for 0 as the spec asks (virtio 1.2, 4.2.3.1) waits, and Linux's, which
//!   reads and re-writes Status without waiting, still re-initialises correctly: its writes
//!   go to the transport's own state as usual (only the transport owns them), QueueReady reads
//!   0, and DRIVER_OK's activation is queued in the mailbox behind the reset, so the device
//!   starts on the new rings only after it let go of the old ones. A request that completes
//!   after the reset was posted is not returned on the rings the driver gave up. Further resets
//!   while one is pending do not wait again (the device cannot finish them first). No vCPU is
//!   ever held longer than [`RESET_TIMEOUT`] by one reset.
//! - A device thread that does not serve its mailbox (paused, or gone) is not waited for at
//!   all: the reset is pending until the thread runs again.
//!
//! A write to QueueNotify normally never reaches this code: the VMM registers each queue's
//! eventfd as a KVM ioeventfd on [`NOTIFY_OFFSET`], so KVM signals the device's event loop
//! directly. If it does arrive (no ioeventfd), the transport signals the same eventfd.
//!
//! [`MmioTransport`] implements [`Persist`]: the state is the registers, the interrupt status
//! and every queue (from the device while it is active; the caller pauses the device thread
//! first, and a paused device thread has done every reset posted to it). Restore checks it
//! against the device and, for an active device, hands the queues to the device thread as an
//! activation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapshot::{check, Persist, StateError};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{restore_queue, SavedQueue};
use super::{
    status, Activation, GuestMemory, Interrupt, Mailbox, VirtioDevice, INT_CONFIG,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

/// "virt".
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (modern).
const VERSION: u32 = 2;
/// "STRA".
const VENDOR_ID: u32 = u32::from_le_bytes(*b"STRA");
/// Size of a transport's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// The QueueNotify register, where the VMM puts the ioeventfds.
pub const NOTIFY_OFFSET: u64 = 0x050;
/// Where the device-specific config space starts.
const CONFIG_OFFSET: u64 = 0x100;
/// Status bits only the device sets.
const DEVICE_ONLY: u32 = status::DEVICE_NEEDS_RESET;
/// How long a vCPU that resets an active device waits for the device thread to stop using the
/// rings before the reset goes on asynchronously.
///
/// The wait is at most the one request the device has in hand: a 4 KiB-1 MiB read or write, a
/// discard, a vsock packet take microseconds to a few milliseconds; a flush (fsync) on a busy
/// host, a copy-on-write into a differencing layer, or the largest request (SEG_MAX x SIZE_MAX =
/// 128 MiB at ~1 GB/s) take up to some 100 ms. 250 ms covers those with room, so an ordinary
/// reset is synchronous, and a vCPU stall of 250 ms at worst, once per stuck device, is far
/// below anything a guest notices as a hang (Linux's soft-lockup watchdog: 20 s, RCU stalls:
/// 21 s) while a real hang of the backend (a dead NFS server, a stuck disk) does not freeze
/// the vCPU with it.
pub const RESET_TIMEOUT: Duration = Duration::from_millis(250);

/// What a transport is built on besides its state.
pub struct MmioResources {
    /// The device. Locked only at creation and by `save` (the device thread is paused then),
    /// never on a guest access.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// One notification eventfd per queue.
    pub queue_evts: Vec<EventFd>,
    /// The device thread's mailbox.
    pub mailbox: Arc<Mailbox>,
}

/// A virtio device behind an MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mailbox: Arc<Mailbox>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    max_sizes: Vec<u16>,
    config: Vec<u8>,
    /// Queue configuration; empty while the device thread owns the queues.
    queues: Vec<Queue>,
    /// QueueReady of each queue as it was handed over (what the register reads while active).
    handed_ready: Vec<bool>,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    /// The driver's status bits since the last reset.
    status: u32,
    /// The device thread owns the queues (an activation was posted since the last reset).
    active: bool,
    /// The transport refused the driver's DRIVER_OK (a queue it cannot hand over): Status
    /// shows DEVICE_NEEDS_RESET until the driver resets.
    refused: bool,
    /// The generation of the last reset posted to the device thread while it has not done it.
    resetting: Option<u64>,
    /// How long a reset waits for the device thread ([`RESET_TIMEOUT`]).
    reset_timeout: Duration,
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl MmioTransport {
    /// A transport for `r.device`, whose queues are notified through `r.queue_evts` (one per
    /// queue) and which the device thread serves through `r.mailbox`.
    pub fn new(r: MmioResources) -> Self {
        let (device_type, features, max_sizes, config) = {
            let d = r.device.lock().unwrap_or_else(|e| e.into_inner());
            (
                d.device_type(),
                d.features(),
                d.queue_max_sizes().to_vec(),
                d.config_space(),
            )
        };
        Self {
            device: r.device,
            mailbox: r.mailbox,
            mem: r.mem,
            interrupt: r.interrupt,
            queue_evts: r.queue_evts,
            device_type,
            device_features: features | (1 << VIRTIO_F_VERSION_1),
            queues: fresh_queues(&max_sizes),
            handed_ready: Vec::new(),
            max_sizes,
            config,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            active: false,
            refused: false,
            resetting: None,
            reset_timeout: RESET_TIMEOUT,
        }
    }

    /// Changes how long a reset waits for the device thread (tests; [`RESET_TIMEOUT`] by
    /// default).
    pub fn set_reset_timeout(&mut self, timeout: Duration) {
        self.reset_timeout = timeout;
    }

    /// Whether a reset was posted that the device thread has not done yet (Status reads
    /// DEVICE_NEEDS_RESET meanwhile).
    pub fn reset_pending(&mut self) -> bool {
        self.poll_reset();
        self.resetting.is_some()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// The Status register: the driver's bits plus DEVICE_NEEDS_RESET when the device set it,
    /// the transport refused DRIVER_OK, or a reset is still pending.
    fn status_register(&mut self) -> u32 {
        self.poll_reset();
        if self.refused || self.resetting.is_some() || self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Notes that the device thread has done the pending reset, if it has.
    fn poll_reset(&mut self) {
        if let Some(generation) = self.resetting {
            if self.interrupt.resets_done() >= generation {
                self.resetting = None;
                log::info!(
                    "virtio-mmio: device type {} finished its reset",
                    self.device_type
                );
            }
        }
    }

    /// The transport's own state as after a reset.
    fn reset_registers(&mut self) {
        self.queues = fresh_queues(&self.max_sizes);
        self.handed_ready.clear();
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.active = false;
        self.refused = false;
    }

    /// The driver wrote 0 to Status (see the module docs).
    fn reset(&mut self) {
        self.poll_reset();
        // The device thread is still busy with an earlier reset: it cannot finish this one
        // sooner, so the vCPU does not wait again.
        let busy = self.resetting.is_some();
        let handed_over = self.active;
        self.reset_registers();
        let generation = if handed_over {
            let generation = self.interrupt.post_reset();
            self.mailbox.reset(generation, self.interrupt.clone());
            self.resetting = Some(generation);
            generation
        } else if busy {
            return;
        } else {
            // Nothing was handed over: the device thread has nothing to stop.
            self.interrupt.clear();
            return;
        };
        if busy {
            return;
        }
        if self
            .mailbox
            .wait_reset(&self.interrupt, generation, self.reset_timeout)
        {
            self.resetting = None;
        } else {
            crate::rate_limited!(
                log::Level::Warn,
                "virtio-mmio: device type {} was not reset within {:?} (its thread is busy \
                 in the backend, paused or gone); the reset completes when the thread gets to \
                 it, Status reads DEVICE_NEEDS_RESET until then",
                self.device_type,
                self.reset_timeout
            );
        }
    }

    /// DRIVER_OK cannot be honoured: DEVICE_NEEDS_RESET with a configuration interrupt.
    fn refuse(&mut self) {
        if !self.refused {
            self.refused = true;
            self.interrupt.trigger(INT_CONFIG);
        }
    }

    fn set_status(&mut self, value: u32) {
        self.poll_reset();
        if value == 0 {
            self.reset();
            return;
        }
        let value = value & !DEVICE_ONLY;
        // The driver only ever adds bits (virtio 1.2, 3.1.1); anything else is ignored.
        if value & self.status != self.status {
            log::debug!(
                "virtio-mmio: status {:#x} -> {value:#x} refused",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut accepted = value;
        if added & status::FEATURES_OK != 0 {
            let subset = self.driver_features & !self.device_features == 0;
            let modern = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !(subset && modern) {
                accepted &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if accepted & status::FEATURES_OK == 0 {
                accepted &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate() {
                crate::rate_limited!(log::Level::Warn, "virtio-mmio: activation failed: {e}");
                self.refuse();
            }
        }
        self.status = accepted;
    }

    /// Checks the queues and hands them to the device thread.
    fn activate(&mut self) -> Result<(), super::ActivateError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() {
                if !q.is_valid(&self.mem) {
                    return Err(super::ActivateError::BadQueue(i));
                }
                q.set_event_idx(event_idx);
            }
        }
        let queues = std::mem::take(&mut self.queues);
        self.hand_over(queues);
        Ok(())
    }

    /// Moves `queues` to the device thread; behind a pending reset in the mailbox, if any.
    fn hand_over(&mut self, queues: Vec<Queue>) {
        self.handed_ready = queues.iter().map(|q| q.ready()).collect();
        self.active = true;
        self.mailbox.activate(Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            features: self.driver_features,
        });
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let sel = self.queue_sel as usize;
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device_type,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => self.max_sizes.get(sel).map_or(0, |&m| u32::from(m)),
            0x044 => {
                let ready = if self.active {
                    self.handed_ready.get(sel).copied()
                } else {
                    self.queues.get(sel).map(|q| q.ready())
                };
                u32::from(ready.unwrap_or(false))
            }
            0x060 => self.interrupt.status(),
            0x070 => self.status_register(),
            0x0fc => 0, // ConfigGeneration: the config space never changes.
            _ => {
                log::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.driver_features = lo(self.driver_features),
                        1 => self.driver_features = hi(self.driver_features),
                        _ => {}
                    }
                }
            }
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !self.queue_config_allowed() {
                    log::debug!(
                        "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                        self.status
                    );
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    0x038 => q.set_size(value as u16),
                    0x044 => q.set_ready(value == 1),
                    0x080 => q.set_desc_table_address(Some(value), None),
                    0x084 => q.set_desc_table_address(None, Some(value)),
                    0x090 => q.set_avail_ring_address(Some(value), None),
                    0x094 => q.set_avail_ring_address(None, Some(value)),
                    0x0a0 => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            0x050 => {
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.interrupt.ack(value),
            0x070 => self.set_status(value),
            _ => log::debug!("virtio-mmio: write of {value:#x} to register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            super::read_config_bytes(&self.config, offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            log::debug!("virtio-mmio: config space write at {offset:#x} ignored");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// A transport's saved state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MmioState {
    /// The device type it was saved with.
    pub device_type: u32,
    /// The features the device offered (VERSION_1 included).
    pub device_features: u64,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The driver's status bits.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// DEVICE_NEEDS_RESET is set.
    pub needs_reset: bool,
    /// The device thread was serving the queues.
    pub active: bool,
    /// Every queue: its configuration, or its live state while active.
    pub queues: Vec<SavedQueue>,
}

impl Persist for MmioTransport {
    type State = MmioState;
    type Resources = MmioResources;
    type Error = StateError;

    fn save(&self) -> MmioState {
        let fresh = || -> Vec<SavedQueue> {
            fresh_queues(&self.max_sizes)
                .iter()
                .map(|q| SavedQueue::from(q.state()))
                .collect()
        };
        // A paused device thread has done every reset posted before the pause.
        let settled = self
            .resetting
            .is_none_or(|generation| self.interrupt.resets_done() >= generation);
        if !settled {
            log::warn!(
                "virtio-mmio: device type {} saved with its reset not done (its thread is not \
                 paused); saved as needing a reset",
                self.device_type
            );
        }
        let mut needs_reset = self.refused || self.interrupt.needs_reset() || !settled;
        let mut active = self.active && settled;
        let queues: Vec<SavedQueue> = if active {
            let live = self
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_states();
            if live.len() == self.max_sizes.len() {
                live.into_iter().map(SavedQueue::from).collect()
            } else {
                // The device refused the activation (and asked for a reset).
                active = false;
                needs_reset = true;
                fresh()
            }
        } else if self.queues.len() == self.max_sizes.len() {
            self.queues
                .iter()
                .map(|q| SavedQueue::from(q.state()))
                .collect()
        } else {
            fresh()
        };
        MmioState {
            device_type: self.device_type,
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            needs_reset,
            active,
            queues,
        }
    }

    fn restore(r: MmioResources, state: &MmioState) -> Result<Self, StateError> {
        let mut t = MmioTransport::new(r);
        check(state.device_type == t.device_type, "device_type", || {
            format!("{} but the device is {}", state.device_type, t.device_type)
        })?;
        check(
            state.device_features == t.device_features,
            "device_features",
            || {
                format!(
                    "{:#x} but the device offers {:#x}",
                    state.device_features, t.device_features
                )
            },
        )?;
        let s = state.status;
        check(s & !0xff == 0 && s & DEVICE_ONLY == 0, "status", || {
            format!("{s:#x} has bits a driver cannot set")
        })?;
        let implies = [
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needs) in implies {
            check(s & bit == 0 || s & needs != 0, "status", || {
                format!("{s:#x} has {bit:#x} without {needs:#x}")
            })?;
        }
        if s & status::FEATURES_OK != 0 {
            check(
                state.driver_features & !t.device_features == 0
                    && state.driver_features & (1 << VIRTIO_F_VERSION_1) != 0,
                "driver_features",
                || {
                    format!(
                        "{:#x} is not a modern subset of the device's {:#x}",
                        state.driver_features, t.device_features
                    )
                },
            )?;
        }
        check(
            !state.active || s & status::DRIVER_OK != 0,
            "active",
            || "set without DRIVER_OK in status".into(),
        )?;
        check(state.queues.len() == t.max_sizes.len(), "queues", || {
            format!(
                "{} queues but the device has {}",
                state.queues.len(),
                t.max_sizes.len()
            )
        })?;
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, &max)) in state.queues.iter().zip(&t.max_sizes).enumerate() {
            queues.push(
                restore_queue(saved, max, &t.mem).map_err(|e| e.within(format!("queues[{i}]")))?,
            );
        }
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.status = s;
        t.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if state.active {
            t.hand_over(queues);
        } else {
            t.queues = queues;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, EventLoop};
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use std::sync::mpsc;
    use std::time::Duration;
    use virtio_queue::QueueState;
    use vm_memory::GuestAddress;

    impl MutEventSubscriber for Dummy {
        fn process(&mut self, _: Events, _: &mut EventOps) {}
        fn init(&mut self, _: &mut EventOps) {}
    }

    #[derive(Default)]
    struct Dummy {
        activated: Option<(Vec<Queue>, u64)>,
        resets: u32,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn config_space(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn activate(
            &mut self,
            _: GuestMemory,
            _: Arc<Interrupt>,
            queues: Vec<Queue>,
            features: u64,
        ) -> Result<(), ActivateError> {
            self.activated = Some((queues, features));
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn queue_states(&self) -> Vec<QueueState> {
            self.activated
                .iter()
                .flat_map(|(q, _)| q.iter().map(|q| q.state()))
                .collect()
        }
    }

    struct Fixture {
        t: MmioTransport,
        dev: Arc<Mutex<Dummy>>,
        mailbox: Arc<Mailbox>,
        interrupt: Arc<Interrupt>,
        mem: GuestMemory,
    }

    impl Fixture {
        /// What the device thread does when its mailbox fires.
        fn deliver(&self) {
            self.mailbox.deliver(&mut *self.dev.lock().unwrap());
        }
    }

    fn resources(
        dev: Arc<Mutex<Dummy>>,
        mem: &GuestMemory,
    ) -> (MmioResources, Arc<Mailbox>, Arc<Interrupt>) {
        let mailbox = Mailbox::new().unwrap();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let r = MmioResources {
            device: dev,
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            mailbox: mailbox.clone(),
        };
        (r, mailbox, interrupt)
    }

    fn setup() -> Fixture {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let (r, mailbox, interrupt) = resources(dev.clone(), &mem);
        Fixture {
            t: MmioTransport::new(r),
            dev,
            mailbox,
            interrupt,
            mem,
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const FEATURES: u64 = (1 << 9) | (1u64 << VIRTIO_F_VERSION_1);
    const ACTIVE: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// Runs the driver's initialisation sequence (virtio 1.2, 3.1.1) with `features`.
    fn init(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, 0x070, status::ACKNOWLEDGE);
        w(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x024, 0);
        w(t, 0x020, features as u32);
        w(t, 0x024, 1);
        w(t, 0x020, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(t, 0x070, s);
        if r(t, 0x070) & status::FEATURES_OK == 0 {
            return r(t, 0x070);
        }
        w(t, 0x030, 0);
        w(t, 0x038, 16);
        w(t, 0x080, 0x1000);
        w(t, 0x090, 0x2000);
        w(t, 0x0a0, 0x3000);
        w(t, 0x044, 1);
        w(t, 0x070, s | status::DRIVER_OK);
        r(t, 0x070)
    }

    #[test]
    fn identifies_as_modern_virtio_mmio() {
        let mut f = setup();
        let t = &mut f.t;
        assert_eq!(r(t, 0), MAGIC);
        assert_eq!(r(t, 4), 2);
        assert_eq!(r(t, 8), 2);
        w(t, 0x014, 1);
        assert_eq!(r(t, 0x010), 1, "VERSION_1 offered");
        w(t, 0x014, 0);
        assert_eq!(r(t, 0x010), 1 << 9);
        assert_eq!(r(t, 0x034), 16);
    }

    #[test]
    fn driver_ok_hands_the_queues_to_the_device_thread_and_keeps_none() {
        let mut f = setup();
        let s = init(&mut f.t, FEATURES);
        assert_ne!(s & status::DRIVER_OK, 0);
        // Posted, not run on this (the vCPU's) thread.
        assert!(f.dev.lock().unwrap().activated.is_none());
        assert!(f.t.queues.is_empty(), "the transport keeps no queue copies");
        assert_eq!(r(&mut f.t, 0x044), 1, "QueueReady still reads");
        f.deliver();
        let d = f.dev.lock().unwrap();
        let (queues, got) = d.activated.as_ref().unwrap();
        assert_eq!(*got, FEATURES);
        assert_eq!(queues[0].size(), 16);
        assert_eq!(queues[0].desc_table(), 0x1000);
        assert!(queues[0].ready());
    }

    #[test]
    fn guest_accesses_never_take_the_device_mutex() {
        let f = setup();
        let Fixture { mut t, dev, .. } = f;
        // The device thread holds its mutex (as across a long request).
        let held = dev.lock().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            init(&mut t, FEATURES);
            for off in (0..0x100).step_by(4) {
                r(&mut t, off);
            }
            let mut cfg = [0u8; 8];
            t.read(0x100, &mut cfg);
            w(&mut t, 0x050, 0);
            w(&mut t, 0x070, 0);
            r(&mut t, 0x070);
            tx.send(cfg).unwrap();
        });
        // Hang guard only.
        let cfg = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a guest access waited for the device");
        assert_eq!(cfg, [1, 2, 3, 4, 5, 6, 7, 8]);
        drop(held);
    }

    #[test]
    fn without_a_serving_device_thread_a_reset_is_pending_and_reinit_queues_behind_it() {
        // No device thread serves the mailbox (as while it is paused): the vCPU does not wait.
        let mut f = setup();
        init(&mut f.t, FEATURES);
        f.deliver();
        w(&mut f.t, 0x070, 0);
        assert_eq!(
            r(&mut f.t, 0x070),
            status::DEVICE_NEEDS_RESET,
            "non-zero until the device thread has done it"
        );
        assert_eq!(r(&mut f.t, 0x044), 0, "QueueReady");
        assert_eq!(f.dev.lock().unwrap().resets, 0);
        // Linux re-initialises at once: taken, DRIVER_OK queued behind the reset.
        assert_eq!(
            init(&mut f.t, FEATURES),
            ACTIVE | status::DEVICE_NEEDS_RESET
        );
        f.deliver();
        let d = f.dev.lock().unwrap();
        assert_eq!(d.resets, 1);
        assert!(
            d.activated.is_some(),
            "activated after the reset, not before"
        );
        drop(d);
        assert_eq!(r(&mut f.t, 0x070), ACTIVE);
    }

    #[test]
    fn resets_while_one_is_pending_supersede_what_is_queued() {
        let mut f = setup();
        init(&mut f.t, FEATURES);
        f.deliver();
        // A guest that resets and re-initialises over and over while the device is stuck.
        for _ in 0..1000 {
            w(&mut f.t, 0x070, 0);
            init(&mut f.t, FEATURES);
            assert!(f.mailbox.lock().commands.len() <= 2, "the mailbox grows");
        }
        w(&mut f.t, 0x070, 0);
        assert_eq!(f.mailbox.lock().commands.len(), 1);
        f.deliver();
        let d = f.dev.lock().unwrap();
        assert_eq!(d.resets, 1, "one reset did for all");
        assert!(
            d.activated.is_none(),
            "no activation survived the last reset"
        );
        drop(d);
        assert_eq!(r(&mut f.t, 0x070), 0);
        assert_eq!(init(&mut f.t, FEATURES), ACTIVE);
        f.deliver();
        assert!(f.dev.lock().unwrap().activated.is_some());
    }

    /// Starts the device's event loop thread.
    fn serve(f: &Fixture) -> EventLoop {
        EventLoop::start(
            "mmio-test",
            f.dev.clone(),
            f.mailbox.clone(),
            Arc::new(|e| panic!("{e}")),
        )
        .unwrap()
    }

    /// Polls `done` with a generous hang guard.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + HANG_GUARD;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}: never");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    const HANG_GUARD: Duration = Duration::from_secs(60);

    #[test]
    fn a_reset_reads_0_at_once_when_the_device_thread_answers_and_reinit_activates() {
        let mut f = setup();
        let el = serve(&f);
        // The bound only as a hang guard: an idle device thread answers at once.
        f.t.set_reset_timeout(HANG_GUARD);
        assert_eq!(init(&mut f.t, FEATURES), ACTIVE);
        eventually("activation", || f.dev.lock().unwrap().activated.is_some());
        w(&mut f.t, 0x070, 0);
        assert_eq!(r(&mut f.t, 0x070), 0);
        {
            let d = f.dev.lock().unwrap();
            assert_eq!(d.resets, 1, "the device was reset before Status read 0");
            assert!(d.activated.is_none());
        }
        assert_eq!(r(&mut f.t, 0x060), 0, "InterruptStatus cleared");
        assert_eq!(init(&mut f.t, FEATURES), ACTIVE, "re-initialised at once");
        eventually("re-activation", || {
            f.dev.lock().unwrap().activated.is_some()
        });
        drop(el);
    }

    #[test]
    fn a_paused_device_thread_is_not_waited_for_and_finishes_the_reset_when_resumed() {
        let mut f = setup();
        let el = serve(&f);
        init(&mut f.t, FEATURES);
        eventually("activation", || f.dev.lock().unwrap().activated.is_some());
        el.pause().unwrap();
        // A bound far beyond the hang guard: returning at all means it did not wait for it.
        f.t.set_reset_timeout(Duration::from_secs(3600));
        let Fixture { mut t, dev, .. } = f;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            w(&mut t, 0x070, 0);
            let s = r(&mut t, 0x070);
            tx.send((t, s)).unwrap();
        });
        let (mut t, s) = rx
            .recv_timeout(HANG_GUARD)
            .expect("the reset waited for a paused device thread");
        assert_eq!(s, status::DEVICE_NEEDS_RESET);
        assert_eq!(
            dev.lock().unwrap().resets,
            0,
            "a paused device does nothing"
        );
        el.resume().unwrap();
        eventually("the reset done after resume", || r(&mut t, 0x070) == 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        drop(el);
    }

    #[test]
    fn pausing_a_device_thread_that_a_vcpu_waits_on_completes_the_reset() {
        // The vCPU waits for the reset while the VMM pauses the device thread: the thread does
        // the reset before it parks, so neither waits for the other.
        let mut f = setup();
        let el = serve(&f);
        init(&mut f.t, FEATURES);
        eventually("activation", || f.dev.lock().unwrap().activated.is_some());
        f.t.set_reset_timeout(Duration::from_secs(3600));
        let Fixture {
            mut t,
            dev,
            interrupt,
            ..
        } = f;
        // Hold the device (as a long request would) so that the reset and the pause meet.
        let held = dev.lock().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            w(&mut t, 0x070, 0);
            let s = r(&mut t, 0x070);
            tx.send((t, s)).unwrap();
        });
        eventually("the reset posted", || interrupt.reset_pending());
        let el = Arc::new(el);
        let pauser = {
            let el = el.clone();
            std::thread::spawn(move || el.pause())
        };
        // Let the pause request arrive too (not needed for the outcome).
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        let (_t, s) = rx.recv_timeout(HANG_GUARD).expect("the reset never ended");
        pauser.join().unwrap().unwrap();
        assert!(el.is_paused());
        assert_eq!(s, 0, "done before the thread parked");
        assert_eq!(dev.lock().unwrap().resets, 1);
        el.resume().unwrap();
    }

    #[test]
    fn needs_reset_shows_in_status_with_a_config_interrupt_until_reset() {
        let mut f = setup();
        init(&mut f.t, FEATURES);
        f.deliver();
        f.interrupt.set_needs_reset();
        assert_eq!(r(&mut f.t, 0x070), ACTIVE | status::DEVICE_NEEDS_RESET);
        assert_eq!(r(&mut f.t, 0x060), crate::virtio::INT_CONFIG);
        // A driver cannot set or clear it itself.
        w(&mut f.t, 0x070, ACTIVE);
        assert_eq!(
            r(&mut f.t, 0x070) & status::DEVICE_NEEDS_RESET,
            status::DEVICE_NEEDS_RESET
        );
        w(&mut f.t, 0x070, 0);
        f.deliver();
        assert_eq!(r(&mut f.t, 0x070), 0);
        assert_eq!(r(&mut f.t, 0x060), 0);
    }

    #[test]
    fn features_the_device_lacks_or_legacy_drivers_are_refused() {
        let mut f = setup();
        let s = init(&mut f.t, (1 << 9) | (1 << 3) | (1u64 << VIRTIO_F_VERSION_1));
        assert_eq!(s & status::FEATURES_OK, 0);
        let mut f2 = setup();
        let s = init(&mut f2.t, 1 << 9); // no VERSION_1
        assert_eq!(s & status::FEATURES_OK, 0);
        f.deliver();
        assert!(f.dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn invalid_queue_sets_needs_reset_instead_of_activating() {
        let mut f = setup();
        let t = &mut f.t;
        w(t, 0x070, 1);
        w(t, 0x070, 3);
        w(t, 0x024, 1);
        w(t, 0x020, 1);
        w(t, 0x070, 11);
        w(t, 0x038, 16);
        w(t, 0x080, 0xffff_0000); // outside guest memory
        w(t, 0x044, 1);
        w(t, 0x070, 15);
        assert_ne!(r(t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        f.deliver();
        assert!(f.dev.lock().unwrap().activated.is_none());
        // A reset needs no device thread here: nothing was handed over.
        w(&mut f.t, 0x070, 0);
        assert_eq!(r(&mut f.t, 0x070), 0);
    }

    #[test]
    fn status_zero_resets_and_odd_accesses_are_harmless() {
        let mut f = setup();
        init(&mut f.t, FEATURES);
        f.deliver();
        w(&mut f.t, 0x070, 0);
        f.deliver();
        assert_eq!(r(&mut f.t, 0x070), 0);
        assert_eq!(f.dev.lock().unwrap().resets, 1);
        let t = &mut f.t;
        // Byte and unaligned accesses, unknown registers, bad queue selectors, config writes.
        let mut b = [0xaau8; 1];
        t.read(0x000, &mut b);
        assert_eq!(b, [0]);
        t.write(0x071, &[1, 2, 3, 4]);
        w(t, 0x030, 99);
        assert_eq!(r(t, 0x034), 0);
        w(t, 0x038, 8);
        w(t, 0xffc, 1);
        w(t, 0x100, 0xdead_beef);
        let mut cfg = [0u8; 4];
        t.read(0x106, &mut cfg);
        assert_eq!(cfg, [7, 8, 0, 0]);
    }

    type Restored = (MmioTransport, Arc<Mutex<Dummy>>, Arc<Mailbox>);
    type Corruption = (fn(&mut MmioState), &'static str);

    fn restore(f: &Fixture, state: &MmioState) -> Result<Restored, StateError> {
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let (r, mailbox, _) = resources(dev.clone(), &f.mem);
        MmioTransport::restore(r, state).map(|t| (t, dev, mailbox))
    }

    #[test]
    fn state_round_trips_through_json_with_live_queues() {
        let mut f = setup();
        init(&mut f.t, FEATURES);
        f.deliver();
        // The device thread moved the queue on.
        {
            let mut d = f.dev.lock().unwrap();
            let q = &mut d.activated.as_mut().unwrap().0[0];
            q.set_next_avail(5);
            q.set_next_used(4);
        }
        let saved = f.t.save();
        assert!(saved.active);
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (5, 4)
        );
        let json = serde_json::to_string(&saved).unwrap();
        let back: MmioState = serde_json::from_str(&json).unwrap();
        let (mut t2, dev2, mailbox2) = restore(&f, &back).unwrap();
        mailbox2.deliver(&mut *dev2.lock().unwrap());
        assert_eq!(t2.save(), saved);
        assert_eq!(r(&mut t2, 0x070), ACTIVE);
        let d = dev2.lock().unwrap();
        assert_eq!(d.activated.as_ref().unwrap().0[0].next_avail(), 5);
    }

    #[test]
    fn corrupted_states_are_refused_naming_the_field() {
        let mut f = setup();
        init(&mut f.t, FEATURES);
        f.deliver();
        let good = f.t.save();
        let cases: [Corruption; 9] = [
            (|s| s.device_type = 19, "device_type"),
            (|s| s.device_features = 1, "device_features"),
            (
                |s| s.status = status::DRIVER_OK | status::DRIVER | status::ACKNOWLEDGE,
                "status",
            ),
            (|s| s.status |= status::DEVICE_NEEDS_RESET, "status"),
            (|s| s.driver_features |= 1 << 3, "driver_features"),
            (|s| s.queues.clear(), "queues"),
            (|s| s.queues[0].size = 3, "queues[0].size"),
            (|s| s.queues[0].used_ring = 0xfff8, "queues[0].used_ring"),
            (|s| s.queues[0].desc_table = 0x1001, "queues[0].desc_table"),
        ];
        for (corrupt, field) in cases {
            let mut s = good.clone();
            corrupt(&mut s);
            match restore(&f, &s) {
                Err(e) => assert_eq!(e.field, field, "{e}"),
                Ok(_) => panic!("{field}: accepted"),
            }
        }
    }
}
