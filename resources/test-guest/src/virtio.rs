//! virtio-mmio (register layout version 2, modern virtio 1.x only) and the
//! split virtqueue, shared by the block and socket drivers.
//!
//! Transports come from the `virtio_mmio.device=<size>@<base>:<irq>` entries
//! of the command line (what Strata writes next to its DSDT entries), sorted
//! by address; without any, the windows 0xd0000000 + i * 0x1000 (IRQ 5 + i)
//! are probed until one lacks the magic. Transport `i` (in address order)
//! interrupts through IOAPIC pin `irq` (edge) on vector `0x40 + i` on the
//! BSP; the handler acknowledges InterruptStatus and counts.

use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use crate::sync::Global;
use crate::{apic, bootparams, time};

/// Most transports handled.
pub const MAX_TRANSPORTS: usize = 16;
/// Vector of transport 0; transport `i` uses `VECTOR_BASE + i`.
pub const VECTOR_BASE: u8 = 0x40;

const MAGIC: u32 = 0x7472_6976;
const PROBE_BASE: u64 = 0xd000_0000;
const PROBE_IRQ: u64 = 5;
const PROBE_MAX: u64 = 8;

// Registers.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
/// The device status register.
pub const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
/// Device-specific configuration.
pub const REG_CONFIG: u64 = 0x100;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
/// DEVICE_NEEDS_RESET: the device hit an error it cannot recover from.
pub const DEVICE_NEEDS_RESET: u32 = 0x40;
/// InterruptStatus bit: the configuration (or the status) changed.
const INT_CONFIG: u32 = 2;
/// How long a reset (status 0) may take to read back 0.
const RESET_TIMEOUT_MS: u64 = 1000;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device ids.
pub const ID_BLOCK: u32 = 2;
/// Socket device.
pub const ID_VSOCK: u32 = 19;

/// One virtio-mmio transport.
#[derive(Clone, Copy)]
pub struct Transport {
    /// MMIO base.
    pub base: u64,
    /// IOAPIC pin.
    pub irq: u32,
    /// Device id (0 = none).
    pub device_id: u32,
}

struct Table {
    list: [Transport; MAX_TRANSPORTS],
    len: usize,
}

static TABLE: Global<Table> = Global::new(Table {
    list: [Transport {
        base: 0,
        irq: 0,
        device_id: 0,
    }; MAX_TRANSPORTS],
    len: 0,
});

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static IRQ_COUNTS: [AtomicU64; MAX_TRANSPORTS] = [ZERO; MAX_TRANSPORTS];
/// Interrupts with the configuration-change bit, per transport: a device
/// that sets DEVICE_NEEDS_RESET sends one.
static CONFIG_IRQS: [AtomicU64; MAX_TRANSPORTS] = [ZERO; MAX_TRANSPORTS];
/// Bumped by every virtio interrupt: lets waiters notice "something
/// happened" cheaply.
pub static IRQ_EPOCH: AtomicU32 = AtomicU32::new(0);

/// The transports found, in MMIO-address order.
pub fn transports() -> &'static [Transport] {
    // SAFETY: written once at start-up by `discover`, before interrupts.
    let t = unsafe { &*TABLE.get() };
    t.list.get(..t.len).unwrap_or_default()
}

