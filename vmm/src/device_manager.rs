//! Places virtio-mmio devices: MMIO windows, interrupt lines, KVM ioeventfds and irqfds, their
//! event loops, and how the guest learns of them (ACPI DSDT entries and `virtio_mmio.device=`
//! command-line entries, for kernels that find devices either way).
//!
//! Each device gets its own event loop thread and mailbox (see `devices::virtio` for the
//! threading model). [`VirtioDevices::pause`] parks every device thread (a checkpoint pauses
//! the vCPUs first, then the devices); a device thread that dies reports it through the
//! [`FailureSink`] given to [`create`].
//!
//! Layout: transport `i` has its registers at `0xd000_0000 + i * 4 KiB` and interrupt line
//! (IOAPIC pin / GSI) `5 + i`. Disks come first, in `--disk` order, then the vsock device.
//!
//! # Saving and restoring
//!
//! [`VirtioDevices`] keeps, per transport, the transport, the device behind it, its kind and
//! its index (the `--disk` position; 0 for the vsock device). [`VirtioDevices::save`] (devices
//! paused) returns one [`VirtioDeviceState`] per transport in that order: the transport's
//! registers and queues ([`MmioState`]) and the device's own state. [`restore`] rebuilds each
//! device from its state plus fresh resources — the disk chain re-opened from the
//! configuration, new eventfds registered as irqfd and ioeventfds on the new VM fd, the vsock
//! listener bound again on its socket path, a new event loop — and leaves every device thread
//! paused. The activation a restored, active transport posts is carried out by
//! [`VirtioDevices::finish_restore`] on the caller's thread once the vCPUs and the irqchip hold
//! their restored state, so that the interrupt a restored vsock raises for its
//! TRANSPORT_RESET event (its connections did not survive) lands on the restored irqchip;
//! [`VirtioDevices::resume`] then lets the threads run. Host connections of the vsock device
//! are not saved: the guest is told through that event.
//!
//! The saved list is checked against the configuration before anything is built
//! ([`check_states`]): as many devices, of the same kinds, in the same order, with the same
//! read-only setting and guest CID; a mismatch is an error naming the device
//! (`devices[1]`, `devices[2].device.cid`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::{Bus, BusError};
use devices::virtio::block::{self, Block, BlockResources, BlockState, ChainBackend};
use devices::virtio::mmio::{MmioResources, MmioState, MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::vsock::{self, Vsock, VsockResources, VsockState};
use devices::virtio::{
    EventLoop, FailureSink, GuestMemory, Interrupt, LoopError, Mailbox, VirtioDevice,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use snapshot::{check, Persist, StateError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi;
use crate::config::{DiskConfig, VsockConfig};

/// Where the first virtio-mmio window is.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The first interrupt line for virtio devices (COM1 has 4).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The last usable IOAPIC pin.
const LAST_IRQ: u32 = 23;

/// Errors while adding devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A disk image cannot be opened (the error names the file).
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    /// A disk's size is not a whole number of sectors.
    #[error("disk {path} is {size} bytes, not a multiple of 512")]
    DiskSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The vsock device cannot listen on its socket.
    #[error("cannot create the vsock socket {path}")]
    Vsock {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No interrupt lines are left.
    #[error("too many virtio devices: no interrupt line left")]
    NoIrq,
    /// A KVM call failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Host resources.
    #[error("{what} failed")]
    Io {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Bus placement.
    #[error("cannot place a device on the MMIO bus")]
    Bus(#[from] BusError),
    /// A saved device state cannot be restored (the error names the device and field).
    #[error(transparent)]
    State(#[from] StateError),
    /// The vsock device's host socket.
    #[error(transparent)]
    VsockSocket(#[from] api::socket::SocketError),
    /// A restored device's thread could not be parked.
    #[error("cannot pause the restored device")]
    Pause(#[from] LoopError),
    /// A disk could not be switched to a new layer (every disk was put back).
    #[error("cannot put a new layer {path} on disk {index}")]
    Switch {
        /// The disk's `--disk` position.
        index: u32,
        /// The new layer.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device threads run: pause the VM first.
    #[error(transparent)]
    NotPaused(#[from] NotPaused),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Io { what, source }
}

/// Locks a mutex, taking over one a panicking thread left poisoned (the data is plain state).
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kind of device behind a transport.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-vsock.
    Vsock,
}

impl DeviceKind {
    /// The virtio device id.
    fn device_type(self) -> u32 {
        match self {
            Self::Block => block::DEVICE_TYPE,
            Self::Vsock => vsock::DEVICE_TYPE,
        }
    }

    /// How the device is named in errors and thread names.
    fn describe(self, index: u32) -> String {
        match self {
            Self::Block => format!("disk {index}"),
            Self::Vsock => "the vsock device".to_string(),
        }
    }
}

/// The device behind a transport.
#[derive(Clone)]
pub enum DeviceHandle {
    /// A disk.
    Block(Arc<Mutex<Block>>),
    /// The vsock device.
    Vsock(Arc<Mutex<Vsock>>),
}

impl DeviceHandle {
    /// Its kind.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Self::Block(_) => DeviceKind::Block,
            Self::Vsock(_) => DeviceKind::Vsock,
        }
    }

    fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Self::Block(d) => d.clone(),
            Self::Vsock(d) => d.clone(),
        }
    }

    fn save(&self) -> DeviceState {
        match self {
            Self::Block(d) => DeviceState::Block(lock(d).save()),
            Self::Vsock(d) => DeviceState::Vsock(lock(d).save()),
        }
    }
}

/// A device's own saved state, tagged with its kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    /// A disk.
    Block(BlockState),
    /// The vsock device.
    Vsock(VsockState),
}

impl DeviceState {
    /// Its kind.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Self::Block(_) => DeviceKind::Block,
            Self::Vsock(_) => DeviceKind::Vsock,
        }
    }
}

/// One transport's saved state and that of the device behind it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VirtioDeviceState {
    /// The device's index among those of its kind: the `--disk` position, 0 for vsock.
    pub index: u32,
    /// Registers, interrupt status and queues.
    pub transport: MmioState,
    /// The device.
    pub device: DeviceState,
}

/// One transport and what serves it.
pub struct VirtioSlot {
    index: u32,
    transport: Arc<Mutex<MmioTransport>>,
    device: DeviceHandle,
    mailbox: Arc<Mailbox>,
    // Dropping it stops the device thread.
    event_loop: EventLoop,
}

impl VirtioSlot {
    /// The device's kind.
    pub fn kind(&self) -> DeviceKind {
        self.device.kind()
    }

    /// Its index among the devices of its kind (the `--disk` position; 0 for vsock).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device.
    pub fn device(&self) -> &DeviceHandle {
        &self.device
    }

    /// The transport the guest drives.
    pub fn transport(&self) -> &Arc<Mutex<MmioTransport>> {
        &self.transport
    }

    /// The name of its device thread (`virtio-blk0`, `virtio-vsock`).
    pub fn name(&self) -> &str {
        self.event_loop.name()
    }
}

/// A device that was not paused when its state was asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("device {0} is running; pause the VM first")]
pub struct NotPaused(pub String);

/// The virtio devices of one VM.
pub struct VirtioDevices {
    /// The MMIO bus the transports are on.
    pub mmio: Bus,
    /// DSDT `Device` objects, one per transport.
    pub acpi: Vec<Vec<u8>>,
    /// `virtio_mmio.device=` entries to append to the command line.
    pub cmdline: Vec<String>,
    /// Every transport, in slot order: disks in `--disk` order, then vsock.
    slots: Vec<VirtioSlot>,
    /// The vsock device's socket file, removed when the devices go.
    vsock_socket: Option<api::socket::SocketFile>,
}

impl Drop for VirtioDevices {
    fn drop(&mut self) {
        // Device threads first: nothing accepts on the socket once its file is gone.
        self.slots.clear();
        if let Some(f) = self.vsock_socket.take() {
            f.remove_file();
        }
    }
}

impl VirtioDevices {
    fn empty() -> Self {
        Self {
            mmio: Bus::new(),
            acpi: Vec::new(),
            cmdline: Vec::new(),
            slots: Vec::new(),
            vsock_socket: None,
        }
    }

    /// Every transport with its device, in slot order.
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    /// The vsock device, if there is one.
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.slots.iter().find_map(|s| match &s.device {
            DeviceHandle::Vsock(v) => Some(v),
            DeviceHandle::Block(_) => None,
        })
    }

    /// Stops every device's event loop.
    pub fn stop(&mut self) {
        self.slots.clear();
    }

    /// Parks every device thread once it has finished what it was doing; from then on no
    /// device touches guest memory, its rings or its host sockets until [`Self::resume`]. If
    /// one cannot be paused (its thread died), the others run again and the error says which.
    pub fn pause(&self) -> Result<(), LoopError> {
        for (i, s) in self.slots.iter().enumerate() {
            if let Err(e) = s.event_loop.pause() {
                for paused in &self.slots[..i] {
                    let _ = paused.event_loop.resume();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Parks the disks' device threads only (a production checkpoint: the vCPUs and the vsock
    /// device, which carries the agent's connection, run on). Each finishes the request it is
    /// serving first. If one cannot be paused, the others run again.
    pub fn pause_disks(&self) -> Result<(), LoopError> {
        let disks: Vec<&VirtioSlot> = self
            .slots
            .iter()
            .filter(|s| s.kind() == DeviceKind::Block)
            .collect();
        for (i, s) in disks.iter().enumerate() {
            if let Err(e) = s.event_loop.pause() {
                for paused in &disks[..i] {
                    let _ = paused.event_loop.resume();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Lets the disks' device threads run again.
    pub fn resume_disks(&self) -> Result<(), LoopError> {
        let mut result = Ok(());
        for s in self.slots.iter().filter(|s| s.kind() == DeviceKind::Block) {
            if let Err(e) = s.event_loop.resume() {
                result = Err(e);
            }
        }
        result
    }

    /// Whether every disk's device thread is parked (the VM is paused, or its disks are held).
    pub fn disks_paused(&self) -> bool {
        self.slots
            .iter()
            .filter(|s| s.kind() == DeviceKind::Block)
            .all(|s| s.event_loop.is_paused())
    }

    /// Lets every device thread but the disks' run again.
    pub fn resume_except_disks(&self) -> Result<(), LoopError> {
        let mut result = Ok(());
        for s in self.slots.iter().filter(|s| s.kind() != DeviceKind::Block) {
            if let Err(e) = s.event_loop.resume() {
                result = Err(e);
            }
        }
        result
    }

    /// Lets every device thread run again.
    pub fn resume(&self) -> Result<(), LoopError> {
        let mut result = Ok(());
        for s in &self.slots {
            if let Err(e) = s.event_loop.resume() {
                result = Err(e);
            }
        }
        result
    }

    /// Every transport's and device's state, in slot order. Every device thread must be
    /// paused ([`Self::pause`]): one that is not is named.
    pub fn save(&self) -> Result<Vec<VirtioDeviceState>, NotPaused> {
        if let Some(running) = self.slots.iter().find(|s| !s.event_loop.is_paused()) {
            return Err(NotPaused(running.name().to_string()));
        }
        Ok(self
            .slots
            .iter()
            .map(|s| {
                // The transport locks its device to read the live queues: take its state
                // first, never while holding the device.
                let transport = lock(&s.transport).save();
                VirtioDeviceState {
                    index: s.index,
                    transport,
                    device: s.device.save(),
                }
            })
            .collect())
    }

    /// Per disk in `--disk` order, the file each one writes now (its chain's top).
    pub fn disk_tops(&self) -> Vec<Option<PathBuf>> {
        self.slots
            .iter()
            .filter_map(|s| match &s.device {
                DeviceHandle::Block(d) => Some(lock(d).top_path()),
                DeviceHandle::Vsock(_) => None,
            })
            .collect()
    }

    /// Switches disks to new empty layers at one instant: per disk in `--disk` order, `Some`
    /// puts a new layer at that path on top (flushing the disk first), `None` leaves it as it
    /// is (a read-only disk). Every disk's device thread must be paused, so no request is in
    /// flight.
    /// All or nothing: if one disk fails, those already switched take their new layer off
    /// again, and the error names the disk.
    pub fn switch_disks(&self, layers: &[Option<PathBuf>]) -> Result<(), DeviceError> {
        if let Some(running) = self
            .slots
            .iter()
            .find(|s| s.kind() == DeviceKind::Block && !s.event_loop.is_paused())
        {
            return Err(NotPaused(running.name().to_string()).into());
        }
        let disks: Vec<&Arc<Mutex<Block>>> = self
            .slots
            .iter()
            .filter_map(|s| match &s.device {
                DeviceHandle::Block(d) => Some(d),
                DeviceHandle::Vsock(_) => None,
            })
            .collect();
        let mut done: Vec<&Arc<Mutex<Block>>> = Vec::new();
        for (index, (disk, layer)) in disks.iter().zip(layers).enumerate() {
            let Some(path) = layer else { continue };
            if let Err(source) = lock(disk).push_layer(path) {
                for d in done.iter().rev() {
                    if let Err(e) = lock(d).pop_layer() {
                        log::error!("putting a disk back after a failed switch: {e}");
                    }
                }
                return Err(DeviceError::Switch {
                    index: index as u32,
                    path: path.clone(),
                    source,
                });
            }
            done.push(disk);
        }
        Ok(())
    }

    /// Runs `f` on the open chain of disk `index` (its `--disk` position) under the device's
    /// lock, between two of the guest's requests; `None` if there is no such disk or it has no
    /// chain.
    pub fn with_disk_chain<R>(
        &self,
        index: u32,
        f: impl FnOnce(&mut disk::Chain) -> R,
    ) -> Option<R> {
        let disk = self.slots.iter().find_map(|s| match &s.device {
            DeviceHandle::Block(d) if s.index == index => Some(d),
            _ => None,
        })?;
        let mut disk = lock(disk);
        disk.chain_mut().map(f)
    }

    /// Takes off the layers [`Self::switch_disks`] put on (`Some` entries), newest disk first;
    /// for a checkpoint that failed after its disks switched. Nothing may have been written.
    pub fn unswitch_disks(&self, layers: &[Option<PathBuf>]) -> Result<(), DeviceError> {
        let disks: Vec<(u32, &Arc<Mutex<Block>>)> = self
            .slots
            .iter()
            .filter_map(|s| match &s.device {
                DeviceHandle::Block(d) => Some((s.index, d)),
                DeviceHandle::Vsock(_) => None,
            })
            .collect();
        let mut result = Ok(());
        for ((index, disk), layer) in disks.iter().zip(layers).rev() {
            let Some(path) = layer else { continue };
            if let Err(source) = lock(disk).pop_layer() {
                result = Err(DeviceError::Switch {
                    index: *index,
                    path: path.clone(),
                    source,
                });
            }
        }
        result
    }

    /// After [`restore`], once the vCPUs and the irqchip hold their restored state: carries
    /// out, on this thread, what the restored transports posted to their (paused) device
    /// threads — the activation of every device the guest had running, with its live queues;
    /// a restored vsock device then puts TRANSPORT_RESET on its event queue and interrupts.
    /// The device threads stay paused until [`Self::resume`].
    pub fn finish_restore(&self) {
        for s in &self.slots {
            let device = s.device.virtio();
            s.mailbox.deliver(&mut *lock(&device));
        }
    }
}

/// Folders whose files the chains of this process's disks may name as parents, besides each
/// layer's own folder (and below): the folders of the launch disks, because a checkpoint
/// store's first layer sits above the user's launch disk, which lives anywhere. Filled by
/// [`trust_parent_dirs`] from the launch disks the VMM was given and its store recorded, never
/// from what a disk file says.
static PARENT_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Lets the chains this process opens for its disks name parents in `dirs` (added to those
/// trusted before).
pub fn trust_parent_dirs(dirs: impl IntoIterator<Item = PathBuf>) {
    let mut known = PARENT_DIRS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for d in dirs {
        if !known.contains(&d) {
            known.push(d);
        }
    }
}

/// The parent policy of the disks this process opens ([`trust_parent_dirs`]).
pub fn disk_parent_policy() -> disk::ParentPolicy {
    let known = PARENT_DIRS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    disk::ParentPolicy::with_dirs(known.iter().cloned())
}

/// Opens a disk image (raw, or the top layer of a Strata chain) as a block backend. The
/// `disk` crate locks it: a second VMM opening the same writable chain gets an error naming
/// the process that holds it. Parents outside each layer's folder are followed only into the
/// folders [`trust_parent_dirs`] named.
fn open_disk(disk: &DiskConfig) -> Result<ChainBackend, DeviceError> {
    let mut chain = disk::Chain::open_with(
        &disk.path,
        disk::OpenOptions {
            read_only: disk.read_only,
            format: None,
        },
        &disk_parent_policy(),
    )?;
    if let Some(bytes) = disk.l2_cache_size {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        chain.set_cache_limits(disk::CacheLimits::for_l2_bytes(bytes));
    }
    let size = chain.virtual_size();
    if size % 512 != 0 {
        return Err(DeviceError::DiskSize {
            path: disk.path.clone(),
            size,
        });
    }
    Ok(ChainBackend::new(chain))
}

/// The host side of the next transport slot: its window and interrupt line, an irqfd and one
/// ioeventfd per queue registered with KVM, and the device thread's mailbox.
struct Wiring {
    slot: usize,
    base: u64,
    irq: u32,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    mailbox: Arc<Mailbox>,
}

impl Wiring {
    fn new(vm: &VmFd, slot: usize, queue_evts: Vec<EventFd>) -> Result<Self, DeviceError> {
        let irq = u32::try_from(slot)
            .ok()
            .and_then(|s| VIRTIO_FIRST_IRQ.checked_add(s))
            .filter(|&irq| irq <= LAST_IRQ)
            .ok_or(DeviceError::NoIrq)?;
        let base = VIRTIO_MMIO_BASE + slot as u64 * MMIO_SIZE;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(io("creating an interrupt eventfd"))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|source| DeviceError::Kvm {
                what: "KVM_IRQFD",
                source,
            })?;
        for (queue, evt) in queue_evts.iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(|source| DeviceError::Kvm {
                what: "KVM_IOEVENTFD",
                source,
            })?;
        }
        Ok(Self {
            slot,
            base,
            irq,
            interrupt: Interrupt::new(irq_evt),
            queue_evts,
            mailbox: Mailbox::new().map_err(io("creating a device mailbox"))?,
        })
    }

    fn resources(
        &self,
        device: &DeviceHandle,
        mem: &GuestMemory,
    ) -> Result<MmioResources, DeviceError> {
        Ok(MmioResources {
            device: device.virtio(),
            mem: mem.clone(),
            interrupt: self.interrupt.clone(),
            queue_evts: self
                .queue_evts
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<_>>()
                .map_err(io("cloning queue eventfds"))?,
            mailbox: self.mailbox.clone(),
        })
    }
}

/// Starts the event loop serving `device` through `mailbox`.
fn start_loop(
    name: &str,
    device: &DeviceHandle,
    mailbox: Arc<Mailbox>,
    on_failure: FailureSink,
) -> Result<EventLoop, DeviceError> {
    match device {
        DeviceHandle::Block(d) => EventLoop::start(name, d.clone(), mailbox, on_failure),
        DeviceHandle::Vsock(d) => EventLoop::start(name, d.clone(), mailbox, on_failure),
    }
    .map_err(io("starting a device thread"))
}

/// The name of a device's thread.
fn loop_name(kind: DeviceKind, index: u32) -> String {
    match kind {
        DeviceKind::Block => format!("virtio-blk{index}"),
        DeviceKind::Vsock => "virtio-vsock".to_string(),
    }
}

impl VirtioDevices {
    /// Puts `transport` on its slot's window and records the slot.
    fn place(
        &mut self,
        w: &Wiring,
        index: u32,
        transport: MmioTransport,
        device: DeviceHandle,
        event_loop: EventLoop,
    ) -> Result<(), DeviceError> {
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), w.base, MMIO_SIZE)?;
        self.acpi
            .push(acpi::virtio_mmio_device(w.slot, w.base, MMIO_SIZE, w.irq));
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{:#x}:{}", w.base, w.irq));
        self.slots.push(VirtioSlot {
            index,
            transport,
            device,
            mailbox: w.mailbox.clone(),
            event_loop,
        });
        Ok(())
    }
}

/// The queue notification eventfds of a device.
fn queue_events(device: &DeviceHandle) -> Result<Vec<EventFd>, DeviceError> {
    match device {
        DeviceHandle::Block(d) => lock(d)
            .queue_event()
            .map(|e| vec![e])
            .map_err(io("cloning a queue eventfd")),
        DeviceHandle::Vsock(d) => lock(d)
            .queue_events()
            .map_err(io("cloning vsock queue eventfds")),
    }
}

/// What the configuration asks for, in slot order: (kind, index).
fn expected(disks: &[DiskConfig], vsock: Option<&VsockConfig>) -> Vec<(DeviceKind, u32)> {
    let mut out: Vec<(DeviceKind, u32)> = (0..disks.len())
        .map(|i| (DeviceKind::Block, i as u32))
        .collect();
    if vsock.is_some() {
        out.push((DeviceKind::Vsock, 0));
    }
    out
}

/// Creates the devices for `disks`, wires them into KVM and starts their threads; a device
/// thread that dies tells `on_failure`.
pub fn create(
    vm: &VmFd,
    mem: &GuestMemory,
    disks: &[DiskConfig],
    vsock: Option<&VsockConfig>,
    on_failure: FailureSink,
) -> Result<VirtioDevices, DeviceError> {
    let mut out = VirtioDevices::empty();
    for (index, disk) in disks.iter().enumerate() {
        let backend = open_disk(disk)?;
        let id = format!("strata-disk{index}");
        let block = Block::new(Box::new(backend), disk.read_only, &id)
            .map_err(io("creating a block device"))?;
        add(
            vm,
            mem,
            &mut out,
            index as u32,
            DeviceHandle::Block(Arc::new(Mutex::new(block))),
            on_failure.clone(),
        )?;
    }
    if let Some(cfg) = vsock {
        let listener = bind_vsock_socket(&mut out, cfg)?;
        let device =
            Vsock::with_listener(u64::from(cfg.cid), &cfg.socket, listener).map_err(|source| {
                DeviceError::Vsock {
                    path: cfg.socket.clone(),
                    source,
                }
            })?;
        add(
            vm,
            mem,
            &mut out,
            0,
            DeviceHandle::Vsock(Arc::new(Mutex::new(device))),
            on_failure,
        )?;
    }
    Ok(out)
}

/// Binds the vsock device's host socket: owner-only (0600) from the first moment, a stale
/// socket replaced, one another process listens on refused (so a second VM given the same path
/// cannot take the first one's agent traffic). The file is removed when the devices go.
fn bind_vsock_socket(
    out: &mut VirtioDevices,
    cfg: &VsockConfig,
) -> Result<std::os::unix::net::UnixListener, DeviceError> {
    let (listener, file) = api::socket::bind(&cfg.socket)?;
    out.vsock_socket = Some(file);
    Ok(listener)
}

/// Puts one new device on the next slot and starts its thread.
fn add(
    vm: &VmFd,
    mem: &GuestMemory,
    out: &mut VirtioDevices,
    index: u32,
    device: DeviceHandle,
    on_failure: FailureSink,
) -> Result<(), DeviceError> {
    let w = Wiring::new(vm, out.slots.len(), queue_events(&device)?)?;
    let transport = MmioTransport::new(w.resources(&device, mem)?);
    let name = loop_name(device.kind(), index);
    let event_loop = start_loop(&name, &device, w.mailbox.clone(), on_failure)?;
    out.place(&w, index, transport, device, event_loop)
}

/// Checks saved device states against the configuration: as many, of the same kinds and
/// indices, in slot order (disks in `--disk` order, then vsock); each transport of its
/// device's type; each disk as read-only as configured; the vsock device with the configured
/// guest CID. Fields are named from `devices` down.
pub fn check_states(
    states: &[VirtioDeviceState],
    disks: &[DiskConfig],
    vsock: Option<&VsockConfig>,
) -> Result<(), StateError> {
    let want = expected(disks, vsock);
    check(states.len() == want.len(), "devices", || {
        format!(
            "{} virtio devices saved but the configuration has {} ({} disks{})",
            states.len(),
            want.len(),
            disks.len(),
            if vsock.is_some() { " and vsock" } else { "" }
        )
    })?;
    for (i, (s, &(kind, index))) in states.iter().zip(&want).enumerate() {
        let field = format!("devices[{i}]");
        check(s.device.kind() == kind && s.index == index, &field, || {
            format!(
                "{} saved where the configuration has {}",
                s.device.kind().describe(s.index),
                kind.describe(index)
            )
        })?;
        check(
            s.transport.device_type == kind.device_type(),
            "transport.device_type",
            || {
                format!(
                    "{} but {} is of type {}",
                    s.transport.device_type,
                    kind.describe(index),
                    kind.device_type()
                )
            },
        )
        .map_err(|e| e.within(&field))?;
        match &s.device {
            DeviceState::Block(b) => {
                let read_only = disks.get(i).is_some_and(|d| d.read_only);
                check(b.read_only == read_only, "device.read_only", || {
                    format!(
                        "saved {} but disk {index} is configured {}",
                        b.read_only,
                        if read_only { "read-only" } else { "writable" }
                    )
                })
            }
            DeviceState::Vsock(v) => {
                let cid = vsock.map_or(0, |c| u64::from(c.cid));
                check(v.cid == cid, "device.cid", || {
                    format!("saved {} but the configuration has {cid}", v.cid)
                })
            }
        }
        .map_err(|e| e.within(&field))?;
    }
    Ok(())
}

/// Rebuilds the devices of `disks` and `vsock` from `states` (checked with [`check_states`]
/// first) on the new VM `vm` and the restored guest memory `mem`: each device from its state
/// and fresh resources, its transport from its state, a new event loop that is paused before
/// anything reaches it. Call [`VirtioDevices::finish_restore`] once the vCPUs hold their
/// state, then [`VirtioDevices::resume`].
pub fn restore(
    vm: &VmFd,
    mem: &GuestMemory,
    disks: &[DiskConfig],
    vsock: Option<&VsockConfig>,
    states: &[VirtioDeviceState],
    on_failure: FailureSink,
) -> Result<VirtioDevices, DeviceError> {
    check_states(states, disks, vsock)?;
    let mut out = VirtioDevices::empty();
    for (i, s) in states.iter().enumerate() {
        let field = format!("devices[{i}]");
        let device = match (&s.device, vsock) {
            (DeviceState::Block(state), _) => {
                let disk = disks.get(s.index as usize).ok_or_else(|| {
                    StateError::new(&field, format!("no disk {} is configured", s.index))
                })?;
                let resources = BlockResources {
                    backend: Box::new(open_disk(disk)?),
                };
                let block = Block::restore(resources, state)
                    .map_err(|e| e.within(format!("{field}.device")))?;
                DeviceHandle::Block(Arc::new(Mutex::new(block)))
            }
            (DeviceState::Vsock(state), Some(cfg)) => {
                let resources = VsockResources {
                    uds_path: cfg.socket.clone(),
                    listener: Some(bind_vsock_socket(&mut out, cfg)?),
                };
                let device = Vsock::restore(resources, state)
                    .map_err(|e| e.within(format!("{field}.device")))?;
                DeviceHandle::Vsock(Arc::new(Mutex::new(device)))
            }
            (DeviceState::Vsock(_), None) => {
                return Err(StateError::new(&field, "no vsock device is configured").into())
            }
        };
        let w = Wiring::new(vm, out.slots.len(), queue_events(&device)?)?;
        let name = loop_name(device.kind(), s.index);
        let event_loop = start_loop(&name, &device, w.mailbox.clone(), on_failure.clone())?;
        // Parked before the transport posts anything: the restored device neither activates
        // nor serves until `finish_restore` and `resume`.
        event_loop.pause()?;
        let transport = MmioTransport::restore(w.resources(&device, mem)?, &s.transport)
            .map_err(|e| e.within(format!("{field}.transport")))?;
        out.place(&w, s.index, transport, device, event_loop)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved state of `kind` with index `index` (check_states looks at no queue).
    fn state(kind: DeviceKind, index: u32) -> VirtioDeviceState {
        let transport = MmioState {
            device_type: kind.device_type(),
            device_features: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            needs_reset: false,
            active: false,
            queues: Vec::new(),
        };
        let device = match kind {
            DeviceKind::Block => DeviceState::Block(BlockState {
                capacity: 1 << 20,
                read_only: false,
                id: format!("strata-disk{index}"),
                features: 0,
            }),
            DeviceKind::Vsock => DeviceState::Vsock(VsockState {
                cid: 3,
                next_local_port: 1 << 30,
            }),
        };
        VirtioDeviceState {
            index,
            transport,
            device,
        }
    }

    type Corrupt = fn(&mut Vec<VirtioDeviceState>);

    #[test]
    fn saved_devices_must_match_the_configuration_and_a_mismatch_names_the_device() {
        let disks: Vec<DiskConfig> = (0..2)
            .map(|i| DiskConfig {
                path: PathBuf::from(format!("d{i}.raw")),
                read_only: false,
                l2_cache_size: None,
            })
            .collect();
        let vsock = VsockConfig {
            cid: 3,
            socket: PathBuf::from("v.sock"),
        };
        let good = vec![
            state(DeviceKind::Block, 0),
            state(DeviceKind::Block, 1),
            state(DeviceKind::Vsock, 0),
        ];
        let cases: [(Corrupt, &str); 7] = [
            (|s| drop(s.pop()), "devices"),
            (|s| s.push(state(DeviceKind::Block, 2)), "devices"),
            (|s| s.swap(1, 2), "devices[1]"),
            (|s| s[1].index = 0, "devices[1]"),
            (
                |s| s[0].transport.device_type = 19,
                "devices[0].transport.device_type",
            ),
            (
                |s| {
                    if let DeviceState::Block(b) = &mut s[1].device {
                        b.read_only = true;
                    }
                },
                "devices[1].device.read_only",
            ),
            (
                |s| {
                    if let DeviceState::Vsock(v) = &mut s[2].device {
                        v.cid = 9;
                    }
                },
                "devices[2].device.cid",
            ),
        ];

        let ok = check_states(&good, &disks, Some(&vsock));
        let without_vsock = check_states(&good[..2], &disks, None);
        let json = serde_json::to_string(&good).unwrap();
        let back: Vec<VirtioDeviceState> = serde_json::from_str(&json).unwrap();
        for (corrupt, field) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let err = check_states(&bad, &disks, Some(&vsock)).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        assert_eq!(ok, Ok(()));
        assert_eq!(without_vsock, Ok(()));
        assert_eq!(back, good);
        assert!(json.contains(r#""kind":"vsock""#), "{json}");
    }
}
