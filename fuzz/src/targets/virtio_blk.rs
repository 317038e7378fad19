//! virtio-blk request parsing: a guest-made descriptor table, avail ring and request headers on
//! mock guest memory, served by a real [`devices::virtio::block::Block`] through its own queue
//! loop (`process_queue`: the queue's ring and chain checks, then `request::handle`) over an
//! in-memory disk.
//!
//! Checked: nothing panics; the device never asks its backend for a byte outside the disk (the
//! backend asserts it); a wakeup returns without spinning; a broken queue stops the device.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use devices::virtio::block::{Block, BlockBackend};
use devices::virtio::vsock::testing::Ring;
use devices::virtio::{GuestMemory, Interrupt, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 1 << 20;
/// The queue's size (the device offers up to 256).
const QSIZE: u16 = 16;
/// Where the request buffers are: slot `i` is at `SLOTS + i * 0x1000`.
const SLOTS: u64 = 0x1_0000;
const SLOT_COUNT: u64 = 64;
/// Where an indirect table goes.
const INDIRECT: u64 = 0x8_0000;
/// The disk's size.
const DISK: u64 = 64 << 10;

/// A disk in memory that checks every range it is asked for.
struct MemDisk {
    data: Vec<u8>,
}

impl MemDisk {
    fn range(&self, offset: u64, len: usize, what: &str) -> std::ops::Range<usize> {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= self.data.len() as u64),
            "the device asked the backend to {what} {len} bytes at {offset}, past the disk"
        );
        offset as usize..offset as usize + len
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let r = self.range(offset, buf.len(), "read");
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.range(offset, buf.len(), "write");
        self.data[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let r = self.range(offset, len, "discard");
        self.data[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let r = self.range(offset, len, "zero");
        self.data[r].fill(0);
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Addr {
    Slot(u8),
    Offset(u32),
    Indirect,
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Small(u8),
    Sectors(u8),
    Header,
    Status,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Sector {
    Small(u8),
    End(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Header {
    slot: u8,
    kind: Kind,
    sector: Sector,
    /// Discard / write-zeroes segments (sector, count, flags) after the header's slot.
    segments: Vec<(Sector, u32, u32)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    event_idx: bool,
    descs: Vec<Desc>,
    indirect: Vec<Desc>,
    heads: Vec<u8>,
    headers: Vec<Header>,
    /// Publish this avail index instead of the number of heads.
    avail_idx: Option<u16>,
    pokes: Vec<(u32, u8)>,
}

fn addr(a: &Addr) -> u64 {
    match a {
        Addr::Slot(s) => SLOTS + (u64::from(*s) % SLOT_COUNT) * 0x1000,
        Addr::Offset(o) => u64::from(*o) % (MEM_SIZE + 0x1000),
        Addr::Indirect => INDIRECT,
        Addr::Raw(r) => *r,
    }
}

fn len(l: &Len) -> u32 {
    match l {
        Len::Small(n) => u32::from(*n),
        Len::Sectors(n) => u32::from(*n) * 512,
        Len::Header => 16,
        Len::Status => 1,
        Len::Raw(r) => *r,
    }
}

fn sector(s: &Sector) -> u64 {
    match s {
        Sector::Small(n) => u64::from(*n),
        Sector::End(n) => (DISK / 512).wrapping_sub(u64::from(*n)),
        Sector::Raw(r) => *r,
    }
}

fn raw_desc(d: &Desc) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr(&d.addr).to_le_bytes());
    raw[8..12].copy_from_slice(&len(&d.len).to_le_bytes());
    // NEXT, WRITE, INDIRECT and the rest.
    raw[12..14].copy_from_slice(&u16::from(d.flags).to_le_bytes());
    raw[14..16].copy_from_slice(&u16::from(d.next).to_le_bytes());
    raw
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) else {
        return;
    };
    let (mut ring, mut queue) = Ring::new(0, QSIZE);
    queue.set_event_idx(input.event_idx);
    for (i, d) in input.descs.iter().take(usize::from(QSIZE)).enumerate() {
        let at = GuestAddress(16 * i as u64);
        let _ = mem.write_slice(&raw_desc(d), at);
    }
    for (i, d) in input.indirect.iter().take(64).enumerate() {
        let _ = mem.write_slice(&raw_desc(d), GuestAddress(INDIRECT + 16 * i as u64));
    }
    for h in input.headers.iter().take(16) {
        let at = SLOTS + (u64::from(h.slot) % SLOT_COUNT) * 0x1000;
        let kind = match h.kind {
            Kind::In => 0,
            Kind::Out => 1,
            Kind::Flush => 4,
            Kind::GetId => 8,
            Kind::Discard => 11,
            Kind::WriteZeroes => 13,
            Kind::Raw(k) => k,
        };
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector(&h.sector).to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(at));
        for (i, (s, n, f)) in h.segments.iter().take(8).enumerate() {
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&sector(s).to_le_bytes());
            seg[8..12].copy_from_slice(&n.to_le_bytes());
            seg[12..16].copy_from_slice(&f.to_le_bytes());
            let _ = mem.write_slice(&seg, GuestAddress(at + 0x1000 + 16 * i as u64));
        }
    }
    for (at, v) in input.pokes.iter().take(64) {
        let _ = mem.write_obj(*v, GuestAddress(u64::from(*at) % MEM_SIZE));
    }
    for h in input.heads.iter().take(usize::from(QSIZE)) {
        ring.offer(&mem, u16::from(*h) % (QSIZE + 2));
    }
    if let Some(idx) = input.avail_idx {
        ring.publish_avail_idx(&mem, idx);
    }
    let backend = MemDisk {
        data: vec![0x5a; DISK as usize],
    };
    let Ok(mut dev) = Block::new(Box::new(backend), input.read_only, "fuzz-disk") else {
        return;
    };
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let interrupt: Arc<Interrupt> = Interrupt::new(irq);
    let features = dev.features();
    if dev
        .activate(mem.clone(), interrupt.clone(), vec![queue], features)
        .is_err()
    {
        return;
    }
    // Each call serves at most a queue's worth; a few calls drain anything a guest can offer.
    for _ in 0..4 {
        dev.process_queue();
    }
    if interrupt.needs_reset() {
        assert!(dev.is_broken(), "DEVICE_NEEDS_RESET without a broken queue");
    }
    while ring.poll_used(&mem).is_some() {}
}
