//! One vCPU's KVM state: [`VcpuState`], [`save`] and [`restore`], and [`StateCaps`], what this
//! KVM can save and restore (probed once per process).
//!
//! The ioctl order follows Firecracker's `arch/x86_64/vcpu.rs`, whose comments give the
//! reasons: on save, MP state first (`KVM_GET_MP_STATE` runs `kvm_apic_accept_events`, which
//! may change vCPU and LAPIC state) and vCPU events last; on restore, CPUID first (other set
//! ioctls depend on it), regs before events (`KVM_SET_REGS` clears pending exceptions that
//! `KVM_SET_VCPU_EVENTS` restores), sregs before the LAPIC (sregs carry the APIC base), the
//! LAPIC before the MSRs (the TSC deadline MSR only takes with the LAPIC configured), events
//! last. Both run on the vCPU's own thread while it is out of the guest.

use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_XCRS,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use snapshot::{check, StateError};

use super::{from_bytes, to_bytes};

/// Errors saving, restoring or probing vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("{what}: KVM handled {done} of {wanted} MSRs (stopped at {stopped:#x})")]
    Msrs {
        /// Which ioctl.
        what: &'static str,
        /// How many it handled.
        done: usize,
        /// How many were asked.
        wanted: usize,
        /// The first MSR it did not handle.
        stopped: u32,
    },
    /// The saved state is not one this KVM can take.
    #[error(transparent)]
    Invalid(#[from] StateError),
    /// A KVM list could not be built (more entries than KVM allows).
    #[error("building the {0} list for KVM failed")]
    List(&'static str),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// One MSR.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrValue {
    /// Its index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// One CPUID entry (`kvm_cpuid_entry2` without padding).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// A vCPU's saved state. KVM structures are their raw bytes (see [`crate::vstate`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<CpuidEntry>,
    /// The MSRs this KVM reads and writes back ([`StateCaps::msrs`]).
    pub msrs: Vec<MsrValue>,
    /// `kvm_regs`.
    pub regs: Vec<u8>,
    /// `kvm_sregs`.
    pub sregs: Vec<u8>,
    /// `kvm_fpu` (legacy FPU/SSE state; XSAVE below supersedes it where KVM has XSAVE).
    pub fpu: Vec<u8>,
    /// The XSAVE region (`kvm_xsave`, plus `KVM_GET_XSAVE2`'s extension where KVM reports one),
    /// as 32-bit words.
    pub xsave: Vec<u32>,
    /// `kvm_xcrs`.
    pub xcrs: Vec<u8>,
    /// `kvm_lapic_state`.
    pub lapic: Vec<u8>,
    /// `kvm_debugregs`.
    pub debug_regs: Vec<u8>,
    /// `kvm_vcpu_events`.
    pub vcpu_events: Vec<u8>,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// The TSC frequency in kHz, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// What this KVM can save and restore of a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCaps {
    /// The MSRs of `KVM_GET_MSR_INDEX_LIST` that read and write back on a scratch vCPU.
    pub msrs: Vec<u32>,
    /// The size of the XSAVE region in bytes (4096, or `KVM_CAP_XSAVE2`'s larger size).
    pub xsave_size: usize,
    /// The MSRs that are listed but refused (for the docs and the log).
    pub refused_msrs: Vec<u32>,
}

/// The size of `kvm_xsave`, the XSAVE region without `KVM_GET_XSAVE2`'s extension.
const XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();
/// The last MP state an x86 vCPU can be in (`KVM_MP_STATE_SIPI_RECEIVED`).
const MP_STATE_MAX_X86: u32 = kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED;

static CAPS: OnceLock<Arc<StateCaps>> = OnceLock::new();

impl StateCaps {
    /// This KVM's capabilities, probed on first use (every `Platform` of the process opens
    /// the same `/dev/kvm`, so once per process is once per platform).
    pub fn get(kvm: &Kvm, cpuid: &CpuId) -> Result<Arc<StateCaps>, VcpuStateError> {
        Self::get_then(kvm, cpuid, |_| ())
    }

    /// [`StateCaps::get`], handing the result to `publish` before the scratch VM of a probe is
    /// torn down: on PVM tearing down a VM takes ~13 ms, which a restore need not wait for.
    pub fn get_then(
        kvm: &Kvm,
        cpuid: &CpuId,
        publish: impl FnOnce(&Arc<StateCaps>),
    ) -> Result<Arc<StateCaps>, VcpuStateError> {
        if let Some(caps) = CAPS.get() {
            publish(caps);
            return Ok(caps.clone());
        }
        let (caps, scratch) = Self::probe_on_scratch(kvm, cpuid)?;
        let caps = CAPS.get_or_init(|| Arc::new(caps)).clone();
        publish(&caps);
        drop(scratch);
        Ok(caps)
    }

    /// What a restore may check a state against without a scratch VM: the probe's result if
    /// it is in, else every MSR KVM lists (a listed MSR the probe would refuse then fails the
    /// restore itself, `KVM_SET_MSRS` naming it) and the XSAVE size. On PVM a scratch VM takes
    /// ~10 ms to build; a restore does not wait for it.
    pub fn for_restore_check(kvm: &Kvm) -> Result<Arc<StateCaps>, VcpuStateError> {
        if let Some(caps) = CAPS.get() {
            return Ok(caps.clone());
        }
        let listed = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(Arc::new(StateCaps {
            msrs: listed.as_slice().to_vec(),
            xsave_size: xsave_size(kvm),
            refused_msrs: Vec::new(),
        }))
    }

    /// Probes a scratch VM: reads each listed MSR alone and writes the value back; keeps the
    /// ones KVM takes both ways (on PVM 0x10a, IA32_ARCH_CAPABILITIES, reads but is refused).
    pub fn probe(kvm: &Kvm, cpuid: &CpuId) -> Result<StateCaps, VcpuStateError> {
        Self::probe_on_scratch(kvm, cpuid).map(|(caps, _)| caps)
    }

    /// [`StateCaps::probe`], returning the scratch VM and vCPU for the caller to drop.
    fn probe_on_scratch(
        kvm: &Kvm,
        cpuid: &CpuId,
    ) -> Result<(StateCaps, (VcpuFd, kvm_ioctls::VmFd)), VcpuStateError> {
        let listed = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM (probe)"))?;
        vm.create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP (probe)"))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(ioctl("KVM_CREATE_VCPU (probe)"))?;
        vcpu.set_cpuid2(cpuid)
            .map_err(ioctl("KVM_SET_CPUID2 (probe)"))?;
        let (msrs, refused_msrs) = probe_msrs(&vcpu, listed.as_slice());
        let xsave_size = xsave_size(kvm);
        let caps = StateCaps {
            msrs,
            xsave_size,
            refused_msrs,
        };
        Ok((caps, (vcpu, vm)))
    }
}

/// The size of this KVM's XSAVE region in bytes.
fn xsave_size(kvm: &Kvm) -> usize {
    let xsave2 = kvm.check_extension_int(Cap::Xsave2);
    usize::try_from(xsave2)
        .ok()
        .filter(|&s| s > XSAVE_LEGACY_SIZE)
        .unwrap_or(XSAVE_LEGACY_SIZE)
}

/// Splits `listed` into the MSRs `vcpu` reads and writes back and the ones it refuses.
///
/// `KVM_GET_MSRS` and `KVM_SET_MSRS` process their entries in order and stop at the first
/// one KVM refuses, returning how many they did: so the whole list goes in one call, the
/// refused entry is set aside and the rest goes in the next call. A probe costs a few ioctls
/// plus two per refused MSR, not two per MSR (a restore waits for it).
fn probe_msrs(vcpu: &VcpuFd, listed: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let (mut read, mut refused) = (Vec::new(), Vec::new());
    let mut left: Vec<kvm_msr_entry> = listed
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    // Reads: what is read goes on to the write probe with its value.
    while !left.is_empty() {
        let Ok(mut batch) = Msrs::from_entries(&left) else {
            refused.extend(left.iter().map(|e| e.index));
            break;
        };
        let n = vcpu.get_msrs(&mut batch).unwrap_or(0).min(left.len());
        read.extend_from_slice(&batch.as_slice()[..n]);
        if n < left.len() {
            refused.push(left[n].index);
        }
        left.drain(..(n + 1).min(left.len()));
    }
    // Writes back of the values read.
    let mut kept = Vec::with_capacity(read.len());
    let mut left = read;
    while !left.is_empty() {
        let Ok(batch) = Msrs::from_entries(&left) else {
            refused.extend(left.iter().map(|e| e.index));
            break;
        };
        let n = vcpu.set_msrs(&batch).unwrap_or(0).min(left.len());
        kept.extend(left[..n].iter().map(|e| e.index));
        if n < left.len() {
            refused.push(left[n].index);
        }
        left.drain(..(n + 1).min(left.len()));
    }
    for index in &refused {
        log::debug!("MSR {index:#x} does not read and write back; not saved");
    }
    (kept, refused)
}

/// Reads the XSAVE region: `KVM_GET_XSAVE2` when KVM's region is larger than `kvm_xsave`.
fn get_xsave(fd: &VcpuFd, size: usize) -> Result<Vec<u32>, VcpuStateError> {
    if size <= XSAVE_LEGACY_SIZE {
        let xsave = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let extra = (size - XSAVE_LEGACY_SIZE).div_ceil(4);
    let mut xsave = Xsave::new(extra).map_err(|_| VcpuStateError::List("XSAVE"))?;
    // SAFETY: `xsave` has room for `size` bytes, the region size KVM reported through
    // KVM_CAP_XSAVE2, so KVM writes inside it.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
    let fam = xsave.as_fam_struct_ref();
    let mut words = fam.xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Writes the XSAVE region saved by [`get_xsave`] (its size already checked).
fn set_xsave(fd: &VcpuFd, words: &[u32]) -> Result<(), VcpuStateError> {
    let legacy = XSAVE_LEGACY_SIZE / 4;
    let (head, extra) = words.split_at(legacy.min(words.len()));
    let mut base = kvm_xsave::default();
    base.region.copy_from_slice(head);
    if extra.is_empty() {
        // SAFETY: `base` is a whole `kvm_xsave`; KVM reads only that much.
        return unsafe { fd.set_xsave(&base) }.map_err(ioctl("KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::new(extra.len()).map_err(|_| VcpuStateError::List("XSAVE"))?;
    xsave.as_mut_slice().copy_from_slice(extra);
    // SAFETY: the FAM header is written in place; `len` stays what `Xsave::new` set.
    unsafe { xsave.as_mut_fam_struct().xsave = base };
    // SAFETY: `xsave` holds the region size this KVM reported (checked by `VcpuState::check`),
    // so KVM reads inside it.
    unsafe { fd.set_xsave2(&xsave) }.map_err(ioctl("KVM_SET_XSAVE2"))
}

/// Saves the state of a vCPU that is out of the guest. Runs on the vCPU's thread.
pub fn save(fd: &VcpuFd, caps: &StateCaps) -> Result<VcpuState, VcpuStateError> {
    let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let fpu = fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?;
    let xsave = get_xsave(fd, caps.xsave_size)?;
    let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok().filter(|&k| k > 0);
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?;
    let entries: Vec<kvm_msr_entry> = caps
        .msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::List("MSR"))?;
    let read = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
    if read != entries.len() {
        return Err(VcpuStateError::Msrs {
            what: "KVM_GET_MSRS",
            done: read,
            wanted: entries.len(),
            stopped: entries.get(read).map_or(0, |e| e.index),
        });
    }
    let vcpu_events = fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid: cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect(),
        msrs: msrs
            .as_slice()
            .iter()
            .map(|m| MsrValue {
                index: m.index,
                data: m.data,
            })
            .collect(),
        regs: to_bytes(&regs),
        sregs: to_bytes(&sregs),
        fpu: to_bytes(&fpu),
        xsave,
        xcrs: to_bytes(&xcrs),
        lapic: to_bytes(&lapic),
        debug_regs: to_bytes(&debug_regs),
        vcpu_events: to_bytes(&vcpu_events),
        mp_state: mp_state.mp_state,
        tsc_khz,
    })
}

/// A [`VcpuState`] checked and decoded, ready for the ioctls.
struct Decoded {
    cpuid: CpuId,
    msrs: Msrs,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    debug_regs: kvm_debugregs,
    vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// Checks every field this KVM cannot check for itself against `caps`.
    pub fn check(&self, caps: &StateCaps) -> Result<(), StateError> {
        self.decode(caps).map(|_| ())
    }

    fn decode(&self, caps: &StateCaps) -> Result<Decoded, StateError> {
        check(
            !self.cpuid.is_empty() && self.cpuid.len() <= KVM_MAX_CPUID_ENTRIES,
            "cpuid",
            || {
                format!(
                    "{} entries, expected 1 to {KVM_MAX_CPUID_ENTRIES}",
                    self.cpuid.len()
                )
            },
        )?;
        let entries: Vec<kvm_cpuid_entry2> = self
            .cpuid
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|_| StateError::new("cpuid", "too many entries for KVM"))?;

        check(self.msrs.len() <= caps.msrs.len(), "msrs", || {
            format!(
                "{} MSRs, but this KVM saves and restores {}",
                self.msrs.len(),
                caps.msrs.len()
            )
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.msrs.iter().enumerate() {
            check(
                caps.msrs.contains(&m.index),
                &format!("msrs[{i}].index"),
                || format!("{:#x} is not an MSR this KVM restores", m.index),
            )?;
            check(seen.insert(m.index), &format!("msrs[{i}].index"), || {
                format!("{:#x} appears twice", m.index)
            })?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| StateError::new("msrs", "too many entries for KVM"))?;

        let xsave_words = caps.xsave_size.div_ceil(4);
        check(self.xsave.len() == xsave_words, "xsave", || {
            format!(
                "{} bytes, but this KVM's XSAVE region is {} bytes",
                self.xsave.len() * 4,
                caps.xsave_size
            )
        })?;
        let xcrs: kvm_xcrs = from_bytes("xcrs", &self.xcrs)?;
        check(
            xcrs.nr_xcrs as usize <= KVM_MAX_XCRS as usize,
            "xcrs",
            || format!("{} XCRs, at most {KVM_MAX_XCRS}", xcrs.nr_xcrs),
        )?;
        check(self.mp_state <= MP_STATE_MAX_X86, "mp_state", || {
            format!("{} is not an x86 MP state", self.mp_state)
        })?;
        check(self.tsc_khz != Some(0), "tsc_khz", || "0 kHz".into())?;
        Ok(Decoded {
            cpuid,
            msrs,
            regs: from_bytes("regs", &self.regs)?,
            sregs: from_bytes("sregs", &self.sregs)?,
            fpu: from_bytes("fpu", &self.fpu)?,
            xcrs,
            lapic: from_bytes("lapic", &self.lapic)?,
            debug_regs: from_bytes("debug_regs", &self.debug_regs)?,
            vcpu_events: from_bytes("vcpu_events", &self.vcpu_events)?,
        })
    }
}

/// Puts `state` onto a fresh vCPU that has not run yet. Runs on the vCPU's thread. The state
/// is checked first; nothing is written if a field is bad.
pub fn restore(fd: &VcpuFd, state: &VcpuState, caps: &StateCaps) -> Result<(), VcpuStateError> {
    let d = state.decode(caps)?;
    if let (Some(saved), Ok(here)) = (state.tsc_khz, fd.get_tsc_khz()) {
        if saved != here {
            // KVM_SET_TSC_KHZ takes on PVM although KVM_CAP_TSC_CONTROL is absent (vmm/STATE.md);
            // where it does not, the guest's clock calibration is off by the ratio.
            if let Err(e) = fd.set_tsc_khz(saved) {
                log::warn!("the state has a {saved} kHz TSC, this host's is {here} kHz: {e}");
            }
        }
    }
    fd.set_cpuid2(&d.cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(ioctl("KVM_SET_MP_STATE"))?;
    fd.set_regs(&d.regs).map_err(ioctl("KVM_SET_REGS"))?;
    fd.set_sregs(&d.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_fpu(&d.fpu).map_err(ioctl("KVM_SET_FPU"))?;
    set_xsave(fd, &state.xsave)?;
    fd.set_xcrs(&d.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&d.debug_regs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&d.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    let wanted = state.msrs.len();
    let set = fd.set_msrs(&d.msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != wanted {
        return Err(VcpuStateError::Msrs {
            what: "KVM_SET_MSRS",
            done: set,
            wanted,
            stopped: state.msrs.get(set).map_or(0, |m| m.index),
        });
    }
    fd.set_vcpu_events(&d.vcpu_events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that breaks a saved state.
    type Corrupt<T> = Box<dyn Fn(&mut T)>;
    use kvm_ioctls::VmFd;

    /// A fresh VM with an irqchip and one vCPU given KVM's supported CPUID.
    fn fresh(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu)
    }

    /// The batched probe finds what probing every MSR alone finds.
    #[test]
    fn the_batched_msr_probe_agrees_with_probing_each_msr_alone() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let listed = kvm.get_msr_index_list().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let (mut alone, mut refused_alone) = (Vec::new(), Vec::new());
        for &index in listed.as_slice() {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            let mut one = Msrs::from_entries(&[entry]).unwrap();
            let ok = vcpu.get_msrs(&mut one).ok() == Some(1) && vcpu.set_msrs(&one).ok() == Some(1);
            if ok {
                alone.push(index);
            } else {
                refused_alone.push(index);
            }
        }
        let (kept, mut refused) = probe_msrs(&vcpu, listed.as_slice());
        assert_eq!(kept, alone);
        refused.sort_unstable();
        refused_alone.sort_unstable();
        assert_eq!(refused, refused_alone);
        assert!(!kept.is_empty());
    }

    fn setup() -> (Kvm, Arc<StateCaps>) {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let caps = StateCaps::get(&kvm, &cpuid).unwrap();
        (kvm, caps)
    }

    /// MSRs whose value moves with host time (the TSC).
    const TIME_MSRS: [u32; 1] = [0x10];

    fn without_time(mut s: VcpuState) -> VcpuState {
        s.msrs.retain(|m| !TIME_MSRS.contains(&m.index));
        s
    }

    fn saved_with_some_state(kvm: &Kvm, caps: &StateCaps) -> VcpuState {
        let (_vm, vcpu) = fresh(kvm);
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x10_0000;
        regs.rsp = 0x8000;
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr0 |= 1; // protected mode
        sregs.cs.selector = 0x10;
        vcpu.set_sregs(&sregs).unwrap();
        let mut dr = vcpu.get_debug_regs().unwrap();
        dr.db[0] = 0xdead_0000;
        vcpu.set_debug_regs(&dr).unwrap();
        let lstar = kvm_msr_entry {
            index: 0xc000_0082,
            data: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        vcpu.set_msrs(&Msrs::from_entries(&[lstar]).unwrap())
            .unwrap();
        save(&vcpu, caps).unwrap()
    }

    #[test]
    fn probe_keeps_msrs_that_read_and_write_back() {
        let (_, caps) = setup();

        assert!(caps.msrs.contains(&0xc000_0082), "LSTAR is saved");
        assert!(caps.xsave_size >= XSAVE_LEGACY_SIZE);
        for refused in &caps.refused_msrs {
            assert!(!caps.msrs.contains(refused));
        }
    }

    #[test]
    fn state_round_trips_through_json_onto_a_fresh_vcpu() {
        let (kvm, caps) = setup();
        let saved = saved_with_some_state(&kvm, &caps);

        let json = serde_json::to_string(&saved).unwrap();
        let parsed: VcpuState = serde_json::from_str(&json).unwrap();
        let (_vm, fresh_vcpu) = fresh(&kvm);
        restore(&fresh_vcpu, &parsed, &caps).unwrap();
        let again = save(&fresh_vcpu, &caps).unwrap();

        assert_eq!(parsed, saved);
        assert_eq!(without_time(again), without_time(saved.clone()));
        let regs: kvm_regs = from_bytes("regs", &saved.regs).unwrap();
        assert_eq!((regs.rax, regs.rip), (0x1234_5678, 0x10_0000));
        let lstar = saved.msrs.iter().find(|m| m.index == 0xc000_0082).unwrap();
        assert_eq!(lstar.data, 0xffff_ffff_8100_0000);
    }

    #[test]
    fn corrupted_states_are_refused_naming_the_field() {
        let (kvm, caps) = setup();
        let good = saved_with_some_state(&kvm, &caps);
        let cases: Vec<(&str, Corrupt<VcpuState>)> = vec![
            ("cpuid", Box::new(|s| s.cpuid.clear())),
            ("msrs[0].index", Box::new(|s| s.msrs[0].index = 0xdead)),
            (
                "msrs[1].index",
                Box::new(|s| s.msrs[1].index = s.msrs[0].index),
            ),
            ("msrs", Box::new(|s| s.msrs.extend(s.msrs.clone()))),
            ("regs", Box::new(|s| s.regs.pop().map(drop).unwrap_or(()))),
            ("sregs", Box::new(|s| s.sregs.push(0))),
            ("fpu", Box::new(|s| s.fpu.clear())),
            ("xsave", Box::new(|s| s.xsave.truncate(10))),
            ("xcrs", Box::new(|s| s.xcrs[0] = 0xff)),
            ("lapic", Box::new(|s| s.lapic.truncate(1000))),
            ("debug_regs", Box::new(|s| s.debug_regs.push(1))),
            ("vcpu_events", Box::new(|s| s.vcpu_events.clear())),
            ("mp_state", Box::new(|s| s.mp_state = 9)),
            ("tsc_khz", Box::new(|s| s.tsc_khz = Some(0))),
        ];

        for (field, corrupt) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let err = bad.check(&caps).expect_err(field);
            let (_vm, vcpu) = fresh(&kvm);
            let refused = restore(&vcpu, &bad, &caps).expect_err(field);

            assert_eq!(err.field, field, "{err}");
            assert!(matches!(refused, VcpuStateError::Invalid(ref e) if e.field == field));
        }
    }
}
