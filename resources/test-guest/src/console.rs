//! Console output: whole lines written under a lock so that output from
//! several CPUs (exceptions on an AP) does not interleave, and integer
//! formatting done here because `core::fmt` integer formatting is SSE code.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::uart;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Exclusive access to the console until dropped.
pub struct Console {
    _private: (),
}

/// Takes the console lock (spins).
pub fn lock() -> Console {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    Console { _private: () }
}

/// Takes the console lock, or steals it after a bounded wait: for the panic
/// and exception paths, which may run while this CPU already holds it.
pub fn lock_for_crash() -> Console {
    for _ in 0..100_000 {
        if LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            break;
        }
        core::hint::spin_loop();
    }
    LOCK.store(true, Ordering::Relaxed);
    Console { _private: () }
}

/// Writes `s` under the lock.
pub fn write_str(s: &str) {
    lock().str(s);
}

impl Console {
    /// Writes raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            uart::put_byte(b);
        }
    }

    /// Writes a string.
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// Ends the line ("\r\n").
    pub fn nl(&mut self) {
        self.bytes(b"\r\n");
    }

    /// Writes `n` in decimal.
    pub fn dec(&mut self, n: u64) {
        let mut buf = [0u8; 20];
        self.bytes(format_digits(n, 10, &mut buf));
    }

    /// Writes `n` in lower-case hexadecimal with a `0x` prefix.
    pub fn hex(&mut self, n: u64) {
        let mut buf = [0u8; 16];
        self.str("0x");
        self.bytes(format_digits(n, 16, &mut buf));
    }
}

/// Where command output goes: the console, or a buffer (agent `exec`).
pub trait Sink {
    /// Writes raw bytes.
    fn bytes(&mut self, bytes: &[u8]);

    /// Writes a string.
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// Ends the line ("\r\n").
    fn nl(&mut self) {
        self.bytes(b"\r\n");
    }

    /// Writes `n` in decimal.
    fn dec(&mut self, n: u64) {
        let mut buf = [0u8; 20];
        self.bytes(format_digits(n, 10, &mut buf));
    }

    /// Writes `n` in lower-case hexadecimal with a `0x` prefix.
    fn hex(&mut self, n: u64) {
        let mut buf = [0u8; 16];
        self.bytes(b"0x");
        self.bytes(format_digits(n, 16, &mut buf));
    }

    /// Writes `n` as exactly 16 lower-case hex digits, no prefix.
    fn hex16(&mut self, n: u64) {
        let mut buf = [0u8; 16];
        let digits = format_digits(n, 16, &mut buf).len();
        for _ in digits..16 {
            self.bytes(b"0");
        }
        self.bytes(format_digits(n, 16, &mut buf));
    }
}

impl Sink for Console {
    fn bytes(&mut self, bytes: &[u8]) {
        Console::bytes(self, bytes);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

/// Formats `n` in `base` (10 or 16) right-aligned into `buf` and returns the
/// digits. Written without indexing so that no bounds-check panic (whose
/// message formatting is SSE code in `core`) is linked in.
fn format_digits(mut n: u64, base: u64, buf: &mut [u8]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut used = 0;
    for slot in buf.iter_mut().rev() {
        *slot = DIGITS[(n % base) as usize & 0xf];
        used += 1;
        n /= base;
        if n == 0 {
            break;
        }
    }
    let start = buf.len().saturating_sub(used);
    buf.get(start..).unwrap_or_default()
}
