//! Building a KVM VM from a [`VmConfig`] and tearing it down.
//!
//! [`Platform`] holds what outlives one boot of the guest: the KVM handle, the CPUID KVM
//! supports, and the serial console (so a reboot keeps the user's terminal). [`Vm::boot`]
//! builds everything else afresh — VM fd, RAM, irqchip and PIT, kernel, ACPI, devices and vCPU
//! threads — which is how a reboot "restarts the guest from its kernel".
//!
//! Building is a series of steps: create the KVM VM on the memory with irqchip and PIT2
//! (`create_vm`), attach the devices (`attach_devices`), load the boot image (kernel, initrd,
//! command line, ACPI, zero page: `load_boot_image`), create the vCPUs (`create_vcpus`),
//! configure them for a cold boot (`configure_boot_vcpus`), spawn their threads
//! (`Vm::spawn`). A restore ([`Vm::restore_from`], in `vm/state.rs`) runs the same steps but
//! the loading and the boot configuration, on the memory the state was saved with, and
//! rebuilds the devices from their saved state (`device_manager::restore`) instead of
//! attaching new ones.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::{Bus, BusError, SharedDevice};
use devices::legacy::{
    self, AcpiPm, PvPanic, ResetControl, Serial, ACPI_SLEEP_CONTROL_PORT, COM1_IRQ, COM1_PORT,
    I8042_PORT, PVPANIC_PORT, RESET_CONTROL_PORT,
};
use devices::{GuestEvent, GuestEventSink};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{acpi, boot_params, cpuid, layout, msr, regs};
use crate::config::VmConfig;
use crate::console::ConsoleOutput;
use crate::device_manager::{self, VirtioDevices};
use crate::loader;
use crate::memory::{self, GuestMemory};
use crate::vcpu::{
    ask_all, expect_reply, pause_all, resume_all_after_failure, ReportSink, VcpuHandle, VcpuReply,
    VcpuReport, VcpuRequest, VcpuSetup, REPLY_DEADLINE,
};
use crate::vstate::vcpu::{StateCaps, VcpuStateError};

mod state;
pub use state::{RestoreError, SaveError, VmSnapshotState};

/// Something the VMM's control loop must act on.
#[derive(Debug)]
pub enum VmEvent {
    /// A device of VM generation `.0` reported a guest request.
    Guest(u64, GuestEvent),
    /// A vCPU of VM generation `.0` stopped.
    Vcpu(u64, VcpuReport),
    /// The user asked to quit from the console.
    Quit,
    /// A call from the API server.
    Api(api::ApiCall),
    /// The guest was asked to shut down: answer this call once it is off.
    AwaitPowerOff(api::Responder),
    /// A device thread of VM generation `.0` died; the VM cannot go on.
    DeviceFailed(u64, devices::virtio::DeviceFailure),
    /// The new active layers VM generation `.0` runs on were recorded durably, or recording
    /// them failed: its disks, held until then, may run (see `Machine::settle_held`).
    LayersRecorded(u64),
}

impl VmEvent {
    /// The generation of the VM that sent it, for events a VM sends: every VM the machine
    /// builds (boot, reboot, apply, restore) has a new one, so events of a VM that is gone are
    /// told apart from those of the one that runs.
    pub fn generation(&self) -> Option<u64> {
        match self {
            Self::Guest(g, _)
            | Self::Vcpu(g, _)
            | Self::DeviceFailed(g, _)
            | Self::LayersRecorded(g) => Some(*g),
            Self::Quit | Self::Api(_) | Self::AwaitPowerOff(_) => None,
        }
    }
}

/// Where a VM sends its events: the control loop's channel, tagged with the VM's generation.
#[derive(Clone)]
pub struct EventTx {
    /// The channel.
    pub tx: Sender<VmEvent>,
    /// The generation of the VM these events come from.
    pub generation: u64,
}

impl EventTx {
    /// Events of VM generation `generation` into `tx`.
    pub fn new(tx: &Sender<VmEvent>, generation: u64) -> Self {
        Self {
            tx: tx.clone(),
            generation,
        }
    }
}

