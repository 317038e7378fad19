//! The runtime pieces a `no_std` binary linked for x86_64-unknown-linux-gnu
//! needs: the memory functions the compiler calls, an (empty) unwinding
//! personality and the panic handler.
//!
//! The memory functions use string instructions, which the emulator runs
//! fast; `memcmp`/`bcmp` are simple volatile loops so that LLVM cannot turn
//! them back into calls to themselves.

use core::arch::asm;
use core::panic::PanicInfo;

/// `memcpy` (forward `rep movsq`, then `rep movsb` for the last 0..7
/// bytes: the emulator runs a string instruction per element, so qwords
/// are 8 times faster than bytes — ~1 MB/s with `movsb` alone).
///
/// # Safety
/// The usual C contract: `dst` and `src` valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees validity; DF is clear (ABI).
    unsafe {
        asm!("rep movsq", "mov rcx, {rest}", "rep movsb",
             rest = in(reg) n & 7,
             inout("rcx") n >> 3 => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`: forward `rep movsb` when safe, else backwards with DF set.
///
/// # Safety
/// The usual C contract: `dst` and `src` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: no harmful overlap for a forward copy.
        return unsafe { memcpy(dst, src, n) };
    }
    if n == 0 {
        return dst;
    }
    // SAFETY: caller guarantees validity; copy backwards from the last byte
    // and restore DF afterwards.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dst.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

/// `memset` (`rep stosb`).
///
/// # Safety
/// The usual C contract: `dst` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees validity; DF is clear (ABI).
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
///
/// # Safety
/// The usual C contract: both pointers valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, caller guarantees validity.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp` (zero when equal).
///
/// # Safety
/// The usual C contract: both pointers valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Never called with `panic=abort`, but the precompiled `core` refers to it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::cpu::disable_interrupts();
    let mut out = crate::console::lock_for_crash();
    out.str("panic: ");
    match info.location() {
        Some(loc) => {
            out.str(loc.file());
            out.str(":");
            out.dec(u64::from(loc.line()));
        }
        None => out.str("unknown location"),
    }
    // Only a static message: formatting arguments could format integers.
    if let Some(msg) = info.message().as_str() {
        out.str(": ");
        out.str(msg);
    }
    out.str("\r\n");
    drop(out);
    crate::power::guest_panic()
}
