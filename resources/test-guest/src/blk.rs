//! The virtio-blk driver: one synchronous request at a time per disk,
//! waited for with `sti; hlt` until the device's interrupt moves the used
//! ring (the interrupt handler acknowledges and counts, see
//! [`crate::virtio`]), for at most [`REQUEST_TIMEOUT_MS`]. BSP only.
//!
//! A disk whose queue the driver cannot trust any more (after `hostile`, a
//! request that timed out, DEVICE_NEEDS_RESET, a failed reset) answers
//! every request with an error until `blk N reset` brings the device up
//! again.

use crate::apic::WakeTimer;
use crate::pattern::{self, SECTOR_SIZE};
use crate::sync::Global;
use crate::virtio::{self, Queue, Ring, DESC_NEXT, DESC_WRITE, F_VERSION_1};
use crate::{bootparams, console, cpu, memtest, time};

/// Most disks handled.
pub const MAX_DISKS: usize = 8;
/// Largest data buffer of one request.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Largest COUNT of `blk write` / `blk read`.
pub const MAX_COUNT: u64 = 65_536;
/// How long one request may take before it answers `err timeout`.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// The data descriptor of `hostile blk N huge`: 1 GiB.
const HUGE_LEN: u32 = 1 << 30;

const F_SIZE_MAX: u64 = 1 << 1;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;

/// Why a request failed.
#[derive(Clone, Copy)]
pub enum Error {
    /// No such disk.
    NoDisk,
    /// VIRTIO_BLK_S_IOERR (or any unknown status).
    Io,
    /// VIRTIO_BLK_S_UNSUPP, or the feature is not offered.
    Unsupported,
    /// The driver gave its queue up (after `hostile`, a timeout or a failed
    /// reset): `blk N reset` first.
    DriverNeedsReset,
    /// The device set DEVICE_NEEDS_RESET.
    DeviceNeedsReset,
    /// No completion within [`REQUEST_TIMEOUT_MS`].
    Timeout,
    /// `blk N reset` could not bring the device up again.
    Setup(&'static str),
}

impl Error {
    /// The `err` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Error::NoDisk => "no such disk",
            Error::Io => "io",
            Error::Unsupported => "unsupported",
            Error::DriverNeedsReset => "driver needs reset",
            Error::DeviceNeedsReset => "device needs reset",
            Error::Timeout => "timeout",
            Error::Setup(why) => why,
        }
    }
}

struct Disk {
    queue: Queue,
    transport: usize,
    base: u64,
    capacity: u64,
    features: u64,
    chunk: usize,
    /// Why requests fail until the next reset, if they do.
    broken: Option<Error>,
    /// [`virtio::config_irq_count`] when the status was last looked at.
    seen_config: u64,
}

/// A device brought up: its queue and what the driver learnt.
struct Up {
    queue: Queue,
    features: u64,
    capacity: u64,
    chunk: usize,
}

struct Disks {
    list: [Option<Disk>; MAX_DISKS],
    len: usize,
}

#[repr(C, align(16))]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(4096))]
struct DataBuf([u8; CHUNK_BYTES]);

static DISKS: Global<Disks> = Global::new(Disks {
    list: [const { None }; MAX_DISKS],
    len: 0,
});
static RINGS: Global<[Ring; MAX_DISKS]> = Global::new([const { Ring::new() }; MAX_DISKS]);
static HEADER: Global<ReqHeader> = Global::new(ReqHeader {
    kind: 0,
    reserved: 0,
    sector: 0,
});
static STATUS: Global<u8> = Global::new(0);
/// Header, data and status buffers of `hostile` requests, apart from the
/// real ones so that a late completion cannot touch another disk's data.
#[repr(C, align(4096))]
struct Scratch([u8; 4096]);
static SCRATCH: Global<Scratch> = Global::new(Scratch([0; 4096]));
// Never zeroed: always written (by us or the device) before it is read.
#[link_section = ".bss.noinit.blkdata"]
static DATA: Global<DataBuf> = Global::new(DataBuf([0; CHUNK_BYTES]));

fn disks() -> &'static mut Disks {
    // SAFETY: BSP only (start-up, console commands and the BSP's idle loop,
    // never from interrupt handlers), and no caller keeps the reference
    // across another call.
    unsafe { &mut *DISKS.get() }
}

fn data() -> &'static mut [u8; CHUNK_BYTES] {
    // SAFETY: as in `disks`.
    unsafe { &mut (*DATA.get()).0 }
}