/// Why a pause or resume failed. A pause that fails leaves the VM running, never half paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// A vCPU did not answer.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// A device thread is gone.
    #[error(transparent)]
    Device(#[from] devices::virtio::LoopError),
}

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability Strata needs.
    #[error("KVM lacks the {0} capability that Strata needs")]
    MissingCap(&'static str),
    /// A KVM call failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than this KVM allows.
    #[error("this KVM allows at most {max} vCPUs; {wanted} were asked for")]
    TooManyVcpus {
        /// What KVM allows.
        max: usize,
        /// What was asked for.
        wanted: u8,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The zero page.
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    /// vCPU registers.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MSRs.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// Device placement.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// virtio devices.
    #[error(transparent)]
    Devices(#[from] device_manager::DeviceError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// Probing what vCPU state this KVM saves and restores.
    #[error("cannot probe which vCPU state KVM saves and restores")]
    StateCaps(#[from] VcpuStateError),
    /// Host resources (eventfds).
    #[error("{what} failed")]
    Io {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// When Strata exits, how long writing out the buffered console output may go on without the
/// reader taking any of it ...
const CONSOLE_FLUSH_STALL: Duration = Duration::from_secs(1);
/// ... and how long it may take at most.
const CONSOLE_FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// What outlives a guest reboot.
pub struct Platform {
    kvm: Kvm,
    supported_cpuid: CpuId,
    serial: Arc<Mutex<Serial>>,
    serial_irq: EventFd,
    console: ConsoleOutput,
    /// The probe of what vCPU state this KVM saves, started in the background when the
    /// platform is made (it builds and tears down a scratch VM, tens of milliseconds here),
    /// so that a restore or a boot does not wait for it in line.
    caps_probe: Mutex<Option<CapsProbe>>,
}

/// The answer of the background probe of [`StateCaps`] (sent before its scratch VM is torn
/// down).
type CapsProbe = std::sync::mpsc::Receiver<Result<Arc<StateCaps>, VcpuStateError>>;

impl Platform {
    /// Opens KVM, checks its capabilities and creates the console UART writing to `console`.
    pub fn new(console: ConsoleOutput) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::Pit2, "PIT2"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::ExtCpuid, "EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let serial_irq = legacy::irq_eventfd().map_err(|source| VmError::Io {
            what: "creating the serial interrupt eventfd",
            source,
        })?;
        let serial =
            Serial::new(&serial_irq, Box::new(console.clone())).map_err(|source| VmError::Io {
                what: "creating the serial port",
                source,
            })?;
        let probe = {
            let cpuid = supported_cpuid.clone();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name("kvm-probe".into())
                .spawn(move || {
                    crate::sandbox::enter(crate::sandbox::ThreadKind::Probe);
                    let kvm = match Kvm::new() {
                        Ok(kvm) => kvm,
                        Err(source) => {
                            let _ = tx.send(Err(VcpuStateError::Kvm {
                                what: "opening /dev/kvm (probe)",
                                source,
                            }));
                            return;
                        }
                    };
                    let sent = tx.clone();
                    let publish = move |caps: &Arc<StateCaps>| {
                        let _ = sent.send(Ok(caps.clone()));
                    };
                    if let Err(e) = StateCaps::get_then(&kvm, &cpuid, publish) {
                        let _ = tx.send(Err(e));
                    }
                })
                .ok()
                .map(|_| rx)
        };
        Ok(Self {
            kvm,
            supported_cpuid,
            serial: Arc::new(Mutex::new(serial)),
            serial_irq,
            console,
            caps_probe: Mutex::new(probe),
        })
    }

    /// Where the guest's console output goes (and how much of it was dropped).
    pub fn console(&self) -> &ConsoleOutput {
        &self.console
    }

    /// The console UART, for the input thread.
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// Resets the console UART's registers (on guest reboot).
    pub fn reset_serial(&self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = serial.reset() {
            log::warn!("serial reset: {e}");
        }
    }

    /// What a restore checks a state against before anything changes, without waiting for the
    /// probe ([`StateCaps::for_restore_check`]).
    pub fn restore_check_caps(&self) -> Result<Arc<StateCaps>, VmError> {
        Ok(StateCaps::for_restore_check(&self.kvm)?)
    }

    /// What this KVM can save and restore of a vCPU (probed once per process: the result of
    /// the background probe started by [`Platform::new`], or a probe now).
    pub fn state_caps(&self) -> Result<Arc<StateCaps>, VmError> {
        let probe = self
            .caps_probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(Ok(Ok(caps))) = probe.map(|rx| rx.recv()) {
            return Ok(caps);
        }
        Ok(StateCaps::get(&self.kvm, &self.supported_cpuid)?)
    }
}

impl Drop for Platform {
    /// Strata is exiting: writes out the buffered console output, waiting only while the
    /// reader takes it.
    fn drop(&mut self) {
        if !self.console.drain(CONSOLE_FLUSH_STALL, CONSOLE_FLUSH_LIMIT) {
            log::warn!("console output left unwritten: its reader stopped taking it");
        }
        self.console.close();
        let dropped = self.console.dropped_bytes();
        if dropped > 0 {
            log::warn!("{dropped} bytes of console output never reached the console");
        }
    }
}

/// A running VM.
pub struct Vm {
    // Field order is drop order: vCPU threads end before the VM fd and memory go away.
    vcpus: Vec<VcpuHandle>,
    virtio: VirtioDevices,
    legacy: Legacy,
    fd: VmFd,
    memory: GuestMemory,
}

fn register_memory(fd: &VmFd, memory: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| VmError::MissingCap("host-mapped guest memory"))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `memory`, which the `Vm` keeps alive for as long as
        // the VM fd exists (fields drop in order: vCPUs, VM fd, then memory).
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The legacy devices whose state a VM saves besides the serial port (which the [`Platform`]
/// owns).
struct Legacy {
    i8042: Arc<Mutex<legacy::I8042>>,
    reset_control: Arc<Mutex<ResetControl>>,
    /// Where they report guest requests (for restoring them).
    sink: GuestEventSink,
}

/// Puts the legacy devices on a new port bus.
fn legacy_bus(platform: &Platform, events: &EventTx) -> Result<(Bus, Legacy), VmError> {
    let tx = Mutex::new(events.tx.clone());
    let generation = events.generation;
    let sink: GuestEventSink = Arc::new(move |e| {
        let _ = tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(VmEvent::Guest(generation, e));
    });
    let legacy = Legacy {
        i8042: Arc::new(Mutex::new(legacy::I8042::new(sink.clone()))),
        reset_control: Arc::new(Mutex::new(ResetControl::new(sink.clone()))),
        sink: sink.clone(),
    };
    let mut pio = Bus::new();
    let serial: SharedDevice = platform.serial.clone();
    pio.insert(serial, COM1_PORT.into(), 8)?;
    pio.insert(legacy.i8042.clone(), I8042_PORT.into(), 5)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(sink.clone()))),
        ACPI_SLEEP_CONTROL_PORT.into(),
        2,
    )?;
    pio.insert(legacy.reset_control.clone(), RESET_CONTROL_PORT.into(), 1)?;
    pio.insert(
        Arc::new(Mutex::new(PvPanic::new(sink))),
        PVPANIC_PORT.into(),
        1,
    )?;
    Ok((pio, legacy))
}

