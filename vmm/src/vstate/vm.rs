//! The VM-wide KVM state of a VM with an in-kernel irqchip: [`VmState`].
//!
//! Saved with `KVM_GET_IRQCHIP` for the PIC master, PIC slave and IOAPIC, `KVM_GET_PIT2` and
//! `KVM_GET_CLOCK` while every vCPU is paused; restored onto a fresh VM (irqchip and PIT2
//! created, no vCPU run yet) in Firecracker's order: PIT2, clock, then the three chips.
//! `KVM_SET_CLOCK` gets only the clock value: the flags `KVM_GET_CLOCK` returns
//! (`KVM_CLOCK_TSC_STABLE`, `KVM_CLOCK_HOST_TSC`) are read-only, and `KVM_CLOCK_REALTIME`
//! (advance the clock by the time the VM was off) is a choice the checkpoint issues make.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use snapshot::{check, StateError};

use super::{from_bytes, to_bytes};

/// Errors saving or restoring VM state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The saved state is not one this KVM can take.
    #[error(transparent)]
    Invalid(#[from] StateError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

/// The VM's interrupt controllers, PIT and clock. KVM structures are their raw bytes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// `kvm_irqchip` with chip id 0 (PIC master).
    pub pic_master: Vec<u8>,
    /// `kvm_irqchip` with chip id 1 (PIC slave).
    pub pic_slave: Vec<u8>,
    /// `kvm_irqchip` with chip id 2 (IOAPIC).
    pub ioapic: Vec<u8>,
    /// `kvm_pit_state2`.
    pub pit2: Vec<u8>,
    /// kvmclock in nanoseconds (`kvm_clock_data.clock`).
    pub clock: u64,
    /// The flags `KVM_GET_CLOCK` returned (for information; not written back).
    pub clock_flags: u32,
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<Vec<u8>, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(to_bytes(&chip))
}

fn decode_chip(field: &str, bytes: &[u8], chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let chip: kvm_irqchip = from_bytes(field, bytes)?;
    check(chip.chip_id == chip_id, field, || {
        format!("chip id {} where {chip_id} belongs", chip.chip_id)
    })?;
    Ok(chip)
}

/// Decoded and checked.
struct Decoded {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit2: kvm_pit_state2,
}

impl VmState {
    /// Saves the state of `fd`, whose vCPUs are all paused.
    pub fn save(fd: &VmFd) -> Result<Self, VmStateError> {
        let pit2 = fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(Self {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit2: to_bytes(&pit2),
            clock: clock.clock,
            clock_flags: clock.flags,
        })
    }

    /// Checks sizes and chip ids.
    pub fn check(&self) -> Result<(), StateError> {
        self.decode().map(|_| ())
    }

    fn decode(&self) -> Result<Decoded, StateError> {
        Ok(Decoded {
            pic_master: decode_chip("pic_master", &self.pic_master, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: decode_chip("pic_slave", &self.pic_slave, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: decode_chip("ioapic", &self.ioapic, KVM_IRQCHIP_IOAPIC)?,
            pit2: from_bytes("pit2", &self.pit2)?,
        })
    }

    /// Puts the state onto `fd`, a fresh VM with an irqchip and a PIT2 whose vCPUs have not
    /// run. Nothing is written if a field is bad.
    pub fn restore(&self, fd: &VmFd) -> Result<(), VmStateError> {
        let d = self.decode()?;
        fd.set_pit2(&d.pit2).map_err(kvm("KVM_SET_PIT2"))?;
        fd.set_clock(&kvm_clock_data {
            clock: self.clock,
            ..Default::default()
        })
        .map_err(kvm("KVM_SET_CLOCK"))?;
        fd.set_irqchip(&d.pic_master)
            .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
        fd.set_irqchip(&d.pic_slave)
            .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
        fd.set_irqchip(&d.ioapic)
            .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}
