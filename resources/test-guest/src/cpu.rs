//! CPU plumbing: port I/O, MSRs, interrupt flag, our GDT and the identity
//! page tables (0..4 GiB in 2 MiB pages, the top GiB uncached for MMIO).

use core::arch::asm;

/// Kernel code segment selector in [`GDT`].
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector in [`GDT`].
pub const KERNEL_DS: u16 = 0x10;

/// Null, 64-bit code, data.
static GDT: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
/// Pages from here up are uncached (LAPIC, IOAPIC, virtio-mmio, ...).
const UNCACHED_FROM: u64 = 0xC000_0000;
const TABLE_FLAGS: usize = (PTE_PRESENT | PTE_WRITE) as usize;

/// PML4, one PDPT and four page directories: 0..4 GiB identity-mapped with
/// 2 MiB pages.
///
/// The tables are static data, complete at link time, so boot does no work
/// for them (a loop over 2048 entries costs milliseconds under emulation).
/// The upper-level entries are pointers into the same static plus the flag
/// bits, which the linker resolves (R_X86_64_64): this works because the
/// image runs where it is linked, identity-mapped.
#[repr(C, align(4096))]
struct PageTables {
    pml4: [*const u8; 512],
    pdpt: [*const u8; 512],
    pd: [u64; 4 * 512],
}

struct SharedTables(PageTables);

// SAFETY: the tables are only read by software (the CPU may set accessed
// and dirty bits in them, which nothing here looks at).
unsafe impl Sync for SharedTables {}

// In .data: the CPU writes accessed/dirty bits into the entries.
#[link_section = ".data.pagetables"]
static PAGE_TABLES: SharedTables = SharedTables(PageTables {
    pml4: upper_table(&raw const PAGE_TABLES.0.pdpt as *const u8, 1),
    pdpt: upper_table(&raw const PAGE_TABLES.0.pd as *const u8, 4),
    pd: identity_2mib_entries(),
});

/// A table whose first `count` entries point at consecutive 4 KiB tables
/// starting at `first`, the rest not present.
const fn upper_table(first: *const u8, count: usize) -> [*const u8; 512] {
    let mut table = [core::ptr::null(); 512];
    let mut i = 0;
    while i < count {
        table[i] = first.wrapping_add(i * 4096 + TABLE_FLAGS);
        i += 1;
    }
    table
}

/// 2048 page-directory entries mapping 0..4 GiB onto itself.
const fn identity_2mib_entries() -> [u64; 4 * 512] {
    let mut pd = [0u64; 4 * 512];
    let mut i = 0;
    while i < pd.len() {
        let base = (i as u64) << 21;
        let cache = if base >= UNCACHED_FROM {
            PTE_PCD | PTE_PWT
        } else {
            0
        };
        pd[i] = base | PTE_PRESENT | PTE_WRITE | PTE_HUGE | cache;
        i += 1;
    }
    pd
}

/// Reads an I/O port byte.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes an I/O port byte.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the ports we use are the UART, PICs, i8042, pvpanic and ACPI.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only architectural MSRs are read.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only architectural MSRs (APIC) are written.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// `cli`.
pub fn disable_interrupts() {
    // SAFETY: only changes IF.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// `sti`.
pub fn enable_interrupts() {
    // SAFETY: the IDT is loaded before anyone calls this.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// `sti; hlt`: sleeps until the next interrupt. An interrupt that became
/// pending while interrupts were off is taken during the `hlt` (the `sti`
/// shadow), so "cli; check condition; sti_hlt" does not lose wake-ups.
pub fn sti_hlt() {
    // SAFETY: waits for an interrupt; the handlers return here.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: no interrupts, nothing else to do.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Switches to our page tables, then loads our GDT. BSP only, before the
/// APs start (they load CR3 from the trampoline).
pub fn init_bsp() {
    // SAFETY: the new tables identity-map everything the old ones did (the
    // VMM maps at least the first GiB identically).
    unsafe {
        asm!("mov cr3, {}", in(reg) page_tables_phys(), options(nostack, preserves_flags));
    }
    load_gdt();
}

/// Physical address of the PML4 (identity mapped, below 4 GiB).
pub fn page_tables_phys() -> u64 {
    &raw const PAGE_TABLES as u64
}

/// Loads [`GDT`] and reloads every segment register (CS through `iretq`).
/// Run on every CPU.
pub fn load_gdt() {
    let pointer = DescriptorPointer {
        limit: (core::mem::size_of_val(&GDT) - 1) as u16,
        base: GDT.as_ptr() as u64,
    };
    // SAFETY: the GDT is static and its code/data descriptors match what the
    // CPU runs on now (64-bit ring 0); iretq returns to label 2 with CS
    // reloaded and the same stack.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "mov fs, {ds:x}",
            "mov gs, {ds:x}",
            "mov {tmp}, rsp",
            "push {ds}",
            "push {tmp}",
            "pushfq",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            ptr = in(reg) &raw const pointer,
            ds = in(reg) u64::from(KERNEL_DS),
            cs = in(reg) u64::from(KERNEL_CS),
            tmp = out(reg) _,
        );
    }
}

/// Loads the IDT at `base` with `entries` 16-byte gates.
pub fn load_idt(base: u64, entries: usize) {
    let pointer = DescriptorPointer {
        limit: (entries * 16 - 1) as u16,
        base,
    };
    // SAFETY: the caller's IDT is static and fully initialised.
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags))
    };
}
