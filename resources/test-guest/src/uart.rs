//! COM1, an 8250/16550 UART at I/O ports 0x3f8..0x3ff.
//!
//! Every port access is a VM exit, so input is interrupt-driven: the UART
//! raises ISA IRQ 4 (IOAPIC pin 4) when a byte arrives and the CPU sleeps in
//! `hlt` in between (see [`crate::shell`]).

use crate::cpu::{inb, outb};

const BASE: u16 = 0x3f8;
const RBR_THR: u16 = BASE;
const IER: u16 = BASE + 1;
const MCR: u16 = BASE + 4;
const LSR: u16 = BASE + 5;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// ISA IRQ (= IOAPIC pin) of COM1.
pub const COM1_IRQ: u8 = 4;

/// Sends one byte, waiting until the transmitter holding register is empty.
pub fn put_byte(byte: u8) {
    while inb(LSR) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(RBR_THR, byte);
}

/// A received byte, if one is waiting.
pub fn try_get_byte() -> Option<u8> {
    if data_ready() {
        Some(inb(RBR_THR))
    } else {
        None
    }
}

/// Whether the receive buffer holds a byte.
pub fn data_ready() -> bool {
    inb(LSR) & LSR_DATA_READY != 0
}

/// Enables the "received data available" interrupt; MCR = DTR | RTS | OUT2
/// (OUT2 gates the IRQ line on PC hardware).
pub fn enable_rx_interrupt() {
    outb(MCR, 0x0b);
    outb(IER, 0x01);
}
