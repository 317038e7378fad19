//! Legacy PC devices on the port-I/O bus.
//!
//! | device | ports | what it does |
//! |---|---|---|
//! | [`Serial`] | 0x3f8–0x3ff (COM1), IRQ 4 | 16550A UART from vm-superio; console in and out |
//! | [`I8042`] | 0x60–0x64 | keyboard controller; only command 0xFE (pulse CPU reset) matters |
//! | [`AcpiPm`] | 0x600–0x601 | sleep control / status registers of the hardware-reduced FADT |
//! | [`ResetControl`] | 0xcf9 | the PC reset control register, also the FADT's reset register |
//! | [`PvPanic`] | 0x505 | QEMU's pvpanic port: the guest reports a panic |

mod power;
mod serial;

pub use power::{AcpiPm, I8042State, PvPanic, ResetControl, ResetControlState, I8042};
pub use serial::{irq_eventfd, Serial, SerialInput, SerialRegisters, SerialResources};

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042's first port (data); its command port is this + 4.
pub const I8042_PORT: u16 = 0x60;
/// The ACPI sleep control register; the sleep status register follows it.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// The reset control register (also the FADT reset register).
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// The value that requests a reset through [`RESET_CONTROL_PORT`].
pub const RESET_CONTROL_VALUE: u8 = 0x06;
/// The pvpanic port.
pub const PVPANIC_PORT: u16 = 0x505;
/// The sleep type the DSDT's `\_S5` package gives for soft-off.
pub const SLEEP_TYPE_S5: u8 = 5;
