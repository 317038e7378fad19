//! Parsing and executing one virtio-blk request (virtio 1.2, 5.2.6).
//!
//! A request is a descriptor chain: a device-readable 16-byte header (type, reserved, sector),
//! data descriptors, and a device-writable status byte last. The queue
//! ([`crate::virtio::queue::VirtQueue`]) has already checked that every descriptor is inside
//! guest memory and within SEG_MAX and SIZE_MAX; everything else in it comes from the guest,
//! so every length and direction is checked here, and the disk range before any I/O. Guest
//! memory accesses that fail are I/O errors of that request, never of the device.
//!
//! Reads and writes go straight between the disk and guest memory: each data descriptor is
//! turned into byte slices over the guest's pages (`guest_bytes`) for the backend's
//! positional I/O. No bounce buffer, no allocation per request.

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address as _, Bytes, GuestAddress, GuestMemoryBackend as _, VolatileSlice};

use super::BlockBackend;
use crate::virtio::GuestMemory;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Get the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also for malformed requests and writes to a read-only disk).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the id GET_ID returns.
pub const ID_LEN: usize = 20;
const SECTOR: u64 = 512;
/// Longest chain accepted (header + SEG_MAX data + status).
const MAX_DESCRIPTORS: usize = super::SEG_MAX as usize + 2;
/// Largest total data in one read or write.
const MAX_DATA: u64 = super::SEG_MAX as u64 * super::SIZE_MAX as u64;

/// What a request needs besides guest memory.
pub struct Context<'a> {
    /// The disk.
    pub backend: &'a mut dyn BlockBackend,
    /// Whether writes are refused.
    pub read_only: bool,
    /// GET_ID's answer.
    pub id: &'a [u8; ID_LEN],
}

/// Why a request failed.
#[derive(Debug, PartialEq, Eq)]
enum Fail {
    /// Malformed or failed: IOERR.
    Io,
    /// Unknown type: UNSUPP.
    Unsupported,
}

/// Handles the request made of `descs` (a whole chain, checked by the queue) and writes its
/// status; returns the used length (bytes the device wrote into the chain).
pub fn handle(mem: &GuestMemory, descs: &[Descriptor], ctx: &mut Context) -> u32 {
    // The status byte is the last byte of the chain (virtio 1.2, 5.2.6). Without one the
    // device may write there is nowhere to report anything, and the request is not executed:
    // the last descriptor is read-only or empty, or the chain is a single descriptor.
    let Some(status_addr) = descs
        .last()
        .filter(|d| descs.len() >= 2 && !d.has_next() && d.is_write_only() && d.len() >= 1)
        .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
        .filter(|&a| mem.address_in_range(a))
    else {
        log::debug!("virtio-blk: request without a status byte dropped");
        return 0;
    };
    let (code, written) = match execute(mem, descs, ctx) {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(Fail::Io) => (VIRTIO_BLK_S_IOERR, 0),
        Err(Fail::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
    };
    if mem.write_obj(code, status_addr).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

/// The data descriptors between header and status.
fn data(descs: &[Descriptor]) -> &[Descriptor] {
    &descs[1..descs.len() - 1]
}

/// Checks that `[sector, sector + len)` is inside the disk; returns the byte offset.
fn range(ctx: &Context, sector: u64, len: u64) -> Result<u64, Fail> {
    let offset = sector.checked_mul(SECTOR).ok_or(Fail::Io)?;
    let end = offset.checked_add(len).ok_or(Fail::Io)?;
    if end > ctx.backend.capacity() {
        return Err(Fail::Io);
    }
    Ok(offset)
}

fn execute(mem: &GuestMemory, descs: &[Descriptor], ctx: &mut Context) -> Result<u32, Fail> {
    if descs.len() > MAX_DESCRIPTORS {
        return Err(Fail::Io);
    }
    let header = &descs[0];
    if header.is_write_only() || header.len() < 16 {
        return Err(Fail::Io);
    }
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| Fail::Io)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    let data = data(descs);
    match kind {
        VIRTIO_BLK_T_IN => read(mem, data, sector, ctx),
        VIRTIO_BLK_T_OUT => write(mem, data, sector, ctx).map(|()| 0),
        VIRTIO_BLK_T_FLUSH => ctx.backend.flush().map(|()| 0).map_err(|_| Fail::Io),
        VIRTIO_BLK_T_GET_ID => {
            let d = data
                .first()
                .filter(|d| data.len() == 1 && d.is_write_only())
                .ok_or(Fail::Io)?;
            let n = (d.len() as usize).min(ID_LEN);
            mem.write_slice(&ctx.id[..n], d.addr())
                .map_err(|_| Fail::Io)?;
            Ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            discard_or_zero(mem, data, kind == VIRTIO_BLK_T_WRITE_ZEROES, ctx).map(|()| 0)
        }
        _ => Err(Fail::Unsupported),
    }
}

/// Total length of `data`, all of which must have direction `writable`.
fn data_len(data: &[Descriptor], writable: bool) -> Result<u64, Fail> {
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != writable || d.len() == 0 {
            return Err(Fail::Io);
        }
        total += u64::from(d.len());
    }
    if total == 0 || !total.is_multiple_of(SECTOR) || total > MAX_DATA {
        return Err(Fail::Io);
    }
    Ok(total)
}

