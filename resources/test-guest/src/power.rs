//! Leaving the VM: ACPI poweroff, i8042 reset, pvpanic.

use crate::acpi;
use crate::cpu::{self, outb};

/// SLP_TYP = 5 (S5) in bits 2..4, SLP_EN in bit 5: what Linux writes to the
/// sleep control register of a hardware-reduced ACPI machine to power off.
const SLEEP_S5: u8 = (5 << 2) | (1 << 5);
/// The pvpanic I/O port; writing bit 0 ("guest panicked") makes the VMM stop
/// the VM with an error.
const PVPANIC_PORT: u16 = 0x505;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xFE;

/// Why poweroff cannot be done.
pub enum PowerOffError {
    /// No FADT in the ACPI tables.
    NoFadt,
    /// The FADT has no `X_SLEEP_CONTROL_REG`.
    NoSleepControl,
}

/// The register that powers the machine off.
pub struct PowerOff(acpi::GenericAddress);

/// Checks that poweroff is possible; returns the action that performs it.
pub fn prepare_poweroff() -> Result<PowerOff, PowerOffError> {
    let gas = match acpi::sleep_control() {
        Err(()) => return Err(PowerOffError::NoFadt),
        Ok(None) => return Err(PowerOffError::NoSleepControl),
        Ok(Some(gas)) if gas.space_id == 1 && gas.address <= 0xFFFF => gas,
        Ok(Some(gas)) if gas.space_id == 0 && gas.address < (1 << 32) => gas,
        Ok(Some(_)) => return Err(PowerOffError::NoSleepControl),
    };
    Ok(PowerOff(gas))
}

impl PowerOff {
    /// Writes SLP_TYP=S5|SLP_EN to the sleep control register and stops.
    pub fn run(self) -> ! {
        let gas = self.0;
        match gas.space_id {
            1 => outb(gas.address as u16, SLEEP_S5),
            // SAFETY: a system-memory register the FADT names, below 4 GiB
            // (checked), identity mapped by our tables.
            _ => unsafe { (gas.address as *mut u8).write_volatile(SLEEP_S5) },
        }
        cpu::halt_forever()
    }
}

/// Asks for a reset through the i8042 controller.
pub fn reboot() -> ! {
    outb(I8042_COMMAND, I8042_RESET);
    cpu::halt_forever()
}

/// Reports a guest panic through pvpanic and stops.
pub fn guest_panic() -> ! {
    outb(PVPANIC_PORT, 1);
    cpu::halt_forever()
}
