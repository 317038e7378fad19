//! The CPUID a vCPU sees: KVM's supported set with the fix-ups every VMM makes.
//!
//! - leaf 0x1: initial APIC id, logical processor count, the hypervisor bit;
//! - leaf 0x4: cores per package and which caches are shared;
//! - leaves 0xB and 0x1F: the x2APIC topology (one socket, one thread per core);
//! - leaf 0x4000_0010: the TSC and local-APIC-timer frequencies in kHz, the leaf VMware
//!   defined and QEMU provides on KVM (`vmware-cpuid-freq`), so a guest need not calibrate;
//! - leaf 0x8000_0007: the invariant-TSC bit is cleared where KVM cannot set the guest's TSC
//!   (PVM). A guest that sees an invariant TSC keeps time with `rdtsc` (Linux rates its `tsc`
//!   clocksource above kvmclock then); a TSC the VMM cannot restore jumps by a checkpoint's age
//!   when the checkpoint is applied, and Linux then replays the lost ticks with RCU stall
//!   reports (and on PVM hangs on the stall report's NMI). Without the bit Linux keeps time
//!   with kvmclock, which the VMM restores (`KVM_SET_CLOCK`): the guest continues from the
//!   checkpoint's instant.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The hypervisor's timing leaf.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's APIC timer runs at a nominal 1 GHz.
const APIC_TIMER_KHZ: u32 = 1_000_000;

/// The topology of the VM.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// Number of vCPUs (cores) in the one socket.
    pub vcpus: u8,
}

/// Bits needed to number `n` things (x2APIC id shift widths).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Leaf 0x8000_0007 EDX bit 8: the TSC runs at a constant rate in every state (invariant TSC).
const INVARIANT_TSC: u32 = 1 << 8;

/// What the host can do with the guest's time stamp counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tsc {
    /// Its frequency in kHz, where KVM reports it.
    pub khz: Option<u32>,
    /// Whether KVM sets the guest's TSC to what the VMM writes (false on PVM).
    pub writable: bool,
}

/// Applies the per-vCPU fix-ups to `base` (KVM's supported CPUID) for vCPU `apic_id`.
pub fn for_vcpu(base: &CpuId, apic_id: u8, topo: Topology, tsc: Tsc) -> CpuId {
    let tsc_khz = tsc.khz;
    let count = u32::from(topo.vcpus);
    let mut entries: Vec<kvm_cpuid_entry2> = base
        .as_slice()
        .iter()
        .copied()
        .filter(|e| !matches!(e.function, 0xb | 0x1f | TIMING_LEAF))
        .collect();

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors, [15:8] CLFLUSH size.
                e.ebx = (u32::from(apic_id) << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the EBX count is valid
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            0x4 => {
                // EAX: [31:26] cores per package - 1, [25:14] threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0x4000_0000 if tsc_khz.is_some() => e.eax = e.eax.max(TIMING_LEAF),
            0x8000_0007 if !tsc.writable => e.edx &= !INVARIANT_TSC,
            _ => {}
        }
    }

    let has_leaf = |f: u32| base.as_slice().iter().any(|e| e.function == f);
    for leaf in [0xb, 0x1f] {
        if leaf == 0xb || has_leaf(leaf) {
            entries.extend(topology_leaf(leaf, apic_id, count));
        }
    }
    if let Some(khz) = tsc_khz {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: APIC_TIMER_KHZ,
            ..Default::default()
        });
    }
    // The entries come from KVM's own list (bounded by KVM_MAX_CPUID_ENTRIES) plus a handful.
    CpuId::from_entries(&entries).unwrap_or_else(|_| base.clone())
}

/// Leaf 0xB/0x1F: level 0 is SMT (one thread), level 1 is core (all vCPUs), then invalid.
fn topology_leaf(leaf: u32, apic_id: u8, count: u32) -> [kvm_cpuid_entry2; 3] {
    let sub = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: u32::from(apic_id),
        ..Default::default()
    };
    [
        sub(0, 0, 1, 1),
        sub(1, id_bits(count), count, 2),
        sub(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0x1,
                ebx: 0xffff_ff00,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4,
                index: 3,
                eax: (3 << 5) | 0x3,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0007,
                edx: INVARIANT_TSC | 1,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    /// A TSC of unknown frequency that KVM sets.
    const TSC: Tsc = Tsc {
        khz: None,
        writable: true,
    };

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let c = for_vcpu(&base(), 3, Topology { vcpus: 4 }, TSC);
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & (1 << 31), 0);
        assert_ne!(e.edx & (1 << 28), 0);
    }

    #[test]
    fn topology_leaf_describes_one_socket_of_n_cores() {
        let c = for_vcpu(&base(), 5, Topology { vcpus: 6 }, TSC);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 5));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 6, 2, 5));
        assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0);
        let l3 = find(&c, 4, 3);
        assert_eq!(l3.eax >> 26, 5);
        assert_eq!((l3.eax >> 14) & 0xfff, 5);
    }

    #[test]
    fn timing_leaf_is_added_when_tsc_is_known() {
        let khz = Some(2_500_000);
        let c = for_vcpu(&base(), 0, Topology { vcpus: 1 }, Tsc { khz, ..TSC });
        assert_eq!(find(&c, 0x4000_0000, 0).eax, TIMING_LEAF);
        assert_eq!(find(&c, TIMING_LEAF, 0).eax, 2_500_000);
        let c = for_vcpu(&base(), 0, Topology { vcpus: 1 }, TSC);
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0x4000_0001);
    }

    #[test]
    fn invariant_tsc_is_hidden_only_when_kvm_cannot_set_the_tsc() {
        let c = for_vcpu(&base(), 0, Topology { vcpus: 1 }, TSC);
        assert_eq!(find(&c, 0x8000_0007, 0).edx, INVARIANT_TSC | 1);
        let pvm = Tsc {
            writable: false,
            ..TSC
        };
        let c = for_vcpu(&base(), 0, Topology { vcpus: 1 }, pvm);
        assert_eq!(find(&c, 0x8000_0007, 0).edx, 1);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
