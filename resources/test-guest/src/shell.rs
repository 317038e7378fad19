//! The console's line editor: reads bytes from COM1 (sleeping in `hlt`
//! between interrupts, or counting while `count` runs), echoes them, and
//! hands complete lines to [`crate::commands`].

use crate::{apic, commands, console, count, cpu, disklog, uart, vsock};

/// Longest command line.
const LINE_MAX: usize = 256;
/// BSP increments between two looks at the UART while counting.
const SPIN_BATCH: u32 = 4096;

/// Prompts, reads and runs commands forever.
pub fn run() -> ! {
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    let mut overflow = false;
    let mut last = 0u8;
    console::write_str("> ");
    loop {
        let byte = read_byte();
        let prev = core::mem::replace(&mut last, byte);
        match byte {
            // "\r\n" is one line end, not two.
            b'\n' if prev == b'\r' => {}
            b'\r' | b'\n' => {
                console::write_str("\r\n");
                if overflow {
                    console::write_str("err line too long\r\n");
                } else if let Some(command @ [_, ..]) = line.get(..len) {
                    commands::run(command);
                }
                len = 0;
                overflow = false;
                console::write_str("> ");
            }
            0x08 | 0x7f => {
                if len > 0 {
                    len -= 1;
                    console::write_str("\x08 \x08");
                }
            }
            _ => {
                match line.get_mut(len) {
                    Some(slot) => {
                        *slot = byte;
                        len += 1;
                    }
                    None => overflow = true,
                }
                console::lock().bytes(&[byte]);
            }
        }
    }
}

/// The next input byte. Between bytes the BSP does the background work
/// (vsock packets, one `log` record per turn, the automatic thaw) and
/// otherwise sleeps with `hlt` until an interrupt (UART, virtio, the APIC
/// timer while a thaw is pending): no polling of idle devices, since every
/// port read is a VM exit. While `count` runs, it counts instead and looks
/// at the UART every [`SPIN_BATCH`] increments.
fn read_byte() -> u8 {
    loop {
        if count::running() {
            count::bsp_spin(SPIN_BATCH);
        }
        if let Some(byte) = uart::try_get_byte() {
            return byte;
        }
        if background() || count::running() {
            continue;
        }
        cpu::disable_interrupts();
        if uart::data_ready() || vsock::pending() || disklog::wants_step() {
            cpu::enable_interrupts();
            continue;
        }
        cpu::sti_hlt();
    }
}

/// One round of background work; true if anything was done.
fn background() -> bool {
    let mut did = vsock::poll();
    disklog::check_thaw();
    if disklog::wants_step() {
        disklog::step();
        did = true;
    }
    // The timer runs only while an automatic thaw is pending (or while a
    // bounded wait elsewhere holds it).
    let want_timer = disklog::thaw_deadline().is_some();
    // SAFETY: BSP only.
    let timer = unsafe { &mut *THAW_TIMER.get() };
    if want_timer != timer.is_some() {
        *timer = want_timer.then(apic::WakeTimer::hold);
    }
    did
}

static THAW_TIMER: crate::sync::Global<Option<apic::WakeTimer>> = crate::sync::Global::new(None);
