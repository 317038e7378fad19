//! virtio-blk (virtio 1.2, section 5.2) over a [`BlockBackend`].
//!
//! One request queue. The device offers FLUSH, SEG_MAX, SIZE_MAX, BLK_SIZE, DISCARD,
//! WRITE_ZEROES, RO (for read-only disks), INDIRECT_DESC and EVENT_IDX. Requests are parsed
//! defensively ([`request`]): a malformed descriptor chain gets VIRTIO_BLK_S_IOERR (or nothing
//! when even its status byte is unusable) and the device keeps serving the queue.

mod backend;
pub mod request;
#[cfg(test)]
mod tests;

pub use backend::{BlockBackend, ChainBackend};

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, GuestMemory, Interrupt, VirtioDevice, INT_VRING, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// The virtio device id of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Largest number of data segments in one request.
pub const SEG_MAX: u32 = 128;
/// Largest data segment, in bytes.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard or write-zeroes request, in sectors (64 MiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 17;

/// Feature bits (virtio 1.2, 5.2.3).
pub mod features {
    /// Maximum size of a segment is in `size_max`.
    pub const SIZE_MAX: u32 = 1;
    /// Maximum number of segments is in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// Block size is in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// The device supports cache flush.
    pub const FLUSH: u32 = 9;
    /// The device supports discard.
    pub const DISCARD: u32 = 13;
    /// The device supports write zeroes.
    pub const WRITE_ZEROES: u32 = 14;
}

/// A virtio block device.
pub struct Block {
    backend: Box<dyn BlockBackend>,
    read_only: bool,
    id: [u8; request::ID_LEN],
    config: [u8; 60],
    features: u64,
    queue_evt: EventFd,
    active: Option<Active>,
}

struct Active {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    broken: bool,
}

/// Builds the config space (struct virtio_blk_config).
fn config_space(capacity_sectors: u64) -> [u8; 60] {
    let mut c = [0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl Block {
    /// A block device on `backend`; `id` is what GET_ID returns (up to 20 bytes).
    pub fn new(backend: Box<dyn BlockBackend>, read_only: bool, id: &str) -> std::io::Result<Self> {
        let mut id_bytes = [0u8; request::ID_LEN];
        for (d, s) in id_bytes.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        let mut features = (1u64 << features::SIZE_MAX)
            | (1 << features::SEG_MAX)
            | (1 << features::BLK_SIZE)
            | (1 << features::FLUSH)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if read_only {
            features |= 1 << features::RO;
        } else {
            features |= (1 << features::DISCARD) | (1 << features::WRITE_ZEROES);
        }
        Ok(Self {
            config: config_space(backend.capacity() / 512),
            backend,
            read_only,
            id: id_bytes,
            features,
            queue_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
        })
    }

    /// The queue's notification eventfd (for the transport and the KVM ioeventfd).
    pub fn queue_event(&self) -> std::io::Result<EventFd> {
        self.queue_evt.try_clone()
    }

    /// Serves every available request, then interrupts the driver if it wants to be told.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let ctx = request::Context {
            backend: self.backend.as_mut(),
            read_only: self.read_only,
            id: &self.id,
        };
        let mut ctx = ctx;
        let mut used_any = false;
        let mut first_pass = true;
        loop {
            if let Err(e) = active.queue.disable_notification(&active.mem) {
                log::warn!("virtio-blk: queue unusable: {e}");
                active.broken = true;
                return;
            }
            let mut popped = false;
            while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
                popped = true;
                let head = chain.head_index();
                let len = request::handle(&active.mem, chain, &mut ctx);
                if let Err(e) = active.queue.add_used(&active.mem, head, len) {
                    log::warn!("virtio-blk: cannot return descriptor {head}: {e}");
                    active.broken = true;
                    return;
                }
                used_any = true;
            }
            match active.queue.enable_notification(&active.mem) {
                // The last check saw requests pending, yet this pass popped none: the available
                // ring is unusable (its index is more than a queue size ahead, or its entries are
                // outside guest memory). Stop rather than spin.
                Ok(true) if !popped && !first_pass => {
                    log::warn!("virtio-blk: queue unusable: available ring cannot be read");
                    active.broken = true;
                    return;
                }
                Ok(true) => first_pass = false, // more arrived while notifications were off
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-blk: queue unusable: {e}");
                    active.broken = true;
                    return;
                }
            }
        }
        if used_any && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.trigger(INT_VRING);
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the block config space is writable without CONFIG_WCE.
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        _features: u64,
    ) -> Result<(), ActivateError> {
        let queue = queues
            .into_iter()
            .next()
            .filter(|q| q.ready())
            .ok_or(ActivateError::BadQueue(0))?;
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
            broken: false,
        });
        // Requests may have been queued before DRIVER_OK.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == std::os::fd::AsRawFd::as_raw_fd(&self.queue_evt) {
            let _ = self.queue_evt.read();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evt, EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the queue: {e}");
        }
    }
}
