//! Devices through which the guest powers off, resets or reports a panic.
//!
//! Of these only the reset control holds state a guest can read back (the last value written,
//! reset bit aside); it and the i8042 implement [`Persist`]. The i8042 has no state beyond its
//! reset line (vm-superio's `I8042Device` keeps nothing else), so its saved state is empty; it
//! is saved anyway so that a later i8042 with state fits the format. The ACPI sleep registers and
//! the pvpanic port hold nothing.

use serde::{Deserialize, Serialize};
use snapshot::{check, Persist, StateError};
use vm_superio::{I8042Device, Trigger};

use super::SLEEP_TYPE_S5;
use crate::bus::BusDevice;
use crate::{GuestEvent, GuestEventSink};

/// SLP_EN in the sleep control register (ACPI 6.5, 4.8.3.7).
const SLP_EN: u8 = 1 << 5;

/// The sleep control and status registers of a hardware-reduced ACPI platform.
///
/// A guest powers off by writing `SLP_TYPx << 2 | SLP_EN` to the sleep control register, with
/// SLP_TYPx taken from the DSDT's `\_S5` object; Linux does exactly that on `poweroff`.
pub struct AcpiPm {
    events: GuestEventSink,
}

impl AcpiPm {
    /// A register block that reports power-off to `events`.
    pub fn new(events: GuestEventSink) -> Self {
        Self { events }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, nothing to wake from.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return; // Writes to the status register clear bits; there are none.
        }
        let Some(&value) = data.first() else { return };
        let sleep_type = (value >> 2) & 0x7;
        if value & SLP_EN != 0 && sleep_type == SLEEP_TYPE_S5 {
            (self.events)(GuestEvent::PowerOff);
        } else if value & SLP_EN != 0 {
            crate::rate_limited!(
                log::Level::Warn,
                "guest asked for unsupported sleep type {sleep_type}; ignored"
            );
        }
    }
}

/// The PC reset control register at port 0xcf9; the FADT names it as the ACPI reset register.
pub struct ResetControl {
    events: GuestEventSink,
    value: u8,
}

impl ResetControl {
    /// A reset register that reports resets to `events`.
    pub fn new(events: GuestEventSink) -> Self {
        Self { events, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        self.value = value & RESET_CONTROL_BITS;
        // Bit 2 (RST_CPU) starts the reset; bit 1 picks hard or soft, which we treat alike.
        if value & 0x04 != 0 {
            (self.events)(GuestEvent::Reset);
        }
    }
}

/// The bits of the reset control register that read back (SYS_RST, RST_CPU, FULL_RST).
const RESET_CONTROL_BITS: u8 = 0x0e;

/// The reset control register's saved state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResetControlState {
    /// The value reads return.
    pub value: u8,
}

impl Persist for ResetControl {
    type State = ResetControlState;
    /// Where the restored register reports resets.
    type Resources = GuestEventSink;
    type Error = StateError;

    fn save(&self) -> ResetControlState {
        ResetControlState { value: self.value }
    }

    fn restore(events: GuestEventSink, state: &ResetControlState) -> Result<Self, StateError> {
        check(state.value & !RESET_CONTROL_BITS == 0, "value", || {
            format!(
                "{:#04x} has bits the register never holds (only {RESET_CONTROL_BITS:#04x})",
                state.value
            )
        })?;
        Ok(Self {
            events,
            value: state.value,
        })
    }
}

/// The pvpanic port (QEMU's `pvpanic` ISA device, `_HID` QEMU0001): reading it returns the
/// events supported, writing bit 0 reports a guest panic.
pub struct PvPanic {
    events: GuestEventSink,
}

/// PVPANIC_PANICKED.
const PVPANIC_PANICKED: u8 = 1 << 0;

impl PvPanic {
    /// A pvpanic port that reports panics to `events`.
    pub fn new(events: GuestEventSink) -> Self {
        Self { events }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            (self.events)(GuestEvent::Panic);
        }
    }
}

/// Reports a reset when the i8042's CPU-reset line is pulsed.
struct ResetLine(GuestEventSink);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(GuestEvent::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller, of which only the CPU reset line (command 0xFE on port 0x64)
/// is wired up; there is no keyboard.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// An i8042 that reports resets to `events`.
    pub fn new(events: GuestEventSink) -> Self {
        Self(I8042Device::new(ResetLine(events)))
    }
}