/// Initialises every virtio-blk transport, in address order.
pub fn init() {
    let disks = disks();
    for (index, t) in virtio::transports().iter().enumerate() {
        if t.device_id != virtio::ID_BLOCK || disks.len >= MAX_DISKS {
            continue;
        }
        let slot = disks.len;
        let seen_config = virtio::config_irq_count(index);
        let up = match bring_up(t.base, ring(slot)) {
            Ok(up) => up,
            Err(e) => {
                report(slot, e);
                continue;
            }
        };
        if let Some(entry) = disks.list.get_mut(slot) {
            *entry = Some(Disk {
                queue: up.queue,
                transport: index,
                base: t.base,
                capacity: up.capacity,
                features: up.features,
                chunk: up.chunk,
                broken: None,
                seen_config,
            });
            disks.len += 1;
        }
    }
}

/// The ring of disk `slot` (< [`MAX_DISKS`]).
fn ring(slot: usize) -> *mut Ring {
    // SAFETY: address only; each disk owns its ring.
    unsafe { (RINGS.get() as *mut Ring).add(slot.min(MAX_DISKS - 1)) }
}

/// The full initialisation (virtio 1.2, 3.1.1): reset, ACKNOWLEDGE,
/// DRIVER, features, FEATURES_OK, the request queue on `ring`, DRIVER_OK;
/// then the configuration.
fn bring_up(base: u64, ring: *mut Ring) -> Result<Up, &'static str> {
    let features = virtio::negotiate(base, F_VERSION_1 | F_RO | F_FLUSH | F_SIZE_MAX)?;
    let queue = Queue::setup(base, 0, ring)?;
    if !virtio::driver_ok(base) {
        return Err("device refused DRIVER_OK");
    }
    let capacity = virtio::config_u64(base, 0);
    let mut chunk = CHUNK_BYTES;
    if features & F_SIZE_MAX != 0 {
        let size_max = virtio::read32(base, virtio::REG_CONFIG + 8) as usize;
        if size_max >= SECTOR_SIZE {
            chunk = chunk.min(size_max / SECTOR_SIZE * SECTOR_SIZE);
        }
    }
    Ok(Up {
        queue,
        features,
        capacity,
        chunk,
    })
}

/// `blk N reset`: resets the device (status 0, waiting until it reads 0)
/// and brings it up again with a fresh queue (indexes 0, every descriptor
/// free), as Linux does after DEVICE_NEEDS_RESET. On failure the disk
/// stays unusable.
pub fn reset(n: u64) -> Result<(), Error> {
    let d = disk(n)?;
    let slot = n as usize;
    d.broken = Some(Error::DriverNeedsReset);
    let seen_config = virtio::config_irq_count(d.transport);
    let up = bring_up(d.base, ring(slot)).map_err(Error::Setup)?;
    d.queue = up.queue;
    d.features = up.features;
    d.capacity = up.capacity;
    d.chunk = up.chunk;
    d.seen_config = seen_config;
    d.broken = None;
    Ok(())
}

/// Gives every disk's queue up until its reset (`hostile mmio`).
pub fn abandon_all() {
    for d in disks().list.iter_mut().flatten() {
        d.broken = Some(Error::DriverNeedsReset);
    }
}

/// `blk N status`: the device status register.
pub fn status(n: u64) -> Result<u32, Error> {
    let d = disk(n)?;
    Ok(virtio::status(d.base))
}

/// What `hostile blk N ...` does to the request queue.
#[derive(Clone, Copy)]
pub enum Attack {
    /// Publish an avail index far more than a queue size ahead.
    AvailIdx,
    /// A request whose last descriptor chains back to its first.
    DescLoop,
    /// A read whose one data descriptor is 1 GiB long.
    Huge,
    /// Requests whose descriptors point past the end of RAM.
    Oob,
}

