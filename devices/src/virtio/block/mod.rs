//! virtio-blk (virtio 1.2, section 5.2) over a [`BlockBackend`].
//!
//! One request queue. The device offers FLUSH, SEG_MAX, SIZE_MAX, BLK_SIZE, DISCARD,
//! WRITE_ZEROES, RO (for read-only disks), INDIRECT_DESC and EVENT_IDX. The queue is served by
//! [`VirtQueue`] within the limits the config space advertises: a chain of more than
//! [`SEG_MAX`] data descriptors (plus header and status) or a descriptor longer than
//! [`SIZE_MAX`], like any descriptor outside guest memory or a broken ring, is a broken queue:
//! the device sets DEVICE_NEEDS_RESET and serves nothing until the driver resets it. Those
//! checks run on the whole chain before the request touches the disk. Requests within the
//! limits are parsed defensively ([`request`]): a malformed one gets VIRTIO_BLK_S_IOERR (or
//! nothing when even its status byte is unusable) and the device keeps serving the queue.
//!
//! Data moves between the disk and guest memory with positional I/O directly on guest memory
//! (no bounce buffer): at most [`SEG_MAX`] x [`SIZE_MAX`] per request, none of it allocated.
//!
//! Choice where the spec is silent: the limits are enforced whether or not the driver
//! acknowledged SIZE_MAX and SEG_MAX (the device cannot serve more either way).

mod backend;
pub mod request;
#[cfg(test)]
mod tests;

pub use backend::{BlockBackend, ChainBackend};

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use snapshot::{check, Persist, StateError};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{ChainLimits, Handled, VirtQueue};
use super::{
    ActivateError, GuestMemory, Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
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
    queue: VirtQueue,
    broken: bool,
}

/// What the queue accepts: header + [`SEG_MAX`] data descriptors + status, none longer than
/// [`SIZE_MAX`].
const LIMITS: ChainLimits = ChainLimits {
    max_descriptors: SEG_MAX as usize + 2,
    max_len: SIZE_MAX,
};

/// An id as text.
fn id_text(id: &[u8]) -> String {
    String::from_utf8_lossy(id)
        .trim_end_matches('\0')
        .to_string()
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

    /// Serves up to a queue's worth of available requests, then interrupts the driver if it
    /// wants to be told; with more left, signals itself to come back after other events. A
    /// broken queue stops the device until reset (DEVICE_NEEDS_RESET).
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let mut ctx = request::Context {
            backend: self.backend.as_mut(),
            read_only: self.read_only,
            id: &self.id,
        };
        let mem = &active.mem;
        let result = active
            .queue
            .serve(mem, &active.interrupt, usize::from(QUEUE_SIZE), |chain| {
                Handled::Used(request::handle(mem, chain.descs, &mut ctx))
            });
        match result {
            Ok(served) if served.more => {
                let _ = self.queue_evt.write(1);
            }
            Ok(_) => {}
            Err(e) => {
                crate::rate_limited!(
                    log::Level::Warn,
                    "virtio-blk {}: queue broken, device needs reset: {e}",
                    id_text(&self.id)
                );
                active.broken = true;
                active.interrupt.set_needs_reset();
            }
        }
    }

    /// The id GET_ID returns, as text.
    fn name(&self) -> String {
        id_text(&self.id)
    }

    /// Whether the device stopped serving a queue the guest broke.
    pub fn is_broken(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.broken)
    }

    /// Whether the device holds queues (activated and not reset since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Switches the disk to a new empty layer at `path` (flushing first), so that what it held
    /// so far is frozen. Only while the device thread is paused: no request is in flight. A
    /// read-only disk is never written and takes no layer.
    pub fn push_layer(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("disk {} is read-only and takes no layer", self.name()),
            ));
        }
        self.backend.push_layer(path)
    }

    /// Undoes [`Block::push_layer`] (nothing may have been written since).
    pub fn pop_layer(&mut self) -> std::io::Result<()> {
        self.backend.pop_layer()
    }

    /// The file the disk writes now, if its backend has one.
    pub fn top_path(&self) -> Option<std::path::PathBuf> {
        self.backend.top_path()
    }

    /// The disk's open chain, if its backend has one: the caller holds the device's lock, so
    /// it works between two of the guest's requests (a merge step of a checkpoint delete).
    pub fn chain_mut(&mut self) -> Option<&mut disk::Chain> {
        self.backend.chain_mut()
    }

    /// Whether the guest cannot write it.
    pub fn is_read_only(&self) -> bool {
        self.read_only
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

    fn config_space(&self) -> Vec<u8> {
        // Nothing in it is writable without CONFIG_WCE, and the capacity is fixed.
        self.config.to_vec()
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
            // A device restored in DEVICE_NEEDS_RESET stays stopped until the driver resets it.
            broken: interrupt.needs_reset(),
            interrupt,
            queue: VirtQueue::new(queue, LIMITS),
        });
        // Requests may have been queued before DRIVER_OK: the event loop serves them.
        let _ = self.queue_evt.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .map(|a| a.queue.queue().state())
            .collect()
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

/// A block device's saved state: what identifies the disk it served, checked against the
/// backend on restore. Its queue is the transport's ([`super::mmio::MmioState`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Read-only.
    pub read_only: bool,
    /// What GET_ID returns.
    pub id: String,
    /// The features offered.
    pub features: u64,
}

/// What a block device is restored on.
pub struct BlockResources {
    /// The disk.
    pub backend: Box<dyn BlockBackend>,
}

impl Persist for Block {
    type State = BlockState;
    type Resources = BlockResources;
    type Error = StateError;

    fn save(&self) -> BlockState {
        BlockState {
            capacity: self.backend.capacity(),
            read_only: self.read_only,
            id: self.name(),
            features: self.features,
        }
    }

    fn restore(r: BlockResources, state: &BlockState) -> Result<Self, StateError> {
        check(state.id.len() <= request::ID_LEN, "id", || {
            format!("{} bytes, more than {}", state.id.len(), request::ID_LEN)
        })?;
        let capacity = r.backend.capacity();
        check(state.capacity == capacity, "capacity", || {
            format!("{} bytes but the disk has {capacity}", state.capacity)
        })?;
        let block = Block::new(r.backend, state.read_only, &state.id)
            .map_err(|e| StateError::new("queue_evt", e.to_string()))?;
        check(state.features == block.features, "features", || {
            format!(
                "{:#x} but the device offers {:#x}",
                state.features, block.features
            )
        })?;
        Ok(block)
    }
}
