//! The MSRs a vCPU boots with, limited to those this KVM accepts.
//!
//! KVM lists MSRs in `KVM_GET_MSR_INDEX_LIST` that it then refuses to write (on this project's
//! PVM hosts, 0x10a IA32_ARCH_CAPABILITIES), so each boot MSR is probed once and only the ones
//! KVM takes are used.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors while setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than it did when probed.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Partial {
        /// How many KVM set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot MSR values (what Firecracker and Cloud Hypervisor start a Linux vCPU with).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

/// Returns the boot MSRs that `probe` (a freshly created vCPU) accepts, each tried alone.
pub fn accepted_boot_msrs(kvm: &Kvm, probe: &VcpuFd) -> Result<Vec<kvm_msr_entry>, MsrError> {
    let listed = kvm.get_msr_index_list().map_err(|source| MsrError::Kvm {
        what: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    let listed = listed.as_slice();
    Ok(boot_msrs()
        .into_iter()
        .filter(|m| listed.contains(&m.index))
        .filter(|m| {
            let accepted = Msrs::from_entries(&[*m])
                .ok()
                .and_then(|one| probe.set_msrs(&one).ok())
                == Some(1);
            if !accepted {
                log::debug!("KVM refuses MSR {:#x}; not set at boot", m.index);
            }
            accepted
        })
        .collect())
}

/// A TSC value no host reaches by counting (48 years at 3 GHz), to see whether a write of
/// IA32_TSC takes effect.
const TSC_PROBE_VALUE: u64 = 1 << 62;

/// Whether KVM gives `probe` (a freshly created vCPU, not yet run) the TSC value the VMM writes.
///
/// Real KVM offsets the guest's TSC, so a checkpoint's TSC comes back when it is restored. PVM
/// runs guest code with the host's `rdtsc`: it takes a write of IA32_TSC and ignores it, so a
/// guest's TSC jumps by the time between a checkpoint and its restore. The probe writes a value
/// far beyond any host's count and reads it back; the caller writes the boot value afterwards.
pub fn tsc_is_writable(probe: &VcpuFd) -> bool {
    let entry = |data| kvm_msr_entry {
        index: MSR_IA32_TSC,
        data,
        ..Default::default()
    };
    let Ok(write) = Msrs::from_entries(&[entry(TSC_PROBE_VALUE)]) else {
        return false;
    };
    if probe.set_msrs(&write).ok() != Some(1) {
        return false;
    }
    let Ok(mut read) = Msrs::from_entries(&[entry(0)]) else {
        return false;
    };
    probe.get_msrs(&mut read).ok() == Some(1)
        && read
            .as_slice()
            .first()
            .is_some_and(|e| e.data >= TSC_PROBE_VALUE)
}

/// Writes `msrs` to `vcpu`.
pub fn set(vcpu: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), MsrError> {
    let all = Msrs::from_entries(msrs).map_err(|_| MsrError::Partial {
        set: 0,
        wanted: msrs.len(),
    })?;
    let set = vcpu.set_msrs(&all).map_err(|source| MsrError::Kvm {
        what: "KVM_SET_MSRS",
        source,
    })?;
    if set != msrs.len() {
        return Err(MsrError::Partial {
            set,
            wanted: msrs.len(),
        });
    }
    Ok(())
}