/// `hostile blk N ...`: misbehaves on the request queue, notifies and
/// returns at once. The driver gives the queue up: later requests fail
/// with [`Error::DriverNeedsReset`] until [`reset`]. Every request built
/// here is a read (`VIRTIO_BLK_T_IN` of sector 0), so no attack can write
/// the disk.
pub fn hostile(n: u64, attack: Attack) -> Result<(), Error> {
    let d = disk(n)?;
    d.broken = Some(Error::DriverNeedsReset);
    let scratch = SCRATCH.get() as u64;
    // SAFETY: the scratch page is ours; a device may write its data and
    // status parts at any time, never its header.
    unsafe {
        (SCRATCH.get() as *mut ReqHeader).write_volatile(ReqHeader {
            kind: T_IN,
            reserved: 0,
            sector: 0,
        });
    }
    let (header, data, status) = (scratch, scratch + 512, scratch + 1024);
    let q = &mut d.queue;
    match attack {
        Attack::AvailIdx => q.publish_bogus_avail_idx(),
        Attack::DescLoop => {
            q.set_desc(0, header, 16, DESC_NEXT, 1);
            q.set_desc(1, data, 512, DESC_WRITE | DESC_NEXT, 2);
            q.set_desc(2, status, 1, DESC_WRITE | DESC_NEXT, 0);
            q.push(0);
        }
        Attack::Huge => {
            // Into the fill region: should a device write it anyway, it
            // lands in memory nothing but `fill` uses.
            q.set_desc(0, header, 16, DESC_NEXT, 1);
            q.set_desc(1, memtest::region_start(), HUGE_LEN, DESC_WRITE | DESC_NEXT, 2);
            q.set_desc(2, status, 1, DESC_WRITE, 0);
            q.push(0);
        }
        Attack::Oob => {
            let end = bootparams::get().ram_end();
            // Data past the end of RAM (the device can still say IOERR).
            q.set_desc(0, header, 16, DESC_NEXT, 1);
            q.set_desc(1, end, 512, DESC_WRITE | DESC_NEXT, 2);
            q.set_desc(2, status, 1, DESC_WRITE, 0);
            // Every descriptor past the end of RAM (nowhere to say anything).
            q.set_desc(3, end + 0x1000, 16, DESC_NEXT, 4);
            q.set_desc(4, end + 0x2000, 512, DESC_WRITE | DESC_NEXT, 5);
            q.set_desc(5, end + 0x3000, 1, DESC_WRITE, 0);
            // Data whose end wraps around the 64-bit address space.
            q.set_desc(6, header, 16, DESC_NEXT, 7);
            q.set_desc(7, 0u64.wrapping_sub(256), 512, DESC_WRITE | DESC_NEXT, 8);
            q.set_desc(8, status, 1, DESC_WRITE, 0);
            q.push(0);
            q.push(3);
            q.push(6);
        }
    }
    q.notify();
    Ok(())
}

fn report(slot: usize, what: &str) {
    let mut out = console::lock();
    out.str("virtio-blk ");
    out.dec(slot as u64);
    out.str(": ");
    out.str(what);
    out.nl();
}

fn disk(n: u64) -> Result<&'static mut Disk, Error> {
    let disks = disks();
    let n = usize::try_from(n).map_err(|_| Error::NoDisk)?;
    disks
        .list
        .get_mut(n)
        .and_then(Option::as_mut)
        .ok_or(Error::NoDisk)
}

/// (capacity in sectors, read-only, device interrupts so far).
pub fn info(n: u64) -> Result<(u64, bool, u64), Error> {
    let d = disk(n)?;
    Ok((
        d.capacity,
        d.features & F_RO != 0,
        virtio::irq_count(d.transport),
    ))
}

/// Fails when the disk's queue is given up, or the device asks for a
/// reset (looked at after each configuration-change interrupt only: every
/// status read is a VM exit).
fn usable(d: &mut Disk) -> Result<(), Error> {
    if let Some(e) = d.broken {
        return Err(e);
    }
    let config = virtio::config_irq_count(d.transport);
    if config != d.seen_config {
        d.seen_config = config;
        if virtio::status(d.base) & virtio::DEVICE_NEEDS_RESET != 0 {
            d.broken = Some(Error::DeviceNeedsReset);
            return Err(Error::DeviceNeedsReset);
        }
    }
    Ok(())
}