/// The i8042's saved state: nothing (see the module docs).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    /// Where the restored controller reports resets.
    type Resources = GuestEventSink;
    type Error = StateError;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(events: GuestEventSink, _state: &I8042State) -> Result<Self, StateError> {
        Ok(Self::new(events))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.0.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            // The trigger is infallible.
            let _ = self.0.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (GuestEventSink, Arc<Mutex<Vec<GuestEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = seen.clone();
        let sink: GuestEventSink = Arc::new(move |e| sink_seen.lock().unwrap().push(e));
        (sink, seen)
    }

    #[test]
    fn s5_with_slp_en_powers_off_other_values_do_not() {
        let (sink, seen) = recorder();
        let mut pm = AcpiPm::new(sink);

        pm.write(0, &[SLEEP_TYPE_S5 << 2]); // no SLP_EN
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3 is not supported
        pm.write(1, &[0xff]); // status register
        pm.write(0, &[]);
        assert!(seen.lock().unwrap().is_empty());

        pm.write(0, &[(SLEEP_TYPE_S5 << 2) | SLP_EN]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestEvent::PowerOff]);
    }

    #[test]
    fn reset_register_resets_only_with_rst_cpu() {
        let (sink, seen) = recorder();
        let mut rc = ResetControl::new(sink);

        rc.write(0, &[0x02]);
        let mut v = [0u8; 1];
        rc.read(0, &mut v);
        assert_eq!(v, [0x02]);
        assert!(seen.lock().unwrap().is_empty());

        rc.write(0, &[super::super::RESET_CONTROL_VALUE]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestEvent::Reset]);
    }

    #[test]
    fn i8042_command_fe_resets() {
        let (sink, seen) = recorder();
        let mut kbd = I8042::new(sink);

        kbd.write(4, &[0xaa]);
        kbd.write(0, &[0xfe]);
        assert!(seen.lock().unwrap().is_empty());

        kbd.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestEvent::Reset]);
    }

    #[test]
    fn reset_control_state_round_trips_and_bad_values_are_refused() {
        let (sink, seen) = recorder();
        let mut rc = ResetControl::new(sink.clone());
        rc.write(0, &[0x0a]);
        let saved = rc.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: ResetControlState = serde_json::from_str(&json).unwrap();

        let mut restored = ResetControl::restore(sink.clone(), &back).unwrap();
        let mut v = [0u8; 1];
        restored.read(0, &mut v);
        let bad = ResetControl::restore(sink.clone(), &ResetControlState { value: 0x11 });
        restored.write(0, &[super::super::RESET_CONTROL_VALUE]);

        assert_eq!(back, ResetControlState { value: 0x0a });
        assert_eq!(v, [0x0a]);
        assert_eq!(restored.save(), ResetControlState { value: 0x06 });
        assert_eq!(bad.err().map(|e| e.field), Some("value".to_string()));
        // The restored register reports through the new sink.
        assert_eq!(*seen.lock().unwrap(), vec![GuestEvent::Reset]);
    }

    #[test]
    fn i8042_state_round_trips_and_the_restored_one_resets() {
        let (sink, seen) = recorder();
        let kbd = I8042::new(sink.clone());
        let json = serde_json::to_string(&kbd.save()).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        let mut restored = I8042::restore(sink, &back).unwrap();
        restored.write(4, &[0xfe]);

        assert_eq!(json, "{}");
        assert_eq!(restored.save(), back);
        assert!(serde_json::from_str::<I8042State>("{\"x\":1}").is_err());
        assert_eq!(*seen.lock().unwrap(), vec![GuestEvent::Reset]);
    }

    #[test]
    fn pvpanic_reports_panic_and_advertises_it() {
        let (sink, seen) = recorder();
        let mut p = PvPanic::new(sink);
        let mut v = [0u8; 1];
        p.read(0, &mut v);
        assert_eq!(v, [PVPANIC_PANICKED]);

        p.write(0, &[0x02]);
        assert!(seen.lock().unwrap().is_empty());
        p.write(0, &[0x01]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestEvent::Panic]);
    }
}