/// Step 1 of building a VM: a KVM VM on `memory` with the in-kernel irqchip and PIT2.
fn create_vm(
    platform: &Platform,
    config: &VmConfig,
    memory: &GuestMemory,
) -> Result<VmFd, VmError> {
    let max = platform.kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max {
        return Err(VmError::TooManyVcpus {
            max,
            wanted: config.vcpus,
        });
    }
    let fd = platform.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    register_memory(&fd, memory)?;
    fd.set_tss_address(layout::KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    fd.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    fd.register_irqfd(&platform.serial_irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    Ok(fd)
}

/// Step 2: the virtio devices of `config`, their threads started; a device thread that dies
/// sends [`VmEvent::DeviceFailed`].
fn attach_devices(
    fd: &VmFd,
    memory: &GuestMemory,
    config: &VmConfig,
    events: &EventTx,
) -> Result<VirtioDevices, VmError> {
    Ok(device_manager::create(
        fd,
        memory,
        &config.disks,
        config.vsock.as_ref(),
        failure_sink(events),
    )?)
}

/// Where device threads report their death: [`VmEvent::DeviceFailed`] on `events`.
fn failure_sink(events: &EventTx) -> devices::virtio::FailureSink {
    let failures = Mutex::new(events.tx.clone());
    let generation = events.generation;
    Arc::new(move |f| {
        let _ = failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(VmEvent::DeviceFailed(generation, f));
    })
}

/// Step 3 (cold boot only): kernel, initrd, command line, ACPI tables and zero page into
/// `memory`; returns the kernel's entry point.
fn load_boot_image(
    config: &VmConfig,
    memory: &GuestMemory,
    virtio: &VirtioDevices,
) -> Result<vm_memory::GuestAddress, VmError> {
    let kernel = loader::load_kernel(memory, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => {
            // A bzImage says how high its initrd may go; 2 GiB - 1 is the boot protocol's
            // default for kernels that do not.
            let max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(0x7fff_ffff);
            let low_ram = config.memory.min(layout::MMIO_HOLE_START);
            let r = loader::load_initrd(memory, path, low_ram, kernel.end, max)?;
            Some((r.addr, r.size))
        }
        None => None,
    };
    let mut cmdline = config.cmdline.clone();
    for entry in &virtio.cmdline {
        cmdline.push(' ');
        cmdline.push_str(entry);
    }
    let cmdline_size = loader::load_cmdline(memory, &cmdline)?;
    let rsdp = acpi::write_tables(
        memory,
        &acpi::AcpiConfig {
            vcpus: config.vcpus,
            devices: &virtio.acpi,
        },
    )?;
    let params = boot_params::build(
        &boot_params::BootInfo {
            mem_size: config.memory,
            cmdline_size,
            rsdp,
            initrd,
        },
        kernel.setup_header,
    )?;
    boot_params::write(memory, &params)?;
    Ok(kernel.entry)
}

/// Step 4: the KVM vCPUs (not yet configured).
fn create_vcpus(fd: &VmFd, config: &VmConfig) -> Result<Vec<VcpuFd>, VmError> {
    (0..config.vcpus)
        .map(|index| {
            fd.create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))
        })
        .collect()
}

