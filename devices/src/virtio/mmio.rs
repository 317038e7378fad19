//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2.2).
//!
//! The transport owns feature negotiation, queue configuration and the device status; when the
//! driver sets DRIVER_OK it hands the configured queues to the device. Guest accesses arrive on
//! vCPU threads through the MMIO bus; everything here is cheap and never blocks on device I/O.
//! A write to QueueNotify normally never reaches this code: the VMM registers each queue's
//! eventfd as a KVM ioeventfd on [`NOTIFY_OFFSET`], so KVM signals the device's event loop
//! directly. If it does arrive (no ioeventfd), the transport signals the same eventfd.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    status, GuestMemory, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
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

/// A virtio device behind an MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues are notified through `queue_evts` (one per queue).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let (features, sizes) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (d.features(), d.queue_max_sizes().to_vec())
        };
        let queues = sizes
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features: features | (1 << VIRTIO_F_VERSION_1),
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        self.device().reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
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
                log::warn!("virtio-mmio: activation failed: {e}");
                accepted |= status::DEVICE_NEEDS_RESET;
                self.status = accepted;
                self.interrupt.trigger(INT_CONFIG);
                return;
            }
        }
        self.status = accepted;
    }

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
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| Queue::try_from(q.state()).map_err(|_| super::ActivateError::BadQueue(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let features = self.driver_features;
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        self.device().activate(mem, interrupt, queues, features)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device().device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
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
            self.device().read_config(offset - CONFIG_OFFSET, data);
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
            self.device().write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

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
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
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
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            dev.clone(),
            mem,
            Interrupt::new(irq),
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        );
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

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
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 2);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1, "VERSION_1 offered");
        w(&mut t, 0x014, 0);
        assert_eq!(r(&mut t, 0x010), 1 << 9);
        assert_eq!(r(&mut t, 0x034), 16);
    }

    #[test]
    fn full_init_activates_device_with_configured_queue() {
        let (mut t, dev) = setup();
        let features = (1 << 9) | (1u64 << VIRTIO_F_VERSION_1);
        let s = init(&mut t, features);
        assert_ne!(s & status::DRIVER_OK, 0);
        let d = dev.lock().unwrap();
        let (queues, got) = d.activated.as_ref().unwrap();
        assert_eq!(*got, features);
        assert_eq!(queues[0].size(), 16);
        assert_eq!(queues[0].desc_table(), 0x1000);
        assert!(queues[0].ready());
    }

    #[test]
    fn features_the_device_lacks_or_legacy_drivers_are_refused() {
        let (mut t, dev) = setup();
        let s = init(&mut t, (1 << 9) | (1 << 3) | (1u64 << VIRTIO_F_VERSION_1));
        assert_eq!(s & status::FEATURES_OK, 0);
        let (mut t2, _) = setup();
        let s = init(&mut t2, 1 << 9); // no VERSION_1
        assert_eq!(s & status::FEATURES_OK, 0);
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn invalid_queue_sets_needs_reset_instead_of_activating() {
        let (mut t, dev) = setup();
        w(&mut t, 0x070, 1);
        w(&mut t, 0x070, 3);
        w(&mut t, 0x024, 1);
        w(&mut t, 0x020, 1);
        w(&mut t, 0x070, 11);
        w(&mut t, 0x038, 16);
        w(&mut t, 0x080, 0xffff_0000); // outside guest memory
        w(&mut t, 0x044, 1);
        w(&mut t, 0x070, 15);
        assert_ne!(r(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn status_zero_resets_and_odd_accesses_are_harmless() {
        let (mut t, dev) = setup();
        init(&mut t, (1 << 9) | (1u64 << VIRTIO_F_VERSION_1));
        w(&mut t, 0x070, 0);
        assert_eq!(r(&mut t, 0x070), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(dev.lock().unwrap().activated.is_none());
        // Byte and unaligned accesses, unknown registers, bad queue selectors.
        let mut b = [0xaau8; 1];
        t.read(0x000, &mut b);
        assert_eq!(b, [0]);
        t.write(0x071, &[1, 2, 3, 4]);
        w(&mut t, 0x030, 99);
        assert_eq!(r(&mut t, 0x034), 0);
        w(&mut t, 0x038, 8);
        w(&mut t, 0xffc, 1);
        let mut cfg = [0u8; 4];
        t.read(0x106, &mut cfg);
        assert_eq!(cfg, [7, 8, 0, 0]);
    }
}