/// The guest pages under `d` as volatile slices (more than one where the buffer crosses a
/// memory region boundary), marked dirty when the device writes them.
fn guest_slices<'m>(
    mem: &'m GuestMemory,
    d: &Descriptor,
) -> impl Iterator<Item = Result<VolatileSlice<'m, ()>, Fail>> + 'm {
    mem.get_slices(GuestAddress(d.addr().0), d.len() as usize)
        .map(|s| s.map_err(|_| Fail::Io))
}

// SAFETY (of the two conversions below, for every caller): `s` covers host memory that
// stays mapped for as long as `GuestMemory` lives, which outlives the request; the queue
// checked that the range is guest RAM. The guest may read or write that memory while the disk
// reads into it or writes from it: this is the same race a guest has with DMA on real hardware,
// and only the guest's own data can come out torn (Cloud Hypervisor and crosvm make the same
// argument for their zero-copy block paths). No Rust code of the VMM holds another reference
// to these bytes while the slice lives, and callers keep it only for one I/O call.

/// The bytes of guest memory under `s`, for a positional read into them.
fn guest_bytes_mut<'a>(s: &'a mut VolatileSlice<'_, ()>) -> &'a mut [u8] {
    let guard = s.ptr_guard_mut();
    // SAFETY: see above; `guard` points to `s.len()` mapped bytes, borrowed mutably with `s`.
    unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), s.len()) }
}

/// The bytes of guest memory under `s`, for a positional write from them.
fn guest_bytes<'a>(s: &'a VolatileSlice<'_, ()>) -> &'a [u8] {
    let guard = s.ptr_guard();
    // SAFETY: see above; `guard` points to `s.len()` mapped bytes.
    unsafe { std::slice::from_raw_parts(guard.as_ptr(), s.len()) }
}

fn read(
    mem: &GuestMemory,
    data: &[Descriptor],
    sector: u64,
    ctx: &mut Context,
) -> Result<u32, Fail> {
    let total = data_len(data, true)?;
    let mut offset = range(ctx, sector, total)?;
    for d in data {
        for s in guest_slices(mem, d) {
            let mut s = s?;
            ctx.backend
                .read_at(guest_bytes_mut(&mut s), offset)
                .map_err(|_| Fail::Io)?;
            s.bitmap().mark_dirty(0, s.len());
            offset += s.len() as u64;
        }
    }
    Ok(total as u32)
}

fn write(
    mem: &GuestMemory,
    data: &[Descriptor],
    sector: u64,
    ctx: &mut Context,
) -> Result<(), Fail> {
    if ctx.read_only {
        return Err(Fail::Io);
    }
    let total = data_len(data, false)?;
    let mut offset = range(ctx, sector, total)?;
    // A request that fails must not have written part of itself to the disk.
    if !data
        .iter()
        .all(|d| mem.check_range(d.addr(), d.len() as usize))
    {
        return Err(Fail::Io);
    }
    for d in data {
        for s in guest_slices(mem, d) {
            let s = s?;
            ctx.backend
                .write_at(guest_bytes(&s), offset)
                .map_err(|_| Fail::Io)?;
            offset += s.len() as u64;
        }
    }
    Ok(())
}

