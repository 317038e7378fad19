//! Time from the TSC. The VMM publishes the TSC frequency in CPUID leaf
//! 0x40000010 (EAX, kHz; the "VMware" timing leaf QEMU also fills);
//! without it we assume 2 GHz.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::cpuid;

const TIMING_LEAF: u32 = 0x4000_0010;
const DEFAULT_TSC_KHZ: u64 = 2_000_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(DEFAULT_TSC_KHZ);

/// Reads the TSC frequency from CPUID.
pub fn init() {
    let (max_leaf, _, _, _) = cpuid(0x4000_0000);
    if (TIMING_LEAF..0x4001_0000).contains(&max_leaf) {
        let (khz, _, _, _) = cpuid(TIMING_LEAF);
        if khz != 0 {
            TSC_KHZ.store(u64::from(khz), Ordering::Relaxed);
        }
    }
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC value `ms` milliseconds from now.
pub fn deadline_ms(ms: u64) -> u64 {
    rdtsc().wrapping_add(ms.saturating_mul(TSC_KHZ.load(Ordering::Relaxed)))
}

/// Whether `deadline` (from [`deadline_ms`]) has passed.
pub fn passed(deadline: u64) -> bool {
    (rdtsc().wrapping_sub(deadline) as i64) >= 0
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let end = rdtsc().wrapping_add(us.saturating_mul(TSC_KHZ.load(Ordering::Relaxed)) / 1000);
    while (rdtsc().wrapping_sub(end) as i64) < 0 {
        core::hint::spin_loop();
    }
}

/// TSC ticks per millisecond.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed).max(1)
}
