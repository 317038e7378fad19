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
            log::warn!("serial: cannot signal free input space: {e}");
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
                log::warn!("serial: input lost: {e:?}");
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