/// DISCARD and WRITE_ZEROES carry 16-byte segments: sector u64, num_sectors u32, flags u32.
fn discard_or_zero(
    mem: &GuestMemory,
    data: &[Descriptor],
    zero: bool,
    ctx: &mut Context,
) -> Result<(), Fail> {
    if ctx.read_only {
        return Err(Fail::Io);
    }
    // max_discard_seg and max_write_zeroes_seg are 1.
    let d = data
        .first()
        .filter(|d| data.len() == 1 && !d.is_write_only() && d.len() == 16)
        .ok_or(Fail::Io)?;
    let mut seg = [0u8; 16];
    mem.read_slice(&mut seg, d.addr()).map_err(|_| Fail::Io)?;
    let sector = u64::from_le_bytes([
        seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
    ]);
    let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    // Only bit 0 (unmap, for write zeroes) is defined.
    if flags & !1 != 0 || (flags != 0 && !zero) || count > super::MAX_DISCARD_SECTORS {
        return Err(Fail::Unsupported);
    }
    let len = u64::from(count) * SECTOR;
    let offset = range(ctx, sector, len)?;
    let r = if zero {
        ctx.backend.write_zeroes(offset, len)
    } else {
        ctx.backend.discard(offset, len)
    };
    r.map_err(|_| Fail::Io)
}

/// Well-formed requests on an in-memory disk, one chain at a time. Malformed chains are tested
/// through the device's queue loop on a real disk, in `block/tests.rs`.
#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;

    const F_WRITE: u16 = 2;

    /// An in-memory disk.
    struct MemDisk {
        data: Vec<u8>,
        flushes: u32,
        fail: bool,
    }

    impl BlockBackend for MemDisk {
        fn capacity(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
        fn discard(&mut self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
            let o = offset as usize;
            self.data[o..o + len as usize].fill(0);
            Ok(())
        }
    }

    struct Fixture {
        mem: GuestMemoryMmap,
        disk: MemDisk,
        id: [u8; ID_LEN],
    }

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x20000;

    fn fixture() -> Fixture {
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
            disk: MemDisk {
                data: (0..64 * 1024).map(|i| (i % 251) as u8).collect(),
                flushes: 0,
                fail: false,
            },
            id: *b"strata-disk-0\0\0\0\0\0\0\0",
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(f: &Fixture, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        f.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs the chain `descs` (NEXT flags set by the mock) and returns (used len, status).
    fn run(f: &mut Fixture, descs: &[RawDescriptor]) -> (u32, u8) {
        let q = MockSplitQueue::new(&f.mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut ctx = Context {
            backend: &mut f.disk,
            read_only: false,
            id: &f.id,
        };
        let descs: Vec<Descriptor> = chain.collect();
        let used = handle(&f.mem, &descs, &mut ctx);
        (used, f.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    #[test]
    fn read_copies_sectors_into_guest_memory() {
        let mut f = fixture();
        header(&f, VIRTIO_BLK_T_IN, 2);
        let (used, status) = run(
            &mut f,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 1024, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        assert_eq!((used, status), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, f.disk.data[1024..2048]);
    }

    #[test]
    fn write_then_flush_reach_the_backend() {
        let mut f = fixture();
        f.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&f, VIRTIO_BLK_T_OUT, 3);
        let (used, status) = run(
            &mut f,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, 0),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
        assert!(f.disk.data[1536..2048].iter().all(|&b| b == 0xab));

        header(&f, VIRTIO_BLK_T_FLUSH, 0);
        let (_, status) = run(&mut f, &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)]);
        assert_eq!((status, f.disk.flushes), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn get_id_and_write_zeroes_work() {
        let mut f = fixture();
        header(&f, VIRTIO_BLK_T_GET_ID, 0);
        let (used, status) = run(
            &mut f,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 20, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        assert_eq!((used, status), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, &f.id);

        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&4u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        f.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        header(&f, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (_, status) = run(
            &mut f,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 16, 0),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(f.disk.data[2048..3072].iter().all(|&b| b == 0));
        assert_ne!(f.disk.data[3072], 0);
    }

    #[test]
    fn backend_errors_are_ioerr() {
        let mut f = fixture();
        f.disk.fail = true;
        header(&f, VIRTIO_BLK_T_IN, 0);
        let (_, status) = run(
            &mut f,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }
}