/// Step 5 (cold boot only): CPUID, boot MSRs, LAPIC, and the boot vCPU's entry registers.
fn configure_boot_vcpus(
    platform: &Platform,
    config: &VmConfig,
    fds: &[VcpuFd],
    memory: &GuestMemory,
    entry: vm_memory::GuestAddress,
) -> Result<(), VmError> {
    let Some(first) = fds.first() else {
        return Ok(());
    };
    let tsc = cpuid::Tsc {
        khz: first.get_tsc_khz().ok().filter(|&k| k > 0),
        writable: msr::tsc_is_writable(first),
    };
    if !tsc.writable {
        log::debug!("KVM does not set the guest's TSC: invariant TSC hidden, kvmclock keeps time");
    }
    let boot_msrs = msr::accepted_boot_msrs(&platform.kvm, first)?;
    let topology = cpuid::Topology {
        vcpus: config.vcpus,
    };
    for (index, vcpu) in fds.iter().enumerate() {
        let id = index as u8;
        let cpuid = cpuid::for_vcpu(&platform.supported_cpuid, id, topology, tsc);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        msr::set(vcpu, &boot_msrs)?;
        regs::setup_lapic(vcpu)?;
        if index == 0 {
            regs::setup_boot_vcpu(vcpu, memory, entry)?;
        }
    }
    Ok(())
}

/// The pieces of a VM before its vCPU threads run.
struct Parts {
    fd: VmFd,
    memory: GuestMemory,
    virtio: VirtioDevices,
    vcpus: Vec<VcpuFd>,
}

impl Vm {
    /// Builds the VM described by `config` and starts its vCPUs; events go to `events`.
    pub fn boot(platform: &Platform, config: &VmConfig, events: &EventTx) -> Result<Self, VmError> {
        let caps = platform.state_caps()?;
        let memory = memory::create(config.memory)?;
        let fd = create_vm(platform, config, &memory)?;
        let virtio = attach_devices(&fd, &memory, config, events)?;
        let entry = load_boot_image(config, &memory, &virtio)?;
        let vcpus = create_vcpus(&fd, config)?;
        configure_boot_vcpus(platform, config, &vcpus, &memory, entry)?;
        let parts = Parts {
            fd,
            memory,
            virtio,
            vcpus,
        };
        Self::spawn(platform, parts, caps, events, false)
    }

