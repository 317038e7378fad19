//! Saving a paused VM's state ([`Vm::save_state`]) and building a fresh KVM VM from it
//! ([`Vm::restore_from`]).
//!
//! Save, with the VM paused (vCPUs, then device threads: [`Vm::pause`]): every vCPU saves its
//! own state on its own thread, all asked at once ([`crate::vcpu::ask_all`]); then the VM's
//! irqchip, PIT2 and clock; the serial port, the i8042 and the reset control; and every virtio
//! transport with its device, disks in `--disk` order then vsock
//! ([`crate::device_manager::VirtioDevices::save`]; a device thread that is not paused is named
//! and nothing is saved).
//!
//! Restore reuses the steps of [`Vm::boot`] but the loading: a new KVM VM on the given guest
//! memory with irqchip and PIT2; the virtio devices rebuilt from their states and fresh
//! resources (the disk chains re-opened from the configuration, new eventfds registered on the
//! new VM fd, the vsock listener bound again, new event loops, all parked); the vCPUs; then the
//! VM state, every vCPU's state on its own (paused) thread, the serial port and the other legacy
//! devices; last, the restored transports' activations are carried out
//! ([`crate::device_manager::VirtioDevices::finish_restore`]), so that what a device does on
//! activation — the restored vsock device puts TRANSPORT_RESET on its event queue, since host
//! connections do not survive — reaches a guest whose irqchip and LAPICs are already restored.
//! The restored VM is paused, devices included: [`Vm::resume`] starts it.
//!
//! The state is checked in full before anything is built: a version this Strata knows, as
//! many vCPUs as the configuration has, every vCPU and VM field (see [`crate::vstate`]), as
//! many virtio devices as the configuration has, of the same kinds, in the same order
//! ([`crate::device_manager::check_states`]). What needs guest memory (ring addresses) is
//! checked as each transport is restored. A bad field is named (`devices[1].transport.queues[0]
//! .size`).

use std::sync::Arc;

use devices::legacy::{
    I8042State, ResetControl, ResetControlState, Serial, SerialRegisters, SerialResources, I8042,
};
use serde::{Deserialize, Serialize};
use snapshot::{check, Persist, StateError};

use super::{create_vcpus, create_vm, failure_sink, Parts, Platform, Vm, VmError};
use crate::config::VmConfig;
use crate::device_manager::{self, DeviceError, NotPaused, VirtioDeviceState};
use crate::memory::GuestMemory;
use crate::vcpu::{ask_all, expect_reply, VcpuError, VcpuReply, VcpuRequest};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::{VmState, VmStateError};

/// The version of [`VmSnapshotState`]; bumped on any change to it (no translation between
/// versions, the rule Firecracker settled on). 2: virtio devices, i8042 and reset control.
pub const STATE_VERSION: u32 = 2;

/// Everything of a paused VM but its memory and disks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmSnapshotState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchip, PIT2, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialRegisters,
    /// The i8042 (holds nothing yet).
    pub i8042: I8042State,
    /// The reset control register.
    pub reset_control: ResetControlState,
    /// Every virtio transport and its device: disks in `--disk` order, then vsock.
    pub devices: Vec<VirtioDeviceState>,
}

