//! Minimal shared-state helpers (no allocator, no std).

use core::cell::UnsafeCell;

/// A global that is written during single-threaded start-up (or only ever by
/// one CPU) and read afterwards. Callers uphold the aliasing rules; the
/// wrapper only makes the `static` possible without `static mut`.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: every user documents why its accesses do not race (start-up on the
// BSP before APs run, or data owned by one CPU).
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// Wraps `value`.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Raw pointer to the value.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}
