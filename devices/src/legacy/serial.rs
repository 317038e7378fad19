//! COM1: vm-superio's 16550A with an irqfd interrupt and back-pressured input.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;

/// Raises the UART's interrupt by signalling an eventfd the VMM registered as an irqfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input feeder that the guest drained the receive FIFO.
struct SpaceEvents(Arc<EventFd>);

impl SerialEvents for SpaceEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            crate::rate_limited!(
                log::Level::Warn,
                "serial: cannot signal free input space: {e}"
            );
        }
    }
}

type Uart = vm_superio::Serial<IrqTrigger, SpaceEvents, Box<dyn Write + Send>>;

/// The COM1 UART.
pub struct Serial {
    uart: Uart,
    irq: EventFd,
    space: Arc<EventFd>,
}

impl Serial {
    /// A UART that interrupts through `irq` and writes what the guest sends to `out`, one
    /// byte per call on the vCPU thread: `out` must not block (the VMM gives it a buffer that
    /// a thread of its own writes out, and drops what a stalled reader cannot take).
    pub fn new(irq: &EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let space = Arc::new(EventFd::new(0)?);
        let irq = irq.try_clone()?;
        let uart = Uart::with_events(
            IrqTrigger(irq.try_clone()?),
            SpaceEvents(space.clone()),
            out,
        );
        Ok(Self { uart, irq, space })
    }

    /// Puts the UART's registers back to their power-on values (on VM reset), keeping its
    /// output and interrupt line and dropping unread input.
    pub fn reset(&mut self) -> io::Result<()> {
        let fresh = Uart::with_events(
            IrqTrigger(self.irq.try_clone()?),
            SpaceEvents(self.space.clone()),
            Box::new(io::sink()),
        );
        let old = std::mem::replace(&mut self.uart, fresh);
        let out = old.into_writer();
        self.uart = Uart::with_events(
            IrqTrigger(self.irq.try_clone()?),
            SpaceEvents(self.space.clone()),
            out,
        );
        // Wake a feeder waiting on the old FIFO.
        self.space.write(1)
    }

    /// Queues as much of `bytes` as the receive FIFO has room for; returns how many.
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                crate::rate_limited!(log::Level::Warn, "serial: input lost: {e:?}");
                room
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            // A closed console must not stop the guest.
            log::debug!("serial: write to register {offset}: {e:?}");
        }
    }
}

/// Feeds host input into the UART at the pace the guest reads it.
#[derive(Clone)]
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    space: Arc<EventFd>,
}

impl SerialInput {
    /// An input feeder for `serial`.
    pub fn new(serial: &Arc<Mutex<Serial>>) -> Self {
        let space = lock(serial).space.clone();
        Self {
            serial: serial.clone(),
            space,
        }
    }

    /// Delivers all of `bytes` to the guest, blocking while the receive FIFO is full.
    pub fn feed(&self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = lock(&self.serial).enqueue(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                // Wait until the guest empties the FIFO (or the UART is reset).
                if let Err(e) = self.space.read() {
                    log::warn!("serial: waiting for input space: {e}");
                    return;
                }
            }
        }
    }
}

fn lock(serial: &Mutex<Serial>) -> std::sync::MutexGuard<'_, Serial> {
    serial.lock().unwrap_or_else(|e| e.into_inner())
}

/// An eventfd for a UART interrupt line (non-blocking, so a guest that never acknowledges
/// cannot block the device).
pub fn irq_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK)
}

/// The UART's saved state: vm-superio's `SerialState` (registers and unread input) as serde
/// data. Output is not state: it went to the console when the guest wrote it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialRegisters {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

/// What a UART is restored on.
pub enum SerialResources {
    /// A new UART interrupting through `irq` and writing guest output to `out`.
    New {
        /// The interrupt eventfd (registered as an irqfd).
        irq: EventFd,
        /// Where guest output goes.
        out: Box<dyn Write + Send>,
    },
    /// The restored UART takes this one's place: its interrupt line, its output and the
    /// input feeders ([`SerialInput`]) waiting on it carry over.
    Replace(Serial),
}

/// The size of the 16550A receive FIFO.
const FIFO_SIZE: usize = 64;

impl snapshot::Persist for Serial {
    type State = SerialRegisters;
    type Resources = SerialResources;
    type Error = snapshot::StateError;

