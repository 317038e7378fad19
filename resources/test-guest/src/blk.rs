//! The virtio-blk driver: one synchronous request at a time per disk,
//! waited for with `sti; hlt` until the device's interrupt moves the used
//! ring (the interrupt handler acknowledges and counts, see
//! [`crate::virtio`]). BSP only.

use crate::pattern::{self, SECTOR_SIZE};
use crate::sync::Global;
use crate::virtio::{self, Queue, Ring, DESC_NEXT, DESC_WRITE, F_VERSION_1};
use crate::{console, cpu};

/// Most disks handled.
pub const MAX_DISKS: usize = 8;
/// Largest data buffer of one request.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Largest COUNT of `blk write` / `blk read`.
pub const MAX_COUNT: u64 = 65_536;

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
}

impl Error {
    /// The `err` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Error::NoDisk => "no such disk",
            Error::Io => "io",
            Error::Unsupported => "unsupported",
        }
    }
}

struct Disk {
    queue: Queue,
    transport: usize,
    capacity: u64,
    features: u64,
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
        let Ok(features) = virtio::negotiate(t.base, F_VERSION_1 | F_RO | F_FLUSH | F_SIZE_MAX)
        else {
            report(slot, "feature negotiation failed");
            continue;
        };
        // SAFETY: slot < MAX_DISKS; each disk owns its ring.
        let ring = unsafe { (RINGS.get() as *mut Ring).add(slot) };
        let queue = match Queue::setup(t.base, 0, ring) {
            Ok(q) => q,
            Err(e) => {
                report(slot, e);
                continue;
            }
        };
        if !virtio::driver_ok(t.base) {
            report(slot, "device refused DRIVER_OK");
            continue;
        }
        let capacity = virtio::config_u64(t.base, 0);
        let mut chunk = CHUNK_BYTES;
        if features & F_SIZE_MAX != 0 {
            let size_max = virtio::read32(t.base, virtio::REG_CONFIG + 8) as usize;
            if size_max >= SECTOR_SIZE {
                chunk = chunk.min(size_max / SECTOR_SIZE * SECTOR_SIZE);
            }
        }
        if let Some(entry) = disks.list.get_mut(slot) {
            *entry = Some(Disk {
                queue,
                transport: index,
                capacity,
                features,
                chunk,
            });
            disks.len += 1;
        }
    }
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

/// Number of disks.
pub fn count() -> usize {
    disks().len
}

/// One request: header, `len` bytes of [`DATA`] (device-written for IN),
/// status. Waits for the device's interrupt.
fn request(d: &mut Disk, kind: u32, sector: u64, len: usize) -> Result<(), Error> {
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
    // cannot slip in between the check and the halt.
    loop {
        cpu::disable_interrupts();
        if q.pop_used().is_some() {
            cpu::enable_interrupts();
            break;
        }
        cpu::sti_hlt();
    }
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
