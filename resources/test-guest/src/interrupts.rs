//! The IDT, the interrupt entry stubs and the Rust dispatcher.
//!
//! Each of the 256 vectors has a 16-byte stub in `isr_stubs` that pushes a
//! dummy error code (when the CPU pushes none) and its vector, then jumps to
//! `isr_common`, which saves the general-purpose registers, calls
//! [`interrupt_dispatch`] with a pointer to the [`Frame`] and returns with
//! `iretq`. No SSE state needs saving: nothing in the image touches it.

use core::arch::global_asm;

use crate::cpu::{self, outb};
use crate::sync::Global;
use crate::{apic, console, power, virtio};

/// COM1 receive interrupts (IOAPIC pin 4).
pub const SERIAL_VECTOR: u8 = 0x30;
/// The IPI the BSP sends to wake APs (e.g. for `count start`).
pub const WAKE_VECTOR: u8 = 0xF0;
/// The local APIC timer (wakes the idle loop for timed work).
pub const TIMER_VECTOR: u8 = 0x3F;
/// One past the last virtio transport vector.
const VIRTIO_VECTOR_END: u8 = virtio::VECTOR_BASE + virtio::MAX_TRANSPORTS as u8;
/// Local APIC spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const NMI_VECTOR: u64 = 2;
const IDT_ENTRIES: usize = 256;
const STUB_SIZE: u64 = 16;
const GATE_INTERRUPT: u64 = 0x8E; // present, DPL 0, 64-bit interrupt gate

global_asm!(
    r#"
    .section .text.isr, "ax"
    .balign 16
    .global isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

    // A stub longer than 16 bytes would move this label past
    // isr_stubs + 4096; the resources crate's tests check it does not.
    .balign 16
    .global isr_common
isr_common:
    cld
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call interrupt_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    "#,
    options(att_syntax)
);

/// What `isr_common` leaves on the stack (lowest address first).
#[repr(C)]
pub struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

extern "C" {
    static isr_stubs: u8;
}

#[repr(C, align(16))]
struct Idt([[u64; 2]; IDT_ENTRIES]);

// Not zeroed at boot: `init` writes every gate.
#[link_section = ".bss.noinit.idt"]
static IDT: Global<Idt> = Global::new(Idt([[0; 2]; IDT_ENTRIES]));

/// Fills the IDT and loads it on the BSP.
pub fn init() {
    let stubs = &raw const isr_stubs as u64;
    // SAFETY: BSP-only start-up, before interrupts are enabled or APs run.
    let idt = unsafe { &mut *IDT.get() };
    for (vector, gate) in idt.0.iter_mut().enumerate() {
        let handler = stubs + vector as u64 * STUB_SIZE;
        gate[0] = (handler & 0xFFFF)
            | (u64::from(cpu::KERNEL_CS) << 16)
            | (GATE_INTERRUPT << 40)
            | ((handler >> 16) & 0xFFFF) << 48;
        gate[1] = handler >> 32;
    }
    load();
}

/// Loads the (already filled) IDT on this CPU.
pub fn load() {
    cpu::load_idt(IDT.get() as u64, IDT_ENTRIES);
}

/// Masks both legacy 8259 PICs: interrupts come through the IOAPIC.
pub fn mask_legacy_pics() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

#[no_mangle]
extern "C" fn interrupt_dispatch(frame: &mut Frame) {
    let vector = frame.vector;
    if vector == NMI_VECTOR {
        // A VMM may inject NMIs (e.g. to get a guest's attention); they need
        // no EOI and are not errors.
        return;
    }
    if vector < 32 {
        exception(frame);
    }
    match vector as u8 {
        SPURIOUS_VECTOR => {}
        v @ virtio::VECTOR_BASE..VIRTIO_VECTOR_END => {
            virtio::handle_irq(usize::from(v - virtio::VECTOR_BASE));
            apic::eoi();
        }
        // The serial and wake handlers only need to end the `hlt`: the
        // interrupted loop looks at the UART / the shared flags itself.
        _ => apic::eoi(),
    }
}

fn exception(frame: &Frame) -> ! {
    let mut out = console::lock_for_crash();
    out.str("exception ");
    out.dec(frame.vector);
    out.str(" error=");
    out.hex(frame.error);
    out.str(" rip=");
    out.hex(frame.rip);
    out.nl();
    drop(out);
    power::guest_panic()
}
