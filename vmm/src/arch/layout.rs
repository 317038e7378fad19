//! Where things live in guest physical memory and in the I/O space.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries) and an empty IDT for the 64-bit entry
//! 0x0000_7000  boot_params (the Linux "zero page"), pointed to by RSI
//! 0x0000_8ff0  initial stack pointer (grows down)
//! 0x0000_9000  PML4, PDPT and 4 page directories: identity map of 0..4 GiB in 2 MiB pages
//! 0x0002_0000  kernel command line (NUL-terminated, at most 2 KiB)
//! 0x0009_fc00  EBDA .. 0x000a_0000 (reserved)
//! 0x000e_0000  ACPI tables: RSDP first, so a legacy scan of 0xe0000..0xfffff finds it
//! 0x0010_0000  kernel (loaded at its ELF physical addresses) and the rest of RAM
//! 0xc000_0000  32-bit MMIO hole up to 4 GiB: virtio-mmio, IOAPIC, LAPIC; RAM resumes at 4 GiB
//! ```

/// The GDT the boot vCPU starts with.
pub const BOOT_GDT_START: u64 = 0x500;
/// The (empty) IDT the boot vCPU starts with.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The boot page tables: PML4, then PDPT, then the page directories.
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// The first of four page directories.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// The largest command line, including its NUL (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The start of the extended BIOS data area, where low RAM ends.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables area.
pub const ACPI_START: u64 = 0xe0000;
/// The end of the ACPI tables area (and of the legacy BIOS area).
pub const ACPI_END: u64 = 0x10_0000;
/// Where "high" memory starts; kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The end of the 32-bit MMIO hole: 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The IOAPIC's registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Every local APIC's registers (xAPIC mode).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (needs three pages inside the MMIO hole, away from everything else).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