/// Device interrupts received by transport `index`.
pub fn irq_count(index: usize) -> u64 {
    IRQ_COUNTS
        .get(index)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Configuration-change interrupts received by transport `index`.
pub fn config_irq_count(index: usize) -> u64 {
    CONFIG_IRQS
        .get(index)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// The device status register of the device at `base`.
pub fn status(base: u64) -> u32 {
    read32(base, REG_STATUS)
}

/// Finds the transports and routes their interrupts. BSP, start-up.
pub fn discover(ioapic: u64) {
    // SAFETY: single-threaded start-up.
    let table = unsafe { &mut *TABLE.get() };
    for word in bootparams::get()
        .cmdline()
        .split(|&b| b == b' ')
        .filter_map(|w| w.strip_prefix(b"virtio_mmio.device="))
    {
        if let Some((base, irq)) = parse_device_arg(word) {
            add(table, base, irq);
        }
    }
    if table.len == 0 {
        for i in 0..PROBE_MAX {
            let base = PROBE_BASE + i * 0x1000;
            if read32(base, REG_MAGIC) != MAGIC {
                break;
            }
            add(table, base, (PROBE_IRQ + i) as u32);
        }
    }
    // MMIO-address order (insertion sort, a handful of entries).
    let len = table.len;
    if let Some(list) = table.list.get_mut(..len) {
        for i in 1..list.len() {
            let mut j = i;
            while j > 0 {
                let (Some(a), Some(b)) = (list.get(j - 1), list.get(j)) else {
                    break;
                };
                if a.base <= b.base {
                    break;
                }
                list.swap(j - 1, j);
                j -= 1;
            }
        }
        for (i, t) in list.iter_mut().enumerate() {
            let ok = read32(t.base, REG_MAGIC) == MAGIC && read32(t.base, REG_VERSION) == 2;
            t.device_id = if ok { read32(t.base, REG_DEVICE_ID) } else { 0 };
            if t.device_id != 0 && t.irq < 24 {
                apic::route_isa_irq(ioapic, t.irq as u8, VECTOR_BASE + i as u8);
            }
        }
    }
}

fn add(table: &mut Table, base: u64, irq: u32) {
    if table.list.iter().take(table.len).any(|t| t.base == base) {
        return;
    }
    if let Some(slot) = table.list.get_mut(table.len) {
        *slot = Transport {
            base,
            irq,
            device_id: 0,
        };
        table.len += 1;
    }
}

/// Parses `4K@0xd0000000:5` (size, base, irq; an optional `:id` after).
fn parse_device_arg(arg: &[u8]) -> Option<(u64, u32)> {
    let at = arg.iter().position(|&b| b == b'@')?;
    let rest = arg.get(at + 1..)?;
    let mut parts = rest.split(|&b| b == b':');
    let base = parse_num(parts.next()?)?;
    let irq = parse_num(parts.next()?)?;
    // Only identity-mapped, uncached MMIO (0xC0000000..4 GiB) is usable.
    if !(0xC000_0000..0x1_0000_0000 - 0x1000).contains(&base) || irq > 0xff {
        return None;
    }
    Some((base, irq as u32))
}

/// Decimal or `0x` hexadecimal.
fn parse_num(word: &[u8]) -> Option<u64> {
    let (digits, radix) = match word.strip_prefix(b"0x").or(word.strip_prefix(b"0X")) {
        Some(hex) => (hex, 16u64),
        None => (word, 10u64),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' if radix == 16 => b - b'a' + 10,
            b'A'..=b'F' if radix == 16 => b - b'A' + 10,
            _ => return None,
        };
        acc.checked_mul(radix)?.checked_add(u64::from(d))
    })
}

/// Reads a 32-bit register.
pub fn read32(base: u64, offset: u64) -> u32 {
    // SAFETY: virtio-mmio windows are identity mapped uncached (>= 3 GiB).
    unsafe { ((base + offset) as *const u32).read_volatile() }
}

/// Writes a 32-bit register.
pub fn write32(base: u64, offset: u64, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { ((base + offset) as *mut u32).write_volatile(value) }
}

