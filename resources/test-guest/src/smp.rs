//! Starting the application processors.
//!
//! The BSP copies the real-mode trampoline (linked at 0x8000, stored in the
//! image, see `link.ld`) to 0x8000, stores the physical address of its page
//! tables in it and sends each enabled processor of the MADT INIT, SIPI,
//! SIPI (vector 0x08 = 0x8000). An AP goes real mode -> 32-bit protected
//! mode (the trampoline's GDT) -> PAE, EFER.LME, CR3, paging -> long mode,
//! jumps to `ap_entry64` in the image, takes a stack slot with `lock xadd`
//! and calls [`ap_main`], which loads the GDT and IDT, enables its local
//! APIC, finds its CPU index from its APIC id, counts itself online and
//! idles in `hlt` (see [`crate::count`]).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::acpi::{AcpiInfo, MAX_CPUS};
use crate::sync::Global;
use crate::{apic, count, cpu, interrupts, time};

/// Bytes of stack per CPU (the linker script reserves `MAX_CPUS` of them).
pub const STACK_SIZE: usize = 0x4000;
const TRAMPOLINE_ADDR: usize = 0x8000;
const SIPI_VECTOR: u8 = (TRAMPOLINE_ADDR >> 12) as u8;
/// How long the BSP waits for the APs to come online.
const AP_TIMEOUT_MS: u64 = 5_000;

global_asm!(
    r#"
    .section .tramp16, "ax"
    .code16
    .global tramp_start
tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl tramp_gdtr
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $tramp32

    .section .tramp32, "ax"
    .code32
tramp32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl tramp_cr3, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x18, $tramp64

    .section .tramp64, "ax"
    .code64
tramp64:
    movl $ap_entry64, %eax
    jmpq *%rax

    .section .trampdata, "aw"
    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
tramp_gdtr:
    .word 31
    .long tramp_gdt
    .balign 4
    .global tramp_cr3
tramp_cr3:
    .long 0

    .section .text.ap_entry, "ax"
    .code64
ap_entry64:
    movl $1, %eax
    lock xaddl %eax, AP_NEXT_SLOT(%rip)
    incl %eax
    cmpl ${max_cpus}, %eax
    jae 2f
    movl %eax, %edi
    movl %eax, %edx
    incq %rdx
    shlq ${stack_shift}, %rdx
    leaq __stacks_start(%rip), %rsp
    addq %rdx, %rsp
    call ap_main
2:
    cli
    hlt
    jmp 2b
    "#,
    max_cpus = const MAX_CPUS,
    stack_shift = const STACK_SIZE.trailing_zeros(),
    options(att_syntax)
);

extern "C" {
    static __tramp_start: u8;
    static __tramp_end: u8;
    static __tramp_lma: u8;
    static tramp_cr3: u32;
}

/// Stack slots handed to APs (slot 0 is the BSP's).
#[no_mangle]
static AP_NEXT_SLOT: AtomicU32 = AtomicU32::new(0);

/// CPUs (BSP included) that reached 64-bit Rust code.
static ONLINE: AtomicU32 = AtomicU32::new(0);

/// APIC id of each CPU index (0 = BSP, then the APs in MADT order).
static CPU_APIC_IDS: Global<[u32; MAX_CPUS]> = Global::new([0; MAX_CPUS]);
/// Number of valid entries in `CPU_APIC_IDS` (written before APs start).
static CPU_SLOTS: AtomicUsize = AtomicUsize::new(0);

/// Number of CPUs running guest code.
pub fn online_cpus() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// Number of CPU indexes (BSP + APs we tried to start).
pub fn cpu_slots() -> usize {
    CPU_SLOTS.load(Ordering::Acquire)
}

/// Starts every enabled AP of the MADT and waits (bounded) until they are
/// online.
pub fn start_aps(acpi: &AcpiInfo) {
    let bsp_id = apic::id();
    // SAFETY: BSP-only start-up; APs read the table only after the SIPIs.
    let ids = unsafe { &mut *CPU_APIC_IDS.get() };
    let aps = acpi.cpus().iter().copied().filter(|&id| id != bsp_id);
    let mut slots = 0;
    for (slot, id) in ids.iter_mut().zip(core::iter::once(bsp_id).chain(aps)) {
        *slot = id;
        slots += 1;
    }
    CPU_SLOTS.store(slots, Ordering::Release);
    ONLINE.store(1, Ordering::Release);
    if slots <= 1 {
        return;
    }

    install_trampoline();
    let aps = || ids.iter().copied().take(slots).skip(1);
    for id in aps() {
        apic::send_init(id);
    }
    time::delay_us(1_000);
    for _ in 0..2 {
        for id in aps() {
            apic::send_startup(id, SIPI_VECTOR);
        }
        time::delay_us(200);
    }

    let deadline = time::deadline_ms(AP_TIMEOUT_MS);
    while ONLINE.load(Ordering::Acquire) < slots as u32 && !time::passed(deadline) {
        core::hint::spin_loop();
    }
}

fn install_trampoline() {
    let start = &raw const __tramp_start as usize;
    let len = &raw const __tramp_end as usize - start;
    let lma = &raw const __tramp_lma;
    debug_assert_eq!(start, TRAMPOLINE_ADDR);
    // SAFETY: 0x8000.. is free low memory once boot_params were captured
    // (the VMM's boot structures live at 0x500..0x10000 and we no longer use
    // its page tables or GDT); the source is the trampoline's load image.
    unsafe {
        crate::rt::memcpy(start as *mut u8, lma, len);
        let cr3 = &raw const tramp_cr3 as *mut u32;
        cr3.write_volatile(cpu::page_tables_phys() as u32);
    }
}

/// The index of the CPU with APIC id `apic_id`.
fn cpu_index(apic_id: u32) -> Option<usize> {
    // SAFETY: the table is complete before any AP runs.
    let ids = unsafe { &*CPU_APIC_IDS.get() };
    ids.iter().take(cpu_slots()).position(|&id| id == apic_id)
}

/// Rust entry of an AP, on its own stack (`slot` picks the stack only).
#[no_mangle]
extern "C" fn ap_main(_slot: u32) -> ! {
    cpu::load_gdt();
    interrupts::load();
    apic::enable_local();
    let Some(index) = cpu_index(apic::id()) else {
        cpu::halt_forever();
    };
    ONLINE.fetch_add(1, Ordering::AcqRel);
    count::ap_idle(index)
}
