//! Local APIC (x2APIC through MSRs; xAPIC through MMIO when the CPU does not
//! offer x2APIC) and the IOAPIC redirection of ISA interrupts.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cpu::{cpuid, rdmsr, wrmsr};
use crate::interrupts::{SPURIOUS_VECTOR, TIMER_VECTOR};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

// Register offsets in the xAPIC MMIO page; the x2APIC MSR is 0x800 + off/16.
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;

const SVR_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_ALL_EXCLUDING_SELF: u32 = 0b11 << 18;

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);

/// Decides between x2APIC and xAPIC (CPUID.1:ECX[21]) and enables the BSP's
/// local APIC.
pub fn init_bsp() {
    let (_, _, ecx, _) = cpuid(1);
    X2APIC.store(ecx & (1 << 21) != 0, Ordering::Relaxed);
    XAPIC_BASE.store(rdmsr(IA32_APIC_BASE) & 0xF_FFFF_F000, Ordering::Relaxed);
    enable_local();
}

/// Enables this CPU's local APIC (x2APIC mode when available) with the
/// spurious vector and priority 0. Run on every CPU.
pub fn enable_local() {
    let mut base = rdmsr(IA32_APIC_BASE);
    if base & APIC_BASE_ENABLE == 0 {
        // Disabled -> x2APIC directly is an invalid transition: go via xAPIC.
        base |= APIC_BASE_ENABLE;
        wrmsr(IA32_APIC_BASE, base);
    }
    if X2APIC.load(Ordering::Relaxed) && base & APIC_BASE_X2APIC == 0 {
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_X2APIC);
    }
    write(REG_TPR, 0);
    write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;

/// Starts (`Some(vector)`) or stops (`None`) a periodic local APIC timer
/// on this CPU, roughly every 10 ms on KVM (1 GHz APIC bus, divide by 1).
fn set_periodic_timer(vector: Option<u8>) {
    match vector {
        Some(v) => {
            write(REG_TIMER_DIVIDE, 0b1011);
            write(REG_LVT_TIMER, LVT_PERIODIC | u32::from(v));
            write(REG_TIMER_INITIAL, 10_000_000);
        }
        None => {
            write(REG_LVT_TIMER, LVT_MASKED);
            write(REG_TIMER_INITIAL, 0);
        }
    }
}

/// Holders of the BSP's periodic wake-up timer (see [`WakeTimer`]).
static WAKE_HOLDERS: AtomicU32 = AtomicU32::new(0);

/// Keeps the BSP's periodic local APIC timer ([`TIMER_VECTOR`], ~10 ms)
/// running while it lives, so that a `sti; hlt` wait also wakes up when no
/// device interrupt comes (bounded waits, the automatic thaw). Holders
/// nest: the timer stops when the last one is dropped. BSP only.
pub struct WakeTimer {
    _private: (),
}

impl WakeTimer {
    /// Starts the timer unless another holder already did.
    pub fn hold() -> Self {
        if WAKE_HOLDERS.fetch_add(1, Ordering::Relaxed) == 0 {
            set_periodic_timer(Some(TIMER_VECTOR));
        }
        Self { _private: () }
    }
}

impl Drop for WakeTimer {
    fn drop(&mut self) {
        if WAKE_HOLDERS.fetch_sub(1, Ordering::Relaxed) == 1 {
            set_periodic_timer(None);
        }
    }
}

/// INIT (assert) to the CPU with APIC id `apic_id`.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// Start-up IPI: the target starts in real mode at `vector << 12`.
pub fn send_startup(apic_id: u32, vector: u8) {
    send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | u32::from(vector));
}

/// A fixed interrupt `vector` to every CPU but this one.
pub fn send_to_others(vector: u8) {
    send_ipi(
        0,
        ICR_ALL_EXCLUDING_SELF | ICR_LEVEL_ASSERT | u32::from(vector),
    );
}

fn send_ipi(dest: u32, low: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // One 64-bit write; x2APIC has no delivery-status bit to poll.
        wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low));
    } else {
        write(REG_ICR_HIGH, dest << 24);
        write(REG_ICR_LOW, low);
        while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
            core::hint::spin_loop();
        }
    }
}

fn read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        rdmsr(0x800 + (reg >> 4)) as u32
    } else {
        let addr = XAPIC_BASE.load(Ordering::Relaxed) + u64::from(reg);
        // SAFETY: the APIC page is identity mapped uncached by our tables.
        unsafe { (addr as *const u32).read_volatile() }
    }
}

fn write(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(0x800 + (reg >> 4), u64::from(value));
    } else {
        let addr = XAPIC_BASE.load(Ordering::Relaxed) + u64::from(reg);
        // SAFETY: the APIC page is identity mapped uncached by our tables.
        unsafe { (addr as *mut u32).write_volatile(value) };
    }
}

/// Routes ISA interrupt `irq` (identity-mapped to IOAPIC pin `irq`) to
/// `vector` on this CPU: fixed delivery, physical destination, edge
/// triggered, active high, unmasked.
pub fn route_isa_irq(ioapic: u64, irq: u8, vector: u8) {
    let reg = 0x10 + 2 * u32::from(irq);
    ioapic_write(ioapic, reg + 1, id() << 24);
    ioapic_write(ioapic, reg, u32::from(vector));
}

fn ioapic_write(ioapic: u64, reg: u32, value: u32) {
    // SAFETY: IOREGSEL (+0x00) / IOWIN (+0x10) of the IOAPIC the MADT
    // names, identity mapped uncached by our tables.
    unsafe {
        (ioapic as *mut u32).write_volatile(reg);
        ((ioapic + 0x10) as *mut u32).write_volatile(value);
    }
}
