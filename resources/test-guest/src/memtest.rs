//! `fill` / `check`: a memory pattern the host can predict.
//!
//! The region starts at the end of the image rounded up to 2 MiB. Each 4 KiB
//! page with physical page number `p` holds 512 copies of
//! `splitmix64(seed ^ p * 0x9E3779B97F4A7C15)` (wrapping multiply), so one
//! `rep stosq` per page writes it and one `repe scasq` checks it: string
//! instructions are the fast path of the emulator.

use core::arch::asm;

use crate::bootparams::{self, E820_RAM};
use crate::pattern::{page_value, PAGE_SIZE as PAGE};

const QWORDS_PER_PAGE: usize = 512;
const MIB: u64 = 1 << 20;
const REGION_ALIGN: u64 = 2 * MIB;

extern "C" {
    static __image_end: u8;
}

/// Why a fill or check could not run or failed.
pub enum Error {
    /// The region is not inside usable RAM below 4 GiB.
    ExceedsMemory,
    /// A qword differs from the pattern at this address.
    Mismatch(u64),
}

/// Where the fill region starts: the end of the image rounded up to 2 MiB.
/// Nothing but `fill` uses the memory from there on.
pub fn region_start() -> u64 {
    let image_end = &raw const __image_end as u64;
    image_end.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// The fill region for `mib` MiB: (start, end).
fn region(mib: u64) -> Result<(u64, u64), Error> {
    let start = region_start();
    let end = mib
        .checked_mul(MIB)
        .and_then(|len| start.checked_add(len))
        .ok_or(Error::ExceedsMemory)?;
    if end > 1 << 32 || !usable(start, end) {
        return Err(Error::ExceedsMemory);
    }
    Ok((start, end))
}

/// Whether `start..end` is covered by usable E820 ranges (adjacent ranges
/// count as one).
fn usable(start: u64, end: u64) -> bool {
    let map = bootparams::get().e820();
    let mut pos = start;
    while pos < end {
        let next = map
            .iter()
            .filter(|e| e.kind == E820_RAM && e.addr <= pos && pos < e.addr.saturating_add(e.size))
            .map(|e| e.addr.saturating_add(e.size))
            .max();
        match next {
            Some(next) => pos = next,
            None => return false,
        }
    }
    true
}

/// Writes the pattern for `seed` into `mib` MiB.
pub fn fill(mib: u64, seed: u64) -> Result<(), Error> {
    let (start, end) = region(mib)?;
    let mut addr = start;
    while addr < end {
        let value = page_value(seed, addr);
        // SAFETY: `region` checked the page is usable RAM (identity mapped)
        // that nothing else uses: it lies past the image.
        unsafe {
            asm!("rep stosq",
                 inout("rcx") QWORDS_PER_PAGE => _, inout("rdi") addr => _, in("rax") value,
                 options(nostack, preserves_flags));
        }
        addr += PAGE;
    }
    Ok(())
}

/// Verifies the pattern for `seed` in `mib` MiB.
pub fn check(mib: u64, seed: u64) -> Result<(), Error> {
    let (start, end) = region(mib)?;
    let mut addr = start;
    while addr < end {
        let value = page_value(seed, addr);
        let next: u64;
        let differs: u8;
        // SAFETY: as in `fill`, read-only. `repe scasq` stops after the
        // first qword != rax with ZF clear; rdi then points past it.
        unsafe {
            asm!("repe scasq", "setne {differs}",
                 differs = out(reg_byte) differs,
                 inout("rcx") QWORDS_PER_PAGE => _, inout("rdi") addr => next, in("rax") value,
                 options(nostack, readonly));
        }
        if differs != 0 {
            return Err(Error::Mismatch(next - 8));
        }
        addr += PAGE;
    }
    Ok(())
}
