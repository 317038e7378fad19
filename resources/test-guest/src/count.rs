//! The `count` workload: every CPU increments its own counter while the
//! shared `RUNNING` flag is set.
//!
//! APs sleep in `hlt` and are woken by [`WAKE_VECTOR`] IPIs; the BSP counts
//! in its input-wait loop instead of halting (see [`crate::shell`]). Each
//! counter sits in its own cache line and is written only by its CPU.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::acpi::MAX_CPUS;
use crate::interrupts::WAKE_VECTOR;
use crate::{apic, cpu, smp, time};

#[repr(C, align(64))]
struct PerCpu {
    counter: AtomicU64,
    /// Set while the CPU is inside its counting loop.
    active: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const IDLE: PerCpu = PerCpu {
    counter: AtomicU64::new(0),
    active: AtomicBool::new(false),
};
static PER_CPU: [PerCpu; MAX_CPUS] = [IDLE; MAX_CPUS];
static RUNNING: AtomicBool = AtomicBool::new(false);
/// How long `stop` waits for the APs to leave their loops.
const STOP_TIMEOUT_MS: u64 = 2_000;

/// Whether counting is on.
pub fn running() -> bool {
    RUNNING.load(Ordering::Relaxed)
}

/// Resets the counters and starts counting on every CPU.
pub fn start() {
    stop();
    for cpu in &PER_CPU {
        cpu.counter.store(0, Ordering::Relaxed);
    }
    RUNNING.store(true, Ordering::Release);
    apic::send_to_others(WAKE_VECTOR);
}

/// Stops counting and waits (bounded) until the APs are back to `hlt`, so
/// that a later `get` is stable.
pub fn stop() {
    RUNNING.store(false, Ordering::SeqCst);
    let deadline = time::deadline_ms(STOP_TIMEOUT_MS);
    while PER_CPU.iter().any(|cpu| cpu.active.load(Ordering::Acquire)) && !time::passed(deadline) {
        core::hint::spin_loop();
    }
}

/// Calls `f` with each online CPU's counter in CPU-index order.
pub fn for_each(mut f: impl FnMut(u64)) {
    for cpu in PER_CPU.iter().take(smp::cpu_slots()) {
        f(cpu.counter.load(Ordering::Relaxed));
    }
}

/// BSP: `n` increments of the BSP's counter (CPU index 0).
pub fn bsp_spin(n: u32) {
    let Some(counter) = PER_CPU.first().map(|cpu| &cpu.counter) else {
        return;
    };
    for _ in 0..n {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// The AP idle loop: sleep until woken, count while `RUNNING`.
pub fn ap_idle(index: usize) -> ! {
    let Some(me) = PER_CPU.get(index) else {
        cpu::halt_forever();
    };
    loop {
        cpu::disable_interrupts();
        if RUNNING.load(Ordering::Acquire) {
            // SeqCst (xchg) pairs with the SeqCst store in `stop`: one of
            // the two CPUs sees the other's write.
            me.active.store(true, Ordering::SeqCst);
            cpu::enable_interrupts();
            while RUNNING.load(Ordering::Relaxed) {
                me.counter
                    .store(me.counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            me.active.store(false, Ordering::Release);
        } else {
            cpu::sti_hlt();
        }
    }
}
