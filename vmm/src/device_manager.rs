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

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::virtio::block::{Block, ChainBackend};
use devices::virtio::mmio::{MmioResources, MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::{
    EventLoop, FailureSink, GuestMemory, Interrupt, LoopError, Mailbox, VirtioDevice,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi;
use crate::config::{DiskConfig, VsockConfig};
use devices::virtio::vsock::Vsock;

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
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Io { what, source }
}

/// The virtio devices of one VM.
pub struct VirtioDevices {
    /// The MMIO bus the transports are on.
    pub mmio: Bus,
    /// DSDT `Device` objects, one per transport.
    pub acpi: Vec<Vec<u8>>,
    /// `virtio_mmio.device=` entries to append to the command line.
    pub cmdline: Vec<String>,
    /// The vsock device, for transport resets.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    // Dropping these stops the device threads.
    loops: Vec<EventLoop>,
}

impl VirtioDevices {
    /// Stops every device's event loop.
    pub fn stop(&mut self) {
        self.loops.clear();
    }

    /// Parks every device thread once it has finished what it was doing; from then on no
    /// device touches guest memory, its rings or its host sockets until [`Self::resume`]. If
    /// one cannot be paused (its thread died), the others run again and the error says which.
    pub fn pause(&self) -> Result<(), LoopError> {
        for (i, l) in self.loops.iter().enumerate() {
            if let Err(e) = l.pause() {
                for paused in &self.loops[..i] {
                    let _ = paused.resume();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Lets every device thread run again.
    pub fn resume(&self) -> Result<(), LoopError> {
        let mut result = Ok(());
        for l in &self.loops {
            if let Err(e) = l.resume() {
                result = Err(e);
            }
        }
        result
    }
}

/// Opens a disk image (raw, or the top layer of a Strata chain) as a block backend. The
/// `disk` crate locks it: a second VMM opening the same writable chain gets an error naming
/// the process that holds it.
fn open_disk(disk: &DiskConfig) -> Result<ChainBackend, DeviceError> {
    let chain = disk::Chain::open(
        &disk.path,
        disk::OpenOptions {
            read_only: disk.read_only,
            format: None,
        },
    )?;
    let size = chain.virtual_size();
    if size % 512 != 0 {
        return Err(DeviceError::DiskSize {
            path: disk.path.clone(),
            size,
        });
    }
    Ok(ChainBackend::new(chain))
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
    let mut out = VirtioDevices {
        mmio: Bus::new(),
        acpi: Vec::new(),
        cmdline: Vec::new(),
        vsock: None,
        loops: Vec::new(),
    };
    for (index, disk) in disks.iter().enumerate() {
        let backend = open_disk(disk)?;
        let id = format!("strata-disk{index}");
        let block = Block::new(Box::new(backend), disk.read_only, &id)
            .map_err(io("creating a block device"))?;
        let queue_evt = block.queue_event().map_err(io("cloning a queue eventfd"))?;
        let block = Arc::new(Mutex::new(block));
        let mailbox = add(vm, mem, &mut out, block.clone(), vec![queue_evt])?;
        out.loops.push(
            EventLoop::start(
                &format!("virtio-blk{index}"),
                block,
                mailbox,
                on_failure.clone(),
            )
            .map_err(io("starting a device thread"))?,
        );
    }
    if let Some(cfg) = vsock {
        let device =
            Vsock::new(u64::from(cfg.cid), &cfg.socket).map_err(|source| DeviceError::Vsock {
                path: cfg.socket.clone(),
                source,
            })?;
        let queue_evts = device
            .queue_events()
            .map_err(io("cloning vsock queue eventfds"))?;
        let device = Arc::new(Mutex::new(device));
        let mailbox = add(vm, mem, &mut out, device.clone(), queue_evts)?;
        out.loops.push(
            EventLoop::start("virtio-vsock", device.clone(), mailbox, on_failure)
                .map_err(io("starting a device thread"))?,
        );
        out.vsock = Some(device);
    }
    Ok(out)
}

/// Puts one transport on the next slot; returns the mailbox its device thread serves.
fn add(
    vm: &VmFd,
    mem: &GuestMemory,
    out: &mut VirtioDevices,
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_evts: Vec<EventFd>,
) -> Result<Arc<Mailbox>, DeviceError> {
    let index = out.acpi.len();
    let irq = VIRTIO_FIRST_IRQ + index as u32;
    if irq > LAST_IRQ {
        return Err(DeviceError::NoIrq);
    }
    let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_SIZE;
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
    let mailbox = Mailbox::new().map_err(io("creating a device mailbox"))?;
    let transport = MmioTransport::new(MmioResources {
        device,
        mem: mem.clone(),
        interrupt: Interrupt::new(irq_evt),
        queue_evts,
        mailbox: mailbox.clone(),
    });
    out.mmio
        .insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)?;
    out.acpi
        .push(acpi::virtio_mmio_device(index, base, MMIO_SIZE, irq));
    out.cmdline
        .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    Ok(mailbox)
}