/// Why a VM's state could not be saved. The VM is as it was (paused).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// A vCPU could not save its state (it is running, gone, or KVM refused).
    #[error("cannot save the state of vCPU {}", .0.index())]
    Vcpu(#[source] VcpuError),
    /// The VM's irqchip, PIT or clock.
    #[error("cannot save the VM's irqchip, PIT or clock")]
    Vm(#[source] VmStateError),
    /// A device thread is running (the VM was not paused).
    #[error("cannot save the virtio devices")]
    Device(#[from] NotPaused),
}

/// Why a VM could not be restored. Nothing is left running; the memory is released.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The saved state is wrong, or does not fit the configuration (the error names the
    /// field: `devices[1]` when the configuration has another device there).
    #[error(transparent)]
    Invalid(#[from] StateError),
    /// Building the KVM VM.
    #[error("cannot build the VM to restore into")]
    Build(#[source] VmError),
    /// KVM refused the VM state.
    #[error("cannot restore the VM's irqchip, PIT or clock")]
    Vm(#[source] VmStateError),
    /// A vCPU refused its state.
    #[error("cannot restore the state of vCPU {}", .0.index())]
    Vcpu(#[source] VcpuError),
}

impl VmSnapshotState {
    /// Checks the state against `config` and this KVM before anything is built.
    pub fn check(
        &self,
        config: &VmConfig,
        caps: &crate::vstate::vcpu::StateCaps,
    ) -> Result<(), StateError> {
        check(self.version == STATE_VERSION, "version", || {
            format!(
                "{} is not a version this Strata knows ({STATE_VERSION})",
                self.version
            )
        })?;
        check(
            self.vcpus.len() == usize::from(config.vcpus),
            "vcpus",
            || format!("{} vCPUs but the VM has {}", self.vcpus.len(), config.vcpus),
        )?;
        for (i, v) in self.vcpus.iter().enumerate() {
            v.check(caps).map_err(|e| e.within(format!("vcpus[{i}]")))?;
        }
        self.vm.check().map_err(|e| e.within("vm"))?;
        check(
            self.serial.in_buffer.len() <= 64,
            "serial.in_buffer",
            || format!("{} bytes, more than the FIFO", self.serial.in_buffer.len()),
        )?;
        // The same checks the restore makes, on a register that reports nowhere.
        ResetControl::restore(Arc::new(|_| {}), &self.reset_control)
            .map_err(|e| e.within("reset_control"))?;
        device_manager::check_states(&self.devices, &config.disks, config.vsock.as_ref())
    }
}

impl Vm {
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Saves the state of every vCPU, the VM (irqchip, PIT2, clock), the legacy devices and
    /// every virtio transport and device. The VM must be paused ([`Vm::pause`]): a running
    /// device thread is named, a running vCPU refuses.
    pub fn save_state(&self, platform: &Platform) -> Result<VmSnapshotState, SaveError> {
        // Checked first: a running device thread means the VM is not (fully) paused.
        let devices = self.virtio.save()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (v, reply) in self
            .vcpus
            .iter()
            .zip(ask_all(&self.vcpus, |_| VcpuRequest::SaveState))
        {
            let state = expect_reply(v.index(), "save state", reply, |r| match r {
                VcpuReply::State(s) => Ok(*s),
                other => Err(other),
            })
            .map_err(SaveError::Vcpu)?;
            vcpus.push(state);
        }
        let vm = VmState::save(&self.fd).map_err(SaveError::Vm)?;
        let serial = platform
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let i8042 = self
            .legacy
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let reset_control = self
            .legacy
            .reset_control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        Ok(VmSnapshotState {
            version: STATE_VERSION,
            vcpus,
            vm,
            serial,
            i8042,
            reset_control,
            devices,
        })
    }

    /// Ends the vCPU and device threads and releases the KVM VM, keeping guest memory (for a
    /// restore into a fresh VM).
    pub fn shutdown_keep_memory(self) -> GuestMemory {
        let Vm {
            vcpus,
            mut virtio,
            legacy,
            fd,
            memory,
        } = self;
        for v in &vcpus {
            let _ = v.ask(VcpuRequest::Exit);
        }
        for v in vcpus {
            v.exit();
        }
        virtio.stop();
        drop(virtio);
        drop(legacy);
        drop(fd);
        memory
    }

    /// Builds a fresh KVM VM for `config` on `memory` (the guest memory the state was saved
    /// with) and puts `state` onto it. The VM comes back paused; [`Vm::resume`] runs it.
    pub fn restore_from(
        platform: &Platform,
        config: &VmConfig,
        memory: GuestMemory,
        state: &VmSnapshotState,
        events: &super::EventTx,
    ) -> Result<Self, RestoreError> {
        // The cheap check first; the one against the probe's result once the VM is built (the
        // probe runs meanwhile: on PVM both take ~10 ms).
        let cheap = platform.restore_check_caps().map_err(RestoreError::Build)?;
        state.check(config, &cheap)?;
        let fd = create_vm(platform, config, &memory).map_err(RestoreError::Build)?;
        let virtio = device_manager::restore(
            &fd,
            &memory,
            &config.disks,
            config.vsock.as_ref(),
            &state.devices,
            failure_sink(events),
        )
        .map_err(|e| match e {
            DeviceError::State(e) => RestoreError::Invalid(e),
            e => RestoreError::Build(VmError::Devices(e)),
        })?;
        let vcpus = create_vcpus(&fd, config).map_err(RestoreError::Build)?;
        let caps = platform.state_caps().map_err(RestoreError::Build)?;
        state.check(config, &caps)?;
        // Before the vCPUs: their LAPICs are set against the restored irqchip.
        state.vm.restore(&fd).map_err(RestoreError::Vm)?;
        let parts = Parts {
            fd,
            memory,
            virtio,
            vcpus,
        };
        let vm = Self::spawn(platform, parts, caps, events, true).map_err(RestoreError::Build)?;
        let replies = ask_all(&vm.vcpus, |i| {
            VcpuRequest::RestoreState(Box::new(state.vcpus[i].clone()))
        });
        let mut failure = None;
        for (v, reply) in vm.vcpus.iter().zip(replies) {
            let r = expect_reply(v.index(), "restore state", reply, |r| match r {
                VcpuReply::Restored => Ok(()),
                other => Err(other),
            });
            if let (Err(e), None) = (r, &failure) {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            vm.shutdown();
            return Err(RestoreError::Vcpu(e));
        }
        let legacy =
            restore_serial(platform, &state.serial).and_then(|()| vm.restore_legacy(state));
        if let Err(e) = legacy {
            vm.shutdown();
            return Err(e);
        }
        // Last: activations of the restored devices reach a fully restored irqchip and vCPUs.
        vm.virtio.finish_restore();
        Ok(vm)
    }

    /// Puts the saved i8042 and reset control in place of the fresh ones on the port bus.
    fn restore_legacy(&self, state: &VmSnapshotState) -> Result<(), RestoreError> {
        let sink = self.legacy.sink.clone();
        let i8042 = I8042::restore(sink.clone(), &state.i8042)
            .map_err(|e| RestoreError::Invalid(e.within("i8042")))?;
        let reset_control = ResetControl::restore(sink, &state.reset_control)
            .map_err(|e| RestoreError::Invalid(e.within("reset_control")))?;
        *self.legacy.i8042.lock().unwrap_or_else(|e| e.into_inner()) = i8042;
        *self
            .legacy
            .reset_control
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reset_control;
        Ok(())
    }
}

/// Puts the saved registers into the platform's UART in place: its output, interrupt line
/// and input feeders carry over.
fn restore_serial(platform: &Platform, saved: &SerialRegisters) -> Result<(), RestoreError> {
    let mut guard = platform.serial.lock().unwrap_or_else(|e| e.into_inner());
    let placeholder =
        Serial::new(&platform.serial_irq, Box::new(std::io::sink())).map_err(|source| {
            RestoreError::Build(VmError::Io {
                what: "creating a serial port",
                source,
            })
        })?;
    let old = std::mem::replace(&mut *guard, placeholder);
    *guard = Serial::restore(SerialResources::Replace(old), saved)
        .map_err(|e| RestoreError::Invalid(e.within("serial")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that breaks a saved state.
    type Corrupt<T> = Box<dyn Fn(&mut T)>;
    use crate::vstate::vcpu::StateCaps;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::Kvm;

    /// A whole saved state of a fresh 1-vCPU VM, saved on the test thread.
    fn saved() -> (VmSnapshotState, std::sync::Arc<StateCaps>) {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let caps = StateCaps::get(&kvm, &cpuid).unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(Default::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let state = VmSnapshotState {
            version: STATE_VERSION,
            vcpus: vec![crate::vstate::vcpu::save(&vcpu, &caps).unwrap()],
            vm: VmState::save(&vm).unwrap(),
            serial: SerialRegisters {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            i8042: I8042State::default(),
            reset_control: ResetControlState::default(),
            devices: vec![],
        };
        (state, caps)
    }

    fn config(vcpus: u8) -> VmConfig {
        VmConfig {
            kernel: crate::config::Kernel::TestGuest,
            initrd: None,
            cmdline: String::new(),
            vcpus,
            memory: 16 << 20,
            reboot: false,
            console: crate::config::ConsoleConfig::None,
            disks: vec![],
            vsock: None,
            api_socket: None,
            checkpoint: Default::default(),
        }
    }

    #[test]
    fn a_whole_state_checks_and_bad_fields_are_named() {
        let (good, caps) = saved();
        let cases: Vec<(&str, u8, Corrupt<VmSnapshotState>)> = vec![
            ("version", 1, Box::new(|s| s.version = 99)),
            ("vcpus", 2, Box::new(|_| {})),
            ("vcpus[0].lapic", 1, Box::new(|s| s.vcpus[0].lapic.clear())),
            ("vm.pit2", 1, Box::new(|s| s.vm.pit2.clear())),
            (
                "serial.in_buffer",
                1,
                Box::new(|s| s.serial.in_buffer = vec![0; 65]),
            ),
            (
                "reset_control.value",
                1,
                Box::new(|s| s.reset_control.value = 0x80),
            ),
        ];

        let ok = good.check(&config(1), &caps);
        for (field, vcpus, corrupt) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let err = bad.check(&config(vcpus), &caps).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        assert_eq!(ok, Ok(()));
    }
}
