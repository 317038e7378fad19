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

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that breaks a saved state.
    type Corrupt<T> = Box<dyn Fn(&mut T)>;
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::Kvm;

    fn fresh(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().expect("these tests need /dev/kvm");
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        vm
    }

    fn saved_with_some_state(kvm: &Kvm) -> VmState {
        let vm = fresh(kvm);
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: chip_id says the union holds the IOAPIC.
        unsafe {
            ioapic.chip.ioapic.id = 3;
            ioapic.chip.ioapic.redirtbl[5].bits = 0x25;
        }
        vm.set_irqchip(&ioapic).unwrap();
        let mut pit = vm.get_pit2().unwrap();
        pit.channels[0].mode = 2;
        pit.channels[0].count = 1193;
        vm.set_pit2(&pit).unwrap();
        vm.set_clock(&kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        })
        .unwrap();
        VmState::save(&vm).unwrap()
    }

    #[test]
    fn state_round_trips_through_json_onto_a_fresh_vm() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let saved = saved_with_some_state(&kvm);

        let parsed: VmState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let vm = fresh(&kvm);
        parsed.restore(&vm).unwrap();
        let again = VmState::save(&vm).unwrap();

        assert_eq!(parsed, saved);
        assert_eq!(
            (&again.pic_master, &again.pic_slave, &again.ioapic),
            (&saved.pic_master, &saved.pic_slave, &saved.ioapic)
        );
        let (p1, p2): (kvm_pit_state2, kvm_pit_state2) = (
            from_bytes("pit2", &again.pit2).unwrap(),
            from_bytes("pit2", &saved.pit2).unwrap(),
        );
        assert_eq!((p1.channels[0].mode, p1.channels[0].count), (2, 1193));
        assert_eq!(p1.channels[0].mode, p2.channels[0].mode);
        // kvmclock runs on: restored at the saved value, it reads at least that.
        assert!(saved.clock >= 5_000_000_000);
        assert!(again.clock >= saved.clock);
    }

    #[test]
    fn corrupted_states_are_refused_naming_the_field() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let good = saved_with_some_state(&kvm);
        let cases: Vec<(&str, Corrupt<VmState>)> = vec![
            ("pic_master", Box::new(|s| s.pic_master[0] = 1)),
            ("pic_slave", Box::new(|s| s.pic_slave.truncate(8))),
            ("ioapic", Box::new(|s| s.ioapic[0] = 0)),
            ("pit2", Box::new(|s| s.pit2.push(0))),
        ];

        for (field, corrupt) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let refused = bad.restore(&fresh(&kvm)).expect_err(field);

            assert!(
                matches!(refused, VmStateError::Invalid(ref e) if e.field == field),
                "{field}: {refused:?}"
            );
        }
    }
}