/// One request: header, `len` bytes of [`DATA`] (device-written for IN),
/// status. Waits for the device's interrupt, at most
/// [`REQUEST_TIMEOUT_MS`] (then the queue is given up).
fn request(d: &mut Disk, kind: u32, sector: u64, len: usize) -> Result<(), Error> {
    usable(d)?;
    // SAFETY: one request at a time; the device is idle on these buffers.
    unsafe {
        HEADER.get().write_volatile(ReqHeader {
            kind,
            reserved: 0,
            sector,
        });
        STATUS.get().write_volatile(0xff);
    }
    let header = HEADER.get() as u64;
    let status = STATUS.get() as u64;
    let q = &mut d.queue;
    if len > 0 {
        let flags = if kind == T_IN { DESC_WRITE } else { 0 };
        q.set_desc(0, header, 16, DESC_NEXT, 1);
        q.set_desc(1, DATA.get() as u64, len as u32, flags | DESC_NEXT, 2);
        q.set_desc(2, status, 1, DESC_WRITE, 0);
    } else {
        q.set_desc(0, header, 16, DESC_NEXT, 2);
        q.set_desc(2, status, 1, DESC_WRITE, 0);
    }
    q.push(0);
    q.notify();
    // Wait for the completion: `cli; check; sti; hlt` so the interrupt
    // cannot slip in between the check and the halt. The wake-up timer
    // bounds the wait when no interrupt comes.
    let deadline = time::deadline_ms(REQUEST_TIMEOUT_MS);
    let mut timer = None;
    loop {
        cpu::disable_interrupts();
        if d.queue.pop_used().is_some() {
            cpu::enable_interrupts();
            break;
        }
        let failed = if time::passed(deadline) {
            d.broken = Some(Error::DriverNeedsReset);
            Some(Error::Timeout)
        } else {
            usable(d).err()
        };
        if let Some(e) = failed {
            cpu::enable_interrupts();
            if virtio::status(d.base) & virtio::DEVICE_NEEDS_RESET != 0 {
                d.broken = Some(Error::DeviceNeedsReset);
                return Err(Error::DeviceNeedsReset);
            }
            return Err(e);
        }
        if timer.is_none() {
            timer = Some(WakeTimer::hold());
        }
        cpu::sti_hlt();
    }
    drop(timer);
    // SAFETY: the device is done with the status byte.
    match unsafe { STATUS.get().read_volatile() } {
        S_OK => Ok(()),
        S_UNSUPP => Err(Error::Unsupported),
        _ => Err(Error::Io),
    }
}

/// Writes `count` sectors from `sector` with the pattern of `seed`.
pub fn write_pattern(n: u64, sector: u64, count: u64, seed: u64) -> Result<(), Error> {
    let d = disk(n)?;
    let per = (d.chunk / SECTOR_SIZE) as u64;
    let mut done = 0;
    while done < count {
        let now = per.min(count - done);
        let first = sector.wrapping_add(done);
        let buf = data();
        for (i, s) in buf
            .chunks_exact_mut(SECTOR_SIZE)
            .take(now as usize)
            .enumerate()
        {
            if let Ok(s) = <&mut [u8; SECTOR_SIZE]>::try_from(s) {
                pattern::sector_fill(seed, first.wrapping_add(i as u64), s);
            }
        }
        request(d, T_OUT, first, now as usize * SECTOR_SIZE)?;
        done += now;
    }
    Ok(())
}

/// Reads `count` sectors from `sector`, calling `f` with each chunk.
pub fn read(n: u64, sector: u64, count: u64, mut f: impl FnMut(u64, &[u8])) -> Result<(), Error> {
    let d = disk(n)?;
    let per = (d.chunk / SECTOR_SIZE) as u64;
    let mut done = 0;
    while done < count {
        let now = per.min(count - done);
        let first = sector.wrapping_add(done);
        let len = now as usize * SECTOR_SIZE;
        request(d, T_IN, first, len)?;
        f(first, data().get(..len).unwrap_or_default());
        done += now;
    }
    Ok(())
}

/// FNV-1a 64 of `count` sectors from `sector`.
pub fn read_hash(n: u64, sector: u64, count: u64) -> Result<u64, Error> {
    let mut hash = pattern::FNV_OFFSET;
    read(n, sector, count, |_, bytes| {
        hash = pattern::fnv1a64_update(hash, bytes);
    })?;
    Ok(hash)
}

/// Writes one sector from `buf`.
pub fn write_sector(n: u64, sector: u64, buf: &[u8; SECTOR_SIZE]) -> Result<(), Error> {
    let d = disk(n)?;
    if let Some(dst) = data().get_mut(..SECTOR_SIZE) {
        dst.copy_from_slice(buf);
    }
    request(d, T_OUT, sector, SECTOR_SIZE)
}

/// Flushes the disk's write cache.
pub fn flush(n: u64) -> Result<(), Error> {
    let d = disk(n)?;
    if d.features & F_FLUSH == 0 {
        return Err(Error::Unsupported);
    }
    request(d, T_FLUSH, 0, 0)
}