    /// Step 6: a vCPU thread for each vCPU, running the guest or (`paused`) waiting for a
    /// restore and a resume.
    fn spawn(
        platform: &Platform,
        parts: Parts,
        caps: Arc<StateCaps>,
        events: &EventTx,
        paused: bool,
    ) -> Result<Self, VmError> {
        let (pio, legacy) = legacy_bus(platform, events)?;
        let mmio = parts.virtio.mmio.clone();
        let tx = Mutex::new(events.tx.clone());
        let generation = events.generation;
        let reports: ReportSink = Arc::new(move |r| {
            let _ = tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(VmEvent::Vcpu(generation, r));
        });
        let mut vm = Self {
            vcpus: Vec::with_capacity(parts.vcpus.len()),
            virtio: parts.virtio,
            legacy,
            fd: parts.fd,
            memory: parts.memory,
        };
        for (index, fd) in parts.vcpus.into_iter().enumerate() {
            let handle = VcpuHandle::spawn(VcpuSetup {
                index: index as u8,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                reports: reports.clone(),
                caps: caps.clone(),
                start_paused: paused,
            });
            match handle {
                Ok(h) => vm.vcpus.push(h),
                Err(e) => {
                    vm.shutdown();
                    return Err(e.into());
                }
            }
        }
        Ok(vm)
    }

    /// Stops every vCPU — all are asked at once, then every reply is awaited — and returns
    /// once all are out of the guest with their state committed; then parks every device
    /// thread (no device touches guest memory until resumed).
    ///
    /// A pause that cannot complete (a vCPU does not answer within
    /// [`crate::vcpu::REPLY_DEADLINE`], or its thread is gone, or a device thread is dead)
    /// resumes everything that did pause and says which vCPU or device failed and why: the VM
    /// is never left half paused.
    pub fn pause(&self) -> Result<(), PauseError> {
        pause_all(&self.vcpus, REPLY_DEADLINE)?;
        if let Err(e) = self.virtio.pause() {
            resume_all_after_failure(&self.vcpus, REPLY_DEADLINE, "undoing a pause");
            return Err(e.into());
        }
        Ok(())
    }

    /// Lets the device threads, then every vCPU, run again. If a vCPU cannot be resumed, the
    /// VM is paused again (devices too) and the error says which vCPU and why.
    pub fn resume(&self) -> Result<(), PauseError> {
        self.resume_inner(false)
    }

    /// [`Vm::resume`], except the disks' device threads, which stay paused until
    /// [`VirtioDevices::resume_disks`]: the guest runs, and its disk requests wait (for new
    /// layers to become durable, say).
    pub fn resume_holding_disks(&self) -> Result<(), PauseError> {
        self.resume_inner(true)
    }

    fn resume_inner(&self, hold_disks: bool) -> Result<(), PauseError> {
        if hold_disks {
            self.virtio.resume_except_disks()?;
        } else {
            self.virtio.resume()?;
        }
        let replies = ask_all(&self.vcpus, |_| VcpuRequest::Resume);
        let mut failure = None;
        for (v, reply) in self.vcpus.iter().zip(replies) {
            let r = expect_reply(v.index(), "resume", reply, |r| match r {
                VcpuReply::Resumed => Ok(()),
                other => Err(other),
            });
            if let (Err(e), None) = (r, &failure) {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            for (v, reply) in self
                .vcpus
                .iter()
                .zip(ask_all(&self.vcpus, |_| VcpuRequest::Pause))
            {
                if let Err(e) = reply {
                    log::warn!("undoing a resume: vCPU {}: {e}", v.index());
                }
            }
            if let Err(e) = self.virtio.pause() {
                log::warn!("undoing a resume: {e}");
            }
            return Err(PauseError::Vcpu(e));
        }
        Ok(())
    }

    /// The virtio devices.
    pub fn virtio_devices(&self) -> &VirtioDevices {
        &self.virtio
    }

    /// Stops every vCPU thread and releases the VM.
    pub fn shutdown(mut self) {
        for v in &self.vcpus {
            let _ = v.ask(VcpuRequest::Exit);
        }
        for v in self.vcpus.drain(..) {
            v.exit();
        }
        self.virtio.stop();
    }
}
