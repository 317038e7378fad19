//! The state a vCPU enters a 64-bit Linux kernel in (Linux boot protocol, "64-bit boot
//! protocol" in Documentation/arch/x86/boot.rst): long mode with an identity map, flat
//! segments from a GDT, `RSI` pointing at the zero page, interrupts off.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::*;
use crate::memory::GuestMemory;

/// Errors when setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

fn mem(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> RegsError {
    move |source| RegsError::Memory { what, source }
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT descriptor from its flags (access byte in bits 0–7, flags nibble in 12–15),
/// base and limit (Intel SDM vol. 3A, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The segment register KVM wants for GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and identity-mapping page tables for 0..4 GiB, and
/// returns the special registers for a 64-bit entry.
pub fn setup_long_mode(memory: &GuestMemory, mut sregs: kvm_sregs) -> Result<kvm_sregs, RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(mem("the boot GDT"))?;
    }
    memory
        .write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(mem("the boot IDT"))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(BOOT_GDT[3], 3);

    write_page_tables(memory)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Identity-maps 0..4 GiB with 2 MiB pages: PML4[0] → PDPT, PDPT[0..4] → four page directories.
fn write_page_tables(memory: &GuestMemory) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPTE_START | PRESENT_RW;
    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().take(4).enumerate() {
        *e = (PDE_START + 0x1000 * i as u64) | PRESENT_RW;
    }
    let pds: Vec<u64> = (0..2048u64)
        .map(|i| (i << 21) | PRESENT_RW | PAGE_SIZE_2M)
        .collect();
    let bytes = |t: &[u64]| t.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    memory
        .write_slice(&bytes(&pml4), GuestAddress(PML4_START))
        .map_err(mem("the PML4"))?;
    memory
        .write_slice(&bytes(&pdpt), GuestAddress(PDPTE_START))
        .map_err(mem("the PDPT"))?;
    memory
        .write_slice(&bytes(&pds), GuestAddress(PDE_START))
        .map_err(mem("the page directories"))?;
    Ok(())
}

/// Puts the boot vCPU at `entry` in 64-bit mode with the zero page in RSI.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    memory: &GuestMemory,
    entry: GuestAddress,
) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let sregs = setup_long_mode(memory, sregs)?;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// Wires LINT0 to ExtINT (the 8259) and LINT1 to NMI, as a PC's BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&state).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_code_segment_is_64bit_present_ring0() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.dpl, cs.s, cs.g),
            (1, 0, 1, 0, 1, 1)
        );
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn gdt_entry_round_trips_base_and_limit() {
        // Byte-granular TSS descriptor.
        let e = gdt_entry(0x008b, 0x1234_5678, 0x6_7890);
        let s = segment_from_gdt(e, 3);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x6_7890);
        assert_eq!((s.type_, s.g, s.present), (0xb, 0, 1));
        // Page-granular: the limit counts 4 KiB pages.
        let s = segment_from_gdt(gdt_entry(0x808b, 0, 0x6_7890), 3);
        assert_eq!((s.limit, s.g), (0x6789_0fff, 1));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let memory = crate::memory::create(16 << 20).unwrap();
        let sregs = setup_long_mode(&memory, kvm_sregs::default()).unwrap();

        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpt3: u64 = memory.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PDE_START + 0x3000);
        // The last 2 MiB page of the fourth directory maps 4 GiB - 2 MiB.
        let last: u64 = memory
            .read_obj(GuestAddress(PDE_START + 0x4000 - 8))
            .unwrap();
        assert_eq!(last & !0x1fffff, 0xffe0_0000);
        assert_eq!(last & 0x83, 0x83);
    }
}
