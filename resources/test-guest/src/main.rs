//! The Strata test guest: a freestanding x86_64 program that boots through
//! the 64-bit Linux boot protocol (as an ELF `vmlinux` would), starts its
//! application processors and answers commands on the COM1 serial console.
//!
//! It is built by `resources/build.rs` with the host `rustc` (no rustup
//! target), without SSE, because the KVM our tests run on (PVM) emulates
//! guest kernel code and refuses SSE/AVX/x87, `popcnt`, `int3` and friends.
//! Hence the house rules of this crate:
//! - no `core::fmt` integer formatting, no floats: [`console`] formats
//!   integers itself and writes only `&str`/bytes;
//! - `memcpy` and friends come from [`rt`];
//! - every instruction in the image must be one the emulator knows; the
//!   `resources` crate's tests disassemble the image to check.
//!
//! See `README.md` next to `src/` for the boot contract and the console.

#![no_std]
#![no_main]

mod acpi;
mod agent;
mod apic;
mod blk;
mod boot;
mod bootparams;
mod commands;
mod console;
mod count;
mod cpu;
mod disklog;
mod flood;
mod hostile;
mod interrupts;
mod memtest;
mod pattern;
mod power;
mod rt;
mod shell;
mod smp;
mod sync;
mod time;
mod uart;
mod virtio;
mod vsock;

/// Rust entry of the bootstrap processor, called by `_start` (see [`boot`])
/// on the boot stack with `.bss` zeroed. `boot_params` is the physical
/// address the VMM passed in RSI.
#[no_mangle]
extern "C" fn bsp_main(boot_params: usize) -> ! {
    console::write_str("strata test guest booting\r\n");

    // Copy what we need out of the zero page and the command line before any
    // low memory is reused (the AP trampoline goes to 0x8000).
    bootparams::capture(boot_params);

    cpu::init_bsp();
    interrupts::init();
    time::init();
    let acpi = acpi::scan(bootparams::get().rsdp);

    interrupts::mask_legacy_pics();
    apic::init_bsp();
    smp::start_aps(acpi);

    apic::route_isa_irq(acpi.ioapic, uart::COM1_IRQ, interrupts::SERIAL_VECTOR);
    uart::enable_rx_interrupt();
    virtio::discover(acpi.ioapic);
    blk::init();
    vsock::init();
    cpu::enable_interrupts();

    let mut out = console::lock();
    out.str("strata test guest ready cpus=");
    out.dec(u64::from(smp::online_cpus()));
    out.str("\r\n");
    drop(out);

    shell::run()
}