/// Reads a little-endian u64 from the device config (two 32-bit reads).
pub fn config_u64(base: u64, offset: u64) -> u64 {
    let lo = read32(base, REG_CONFIG + offset);
    let hi = read32(base, REG_CONFIG + offset + 4);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The interrupt handler of transport `index` (vector `VECTOR_BASE +
/// index`): acknowledges what InterruptStatus says and counts.
pub fn handle_irq(index: usize) {
    if let Some(t) = transports().get(index) {
        let status = read32(t.base, REG_INTERRUPT_STATUS);
        if status != 0 {
            write32(t.base, REG_INTERRUPT_ACK, status);
        }
        if status & INT_CONFIG != 0 {
            if let Some(c) = CONFIG_IRQS.get(index) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(c) = IRQ_COUNTS.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    IRQ_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Resets the device and negotiates features: `wanted` & offered, which
/// must include VERSION_1. Leaves the status at FEATURES_OK. Returns the
/// negotiated features.
///
/// The reset is the virtio-mmio one (virtio 1.2, 4.2.3.1): write 0 to
/// Status, then wait until Status reads 0 (at most [`RESET_TIMEOUT_MS`]).
pub fn negotiate(base: u64, wanted: u64) -> Result<u64, &'static str> {
    write32(base, REG_STATUS, 0);
    let deadline = time::deadline_ms(RESET_TIMEOUT_MS);
    while read32(base, REG_STATUS) != 0 {
        if time::passed(deadline) {
            return Err("device reset failed");
        }
        core::hint::spin_loop();
    }
    write32(base, REG_STATUS, ACKNOWLEDGE);
    write32(base, REG_STATUS, ACKNOWLEDGE | DRIVER);
    write32(base, REG_DEVICE_FEATURES_SEL, 0);
    let lo = read32(base, REG_DEVICE_FEATURES);
    write32(base, REG_DEVICE_FEATURES_SEL, 1);
    let hi = read32(base, REG_DEVICE_FEATURES);
    let offered = u64::from(lo) | (u64::from(hi) << 32);
    let features = offered & wanted;
    if features & F_VERSION_1 == 0 {
        write32(base, REG_STATUS, read32(base, REG_STATUS) | 0x80);
        return Err("device is not virtio 1.x");
    }
    write32(base, REG_DRIVER_FEATURES_SEL, 0);
    write32(base, REG_DRIVER_FEATURES, features as u32);
    write32(base, REG_DRIVER_FEATURES_SEL, 1);
    write32(base, REG_DRIVER_FEATURES, (features >> 32) as u32);
    write32(base, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if read32(base, REG_STATUS) & FEATURES_OK == 0 {
        write32(base, REG_STATUS, 0x80);
        return Err("features refused");
    }
    Ok(features)
}

/// Sets DRIVER_OK; false if the device then asks for a reset.
pub fn driver_ok(base: u64) -> bool {
    write32(base, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let status = read32(base, REG_STATUS);
    status & DRIVER_OK != 0 && status & 0x40 == 0
}

/// Entries of every virtqueue we set up.
pub const QUEUE_SIZE: usize = 64;

/// How far `hostile ... avail-idx` moves the avail index: far more than
/// the queue size the driver sets ([`QUEUE_SIZE`]) and than the largest
/// QueueNumMax Strata's devices offer (256).
pub const BOGUS_AVAIL_AHEAD: u16 = 0x1000;

/// VIRTQ_DESC_F_NEXT.
pub const DESC_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE (device writes the buffer).
pub const DESC_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(2))]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

/// The memory of one split virtqueue (in `.bss`: zero at boot).
#[repr(C, align(4096))]
pub struct Ring {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
}

impl Ring {
    /// An all-zero ring.
    pub const fn new() -> Self {
        const D: Desc = Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        };
        const U: UsedElem = UsedElem { id: 0, len: 0 };
        Self {
            desc: [D; QUEUE_SIZE],
            avail: Avail {
                flags: 0,
                idx: 0,
                ring: [0; QUEUE_SIZE],
                used_event: 0,
            },
            used: Used {
                flags: 0,
                idx: 0,
                ring: [U; QUEUE_SIZE],
                avail_event: 0,
            },
        }
    }
}

/// Driver state of one virtqueue. Used by one CPU (the BSP) only.
pub struct Queue {
    ring: *mut Ring,
    base: u64,
    index: u32,
    next_avail: u16,
    last_used: u16,
}

impl Queue {
    /// Configures queue `index` of the device at `base` on `ring` (status
    /// must be FEATURES_OK). The ring is zeroed first.
    pub fn setup(base: u64, index: u32, ring: *mut Ring) -> Result<Self, &'static str> {
        write32(base, REG_QUEUE_SEL, index);
        if read32(base, REG_QUEUE_READY) != 0 {
            return Err("queue already live");
        }
        let max = read32(base, REG_QUEUE_NUM_MAX) as usize;
        if max < QUEUE_SIZE {
            return Err("queue too small");
        }
        // SAFETY: `ring` is a static owned by the caller's driver.
        unsafe { ring.write_bytes(0, 1) };
        let desc = ring as u64;
        // SAFETY: only addresses are taken.
        let (avail, used) = unsafe {
            (
                &raw const (*ring).avail as u64,
                &raw const (*ring).used as u64,
            )
        };
        write32(base, REG_QUEUE_NUM, QUEUE_SIZE as u32);
        for (reg, addr) in [
            (REG_QUEUE_DESC, desc),
            (REG_QUEUE_DRIVER, avail),
            (REG_QUEUE_DEVICE, used),
        ] {
            write32(base, reg, addr as u32);
            write32(base, reg + 4, (addr >> 32) as u32);
        }
        write32(base, REG_QUEUE_READY, 1);
        Ok(Self {
            ring,
            base,
            index,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: the ring is ours; the device reads descriptors only after
        // they are made available (the fence in `push`).
        let ring = unsafe { &mut *self.ring };
        if let Some(d) = ring.desc.get_mut(i) {
            *d = Desc {
                addr,
                len,
                flags,
                next,
            };
        }
    }

    /// Makes the chain starting at descriptor `head` available (no notify).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail) % QUEUE_SIZE;
        // SAFETY: the avail ring is written by us only; volatile + fences
        // order it against the device.
        unsafe {
            let ring = &mut *self.ring;
            if let Some(s) = ring.avail.ring.get_mut(slot) {
                (s as *mut u16).write_volatile(head);
            }
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            (&raw mut ring.avail.idx).write_volatile(self.next_avail);
        }
    }

    /// Asks the device not to interrupt for this queue (`false`) or to
    /// interrupt again (`true`): VIRTQ_AVAIL_F_NO_INTERRUPT, a hint.
    pub fn set_interrupts(&mut self, on: bool) {
        // SAFETY: the avail flags are written by us only.
        unsafe {
            (&raw mut (*self.ring).avail.flags).write_volatile(if on { 0 } else { 1 });
        }
        fence(Ordering::SeqCst);
    }

    /// `hostile`: publishes an avail index [`BOGUS_AVAIL_AHEAD`] ahead of
    /// the last one, far more than a queue size, without making anything
    /// available. The driver's own view stays behind, so the queue is
    /// unusable until the device is reset.
    pub fn publish_bogus_avail_idx(&mut self) {
        let idx = self.next_avail.wrapping_add(BOGUS_AVAIL_AHEAD);
        fence(Ordering::SeqCst);
        // SAFETY: the avail index is written by us only.
        unsafe { (&raw mut (*self.ring).avail.idx).write_volatile(idx) };
        fence(Ordering::SeqCst);
    }

    /// Tells the device to look at the queue.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        write32(self.base, REG_QUEUE_NOTIFY, self.index);
    }

    /// Whether the device returned buffers we have not popped yet.
    pub fn has_used(&self) -> bool {
        // SAFETY: volatile read of the device-written index.
        let idx = unsafe { (&raw const (*self.ring).used.idx).read_volatile() };
        idx != self.last_used
    }

    /// The next used element: (head descriptor id, bytes written).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if !self.has_used() {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used) % QUEUE_SIZE;
        // SAFETY: the element at a used index the device published.
        let elem = unsafe {
            let ring = &*self.ring;
            let e = ring.used.ring.get(slot)?;
            (e as *const UsedElem).read_volatile()
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((elem.id, elem.len))
    }
}