    fn save(&self) -> SerialRegisters {
        let s = self.uart.state();
        SerialRegisters {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(r: SerialResources, state: &SerialRegisters) -> Result<Self, snapshot::StateError> {
        snapshot::check(state.in_buffer.len() <= FIFO_SIZE, "in_buffer", || {
            format!(
                "{} bytes, more than the {FIFO_SIZE}-byte FIFO",
                state.in_buffer.len()
            )
        })?;
        let io_err = |e: io::Error| snapshot::StateError::new("irq", e.to_string());
        let (irq, space, out) = match r {
            SerialResources::New { irq, out } => {
                (irq, Arc::new(EventFd::new(0).map_err(io_err)?), out)
            }
            SerialResources::Replace(old) => {
                let Serial { uart, irq, space } = old;
                (irq, space, uart.into_writer())
            }
        };
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Uart::from_state(
            &saved,
            IrqTrigger(irq.try_clone().map_err(io_err)?),
            SpaceEvents(space.clone()),
            out,
        )
        .map_err(|e| snapshot::StateError::new("in_buffer", format!("{e:?}")))?;
        // Wake a feeder waiting on the old FIFO: the restored one may have room.
        if let Err(e) = space.write(1) {
            log::warn!("serial: cannot signal free input space: {e}");
        }
        Ok(Self { uart, irq, space })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can look into.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const LSR: u64 = 5;
    const IER: u64 = 1;

    #[test]
    fn guest_output_reaches_writer() {
        let irq = irq_eventfd().unwrap();
        let out = SharedBuf::default();
        let mut serial = Serial::new(&irq, Box::new(out.clone())).unwrap();

        for b in b"hi\r\n" {
            serial.write(0, &[*b]);
        }

        assert_eq!(*out.0.lock().unwrap(), b"hi\r\n");
    }

    #[test]
    fn input_raises_interrupt_and_waits_for_guest_to_drain() {
        let irq = irq_eventfd().unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(&irq, Box::new(io::sink())).unwrap()));
        serial.lock().unwrap().write(IER, &[1]); // receive-data interrupt on
        let input = SerialInput::new(&serial);
        let data: Vec<u8> = (0..200u8).collect(); // more than the 64-byte FIFO

        let feeder = {
            let input = input.clone();
            let data = data.clone();
            std::thread::spawn(move || input.feed(&data))
        };
        let mut got = Vec::new();
        while got.len() < data.len() {
            let mut lsr = [0u8];
            serial.lock().unwrap().read(LSR, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                serial.lock().unwrap().read(0, &mut b);
                got.push(b[0]);
            } else {
                std::thread::yield_now();
            }
        }
        feeder.join().unwrap();

        assert_eq!(got, data);
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn reset_keeps_output_and_clears_registers() {
        let irq = irq_eventfd().unwrap();
        let out = SharedBuf::default();
        let mut serial = Serial::new(&irq, Box::new(out.clone())).unwrap();
        serial.write(IER, &[1]);

        serial.reset().unwrap();
        let mut ier = [0u8];
        serial.read(IER, &mut ier);
        serial.write(0, b"x");

        assert_eq!(ier, [0]);
        assert_eq!(*out.0.lock().unwrap(), b"x");
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;
    use snapshot::Persist;

    #[test]
    fn registers_and_unread_input_round_trip_through_json() {
        let irq = irq_eventfd().unwrap();
        let mut serial = Serial::new(&irq, Box::new(io::sink())).unwrap();
        serial.write(1, &[1]); // IER: receive-data interrupt
        serial.write(7, &[0x5a]); // scratch
        assert_eq!(serial.enqueue(b"abc"), 3);
        let saved = serial.save();

        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialRegisters = serde_json::from_str(&json).unwrap();
        let mut restored = Serial::restore(
            SerialResources::New {
                irq: irq_eventfd().unwrap(),
                out: Box::new(io::sink()),
            },
            &back,
        )
        .unwrap();
        let mut byte = [0u8];
        restored.read(0, &mut byte);

        assert_eq!(back, saved);
        assert_eq!(byte, [b'a']);
        assert_eq!(restored.save().in_buffer, b"bc");
    }

    #[test]
    fn replacing_keeps_the_output_and_an_overfull_fifo_is_refused() {
        let irq = irq_eventfd().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let serial = Serial::new(&irq, Box::new(Shared(out.clone()))).unwrap();
        let mut state = serial.save();

        let mut restored = Serial::restore(SerialResources::Replace(serial), &state).unwrap();
        restored.write(0, b"z");
        state.in_buffer = vec![0; 65];
        let err = Serial::restore(
            SerialResources::New {
                irq: irq_eventfd().unwrap(),
                out: Box::new(io::sink()),
            },
            &state,
        )
        .err()
        .unwrap();

        assert_eq!(*out.lock().unwrap(), b"z");
        assert_eq!(err.field, "in_buffer");
    }
}
