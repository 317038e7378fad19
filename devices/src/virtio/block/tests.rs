//! Device tests for malformed descriptor chains: requests go through the device's own queue
//! loop ([`Block::process_queue`]: pop the chain, parse and execute it, write the status byte,
//! add the used element, interrupt), on real guest memory and a real raw disk in a temp dir,
//! with this file playing the guest driver on a split queue laid out by `MockSplitQueue`.
//!
//! Each bad request is followed in the same batch by a good one. [`check`] then asserts what
//! the guest sees for the bad request (its used element, head index and used length, and its
//! status byte, or that nothing was written when the chain has no usable status byte), that
//! the good request was served, that what it wrote reads back, and that the disk file holds
//! exactly what the good request wrote and nothing of the bad one.
//!
//! A request that breaks the queue (a chain that loops or is cut short, a buffer outside guest
//! memory, more than SEG_MAX data descriptors or one beyond SIZE_MAX, a head index past the
//! queue, an avail index more than a queue ahead) instead stops the device: [`check`] with
//! [`Want::NeedsReset`] asserts that the device served nothing (run on a thread with a hang
//! guard, so a spinning device fails), set DEVICE_NEEDS_RESET with a config interrupt, wrote
//! nothing to the disk or guest memory, stays stopped, and serves again after a reset.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address as _, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use super::{Block, ChainBackend, QUEUE_SIZE};
use crate::virtio::{GuestMemory, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const MEM_SIZE: u64 = 16 << 20;
const DISK_SIZE: u64 = 1 << 20;
const DISK_SECTORS: u64 = DISK_SIZE / 512;

// Guest memory: the queue is at 0 (MockSplitQueue's layout), then the buffers.
/// The bad request's header.
const HDR: u64 = 0x10_0000;
/// The bad request's status byte.
const STATUS: u64 = 0x10_1000;
/// The bad request's data buffers (up to 1 MiB), filled with [`BAD_FILL`].
const DATA: u64 = 0x20_0000;
/// Indirect tables.
const TABLE: u64 = 0x40_0000;
/// The good request's header, status and data.
const GOOD_HDR: u64 = 0x50_0000;
const GOOD_STATUS: u64 = 0x50_1000;
const GOOD_DATA: u64 = 0x60_0000;
/// An address past the end of guest memory.
const OUTSIDE: u64 = MEM_SIZE + 0x10_0000;

/// What the bad requests' data buffers hold: were it written to the disk, the disk check
/// would see it.
const BAD_FILL: u8 = 0xd0;
/// A status byte before the device writes it.
const UNWRITTEN: u8 = 0xee;
/// Where the good request writes (away from everything the bad ones address).
const GOOD_SECTOR: u64 = 1024;
const GOOD_LEN: u32 = 4096;

/// The disk's initial content.
fn disk_pattern() -> Vec<u8> {
    (0..DISK_SIZE)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect()
}

/// What the good request writes.
fn good_data() -> Vec<u8> {
    (0..GOOD_LEN)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(0x41))
        .collect()
}

fn good_range() -> std::ops::Range<usize> {
    let start = (GOOD_SECTOR * 512) as usize;
    start..start + GOOD_LEN as usize
}

/// One buffer of a chain, in driver terms.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

/// Device-readable buffer.
fn r(addr: u64, len: u32) -> Seg {
    Seg {
        addr,
        len,
        write: false,
    }
}

/// Device-writable buffer.
fn w(addr: u64, len: u32) -> Seg {
    Seg {
        addr,
        len,
        write: true,
    }
}

/// `n` 512-byte data buffers at [`DATA`].
fn sectors(n: u32, write: bool) -> Vec<Seg> {
    (0..n)
        .map(|i| Seg {
            addr: DATA + u64::from(i) * 512,
            len: 512,
            write,
        })
        .collect()
}

/// A well-framed request: the header at [`HDR`], `data`, and the status byte at [`STATUS`].
fn req(data: &[Seg]) -> Vec<Seg> {
    let mut v = vec![r(HDR, 16)];
    v.extend_from_slice(data);
    v.push(w(STATUS, 1));
    v
}

/// A descriptor as written to a table; `next` is relative to the first slot of the chain.
#[derive(Clone, Copy, Debug)]
struct Raw {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// `segs` linked into one chain with NEXT flags.
fn link(segs: &[Seg]) -> Vec<Raw> {
    segs.iter()
        .enumerate()
        .map(|(i, s)| {
            let last = i + 1 == segs.len();
            Raw {
                addr: s.addr,
                len: s.len,
                flags: if s.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT },
                next: if last { 0 } else { i as u16 + 1 },
            }
        })
        .collect()
}

/// A block device on a raw disk, activated on one queue, and the guest driver around it.
struct Harness {
    mem: GuestMemory,
    _dir: tempfile::TempDir,
    path: PathBuf,
    block: Block,
    /// The features the device offers (for a driver through the transport).
    block_features: u64,
    interrupt: Arc<Interrupt>,
    read_only: bool,
    /// SEG_MAX as the device's config space advertises it.
    seg_max: u32,
    desc_table: u64,
    avail: u64,
    used: u64,
    /// The next free descriptor table slot.
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Harness {
    fn new(read_only: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, disk_pattern()).unwrap();
        let chain = disk::Chain::open(
            &path,
            disk::OpenOptions {
                read_only,
                format: Some(disk::Format::Raw),
            },
        )
        .unwrap();
        let block = Block::new(Box::new(ChainBackend::new(chain)), read_only, "blk-test").unwrap();
        let config = block.config_space();
        let seg_max = u32::from_le_bytes(config[12..16].try_into().unwrap());
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        mem.write_slice(&[BAD_FILL; 0x10_0000], GuestAddress(DATA))
            .unwrap();
        mem.write_obj(UNWRITTEN, GuestAddress(STATUS)).unwrap();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut h = Harness {
            mem,
            _dir: dir,
            path,
            block_features: block.features(),
            block,
            interrupt,
            read_only,
            seg_max,
            desc_table: 0,
            avail: 0,
            used: 0,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        h.activate();
        h
    }

    /// Lays out fresh rings and (re)activates the device on them, as a driver does after a reset.
    fn activate(&mut self) {
        let mock = MockSplitQueue::new(&self.mem, QUEUE_SIZE);
        let queue: Queue = mock.create_queue().unwrap();
        self.desc_table = mock.desc_table_addr().0;
        self.avail = mock.avail_addr().0;
        self.used = mock.used_addr().0;
        (self.next_desc, self.avail_idx, self.used_seen) = (0, 0, 0);
        let features = self.block.features();
        self.block
            .activate(
                self.mem.clone(),
                self.interrupt.clone(),
                vec![queue],
                features,
            )
            .unwrap();
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Writes a request header (type, reserved, sector) at `at`.
    fn header_at(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// The bad request's header.
    fn header(&self, kind: u32, sector: u64) {
        self.header_at(HDR, kind, sector);
    }

    /// A DISCARD / WRITE_ZEROES segment at `at`.
    fn segment(&self, at: u64, sector: u64, count: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&count.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }

    fn write_desc(&self, table: u64, index: u16, d: Raw, next: u16) {
        let raw = RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, d.flags, next));
        self.mem
            .write_obj(raw, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    /// Writes `descs` as an indirect table at `table` (`next` indexes the table).
    fn write_table(&self, table: u64, descs: &[Raw]) {
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(table, i as u16, *d, d.next);
        }
    }

    /// Puts `head` on the available ring.
    fn make_available(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes `descs` into free slots of the descriptor table (`next` relative to the first)
    /// and makes the chain available; returns its head index.
    fn push_raw(&mut self, descs: &[Raw]) -> u16 {
        let n = descs.len() as u16;
        assert!(n <= QUEUE_SIZE);
        if self.next_desc + n > QUEUE_SIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(
                self.desc_table,
                head + i as u16,
                *d,
                head.wrapping_add(d.next),
            );
        }
        self.next_desc += n;
        self.make_available(head);
        head
    }

    /// Makes `segs` available as a direct chain; returns its head index.
    fn push(&mut self, segs: &[Seg]) -> u16 {
        self.push_raw(&link(segs))
    }

    /// Writes `segs` as an indirect table at [`TABLE`] and makes available a chain of one
    /// descriptor that refers to it; returns its head index.
    fn push_indirect(&mut self, segs: &[Seg]) -> u16 {
        self.write_table(TABLE, &link(segs));
        self.push_raw(&[Raw {
            addr: TABLE,
            len: 16 * segs.len() as u32,
            flags: F_INDIRECT,
            next: 0,
        }])
    }

    /// The good request: a write of [`good_data`] at [`GOOD_SECTOR`], or a read of it on a
    /// read-only disk. Returns its head index.
    fn push_good(&mut self) -> u16 {
        if self.read_only {
            return self.push_good_read();
        }
        self.mem
            .write_slice(&good_data(), GuestAddress(GOOD_DATA))
            .unwrap();
        self.header_at(GOOD_HDR, VIRTIO_BLK_T_OUT, GOOD_SECTOR);
        self.mem
            .write_obj(UNWRITTEN, GuestAddress(GOOD_STATUS))
            .unwrap();
        self.push(&[r(GOOD_HDR, 16), r(GOOD_DATA, GOOD_LEN), w(GOOD_STATUS, 1)])
    }

    /// A read of the good request's sectors into a cleared buffer.
    fn push_good_read(&mut self) -> u16 {
        self.mem
            .write_slice(&[0u8; GOOD_LEN as usize], GuestAddress(GOOD_DATA))
            .unwrap();
        self.header_at(GOOD_HDR, VIRTIO_BLK_T_IN, GOOD_SECTOR);
        self.mem
            .write_obj(UNWRITTEN, GuestAddress(GOOD_STATUS))
            .unwrap();
        self.push(&[r(GOOD_HDR, 16), w(GOOD_DATA, GOOD_LEN), w(GOOD_STATUS, 1)])
    }

    fn good_buffer(&self) -> Vec<u8> {
        let mut v = vec![0u8; GOOD_LEN as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(GOOD_DATA))
            .unwrap();
        v
    }

    /// The device's pass over the queue, as on a queue notification.
    fn process(&mut self) {
        self.block.process_queue();
    }

    /// The used elements (head index, used length) added since the last call.
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + u64::from(self.used_seen % QUEUE_SIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Whether the used-buffer interrupt was raised (InterruptStatus and the irqfd) since the
    /// last call; acknowledges it.
    fn interrupted(&self) -> bool {
        let status = self.interrupt.status() & INT_VRING != 0;
        let fd = self.interrupt.eventfd().read().is_ok();
        self.interrupt.ack(INT_VRING);
        assert_eq!(status, fd, "InterruptStatus and the irqfd disagree");
        status
    }

    /// The disk as it should be: the initial pattern plus the good write.
    fn expected_disk(&self) -> Vec<u8> {
        let mut d = disk_pattern();
        if !self.read_only {
            d[good_range()].copy_from_slice(&good_data());
        }
        d
    }

    fn disk_file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

/// What the guest should see for a bad request.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// A used element of length 1 and this status in the status byte at [`STATUS`].
    Status(u8),
    /// A used element of length 0 and nothing written at [`STATUS`]: the chain has no usable
    /// status byte.
    NoStatus,
    /// The queue is broken: no used element, DEVICE_NEEDS_RESET, nothing served until reset.
    NeedsReset,
}

/// Hang guard for a device pass: generous, only there so that a spinning device fails the test
/// instead of hanging it.
const HANG_GUARD: Duration = Duration::from_secs(60);

impl Harness {
    /// The device's pass over the queue on another thread; fails if it does not end.
    fn process_guarded(&mut self) {
        let (tx, rx) = mpsc::channel();
        let block = std::mem::replace(&mut self.block, Harness::spare_block());
        std::thread::spawn(move || {
            let mut block = block;
            block.process_queue();
            tx.send(block).unwrap();
        });
        self.block = rx
            .recv_timeout(HANG_GUARD)
            .expect("the device spins on the queue");
    }

    /// A placeholder device while the real one is on another thread.
    fn spare_block() -> Block {
        struct Nothing;
        impl super::BlockBackend for Nothing {
            fn capacity(&self) -> u64 {
                0
            }
            fn read_at(&mut self, _: &mut [u8], _: u64) -> std::io::Result<()> {
                Ok(())
            }
            fn write_at(&mut self, _: &[u8], _: u64) -> std::io::Result<()> {
                Ok(())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
            fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
                Ok(())
            }
            fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
                Ok(())
            }
        }
        Block::new(Box::new(Nothing), true, "spare").unwrap()
    }

    /// Asserts the device stopped on a broken queue: nothing used, DEVICE_NEEDS_RESET with one
    /// config interrupt, nothing written to the disk or the status bytes; it stays stopped, and
    /// a reset and a fresh queue bring it back.
    fn assert_needs_reset_then_recovers(&mut self, what: &str) {
        assert!(self.take_used().is_empty(), "{what}: nothing may be used");
        assert_eq!(
            self.byte(GOOD_STATUS),
            UNWRITTEN,
            "{what}: good request served"
        );
        assert_eq!(self.byte(STATUS), UNWRITTEN, "{what}: status written");
        assert!(self.interrupt.needs_reset(), "{what}: DEVICE_NEEDS_RESET");
        assert!(self.block.is_broken(), "{what}: still serving");
        assert_eq!(
            self.interrupt.status(),
            INT_CONFIG,
            "{what}: a config interrupt and no used-buffer interrupt"
        );
        assert!(self.interrupt.eventfd().read().is_ok(), "{what}: irqfd");
        assert!(
            self.disk_file() == disk_pattern(),
            "{what}: the disk changed"
        );
        // Stopped: even a sane ring is not served any more.
        self.set_avail_idx(self.avail_idx);
        self.process_guarded();
        assert!(self.take_used().is_empty(), "{what}: served while broken");
        assert!(
            (0..512).all(|i| self.byte(DATA + i) == BAD_FILL),
            "{what}: guest memory written"
        );
        // The driver resets the device and sets it up again (virtio 1.2, 2.1.2).
        self.block.reset();
        self.interrupt.clear();
        self.activate();
        let head = self.push_good();
        self.process();
        let good_len = if self.read_only { GOOD_LEN + 1 } else { 1 };
        assert_eq!(
            self.take_used(),
            [(u32::from(head), good_len)],
            "{what}: after reset"
        );
        assert_eq!(
            self.byte(GOOD_STATUS),
            VIRTIO_BLK_S_OK,
            "{what}: after reset"
        );
        assert!(!self.interrupt.needs_reset());
        assert!(
            self.disk_file() == self.expected_disk(),
            "{what}: after reset"
        );
    }
}

/// Queues a bad request (`bad` returns its head index) and a good one after it, lets the device
/// serve the queue, then reads the good request's sectors back, checking everything the guest
/// and the disk show (see the module doc).
fn check(read_only: bool, what: &str, want: Want, bad: impl FnOnce(&mut Harness) -> u16) {
    let mut h = Harness::new(read_only);
    assert!(h.seg_max > 0, "SEG_MAX advertised");
    let bad_head = bad(&mut h);
    let good_head = h.push_good();
    h.process_guarded();

    let (bad_len, status) = match want {
        Want::Status(s) => (1, s),
        Want::NoStatus => (0, UNWRITTEN),
        Want::NeedsReset => return h.assert_needs_reset_then_recovers(what),
    };
    let good_len = if read_only { GOOD_LEN + 1 } else { 1 };
    assert_eq!(
        h.take_used(),
        [
            (u32::from(bad_head), bad_len),
            (u32::from(good_head), good_len)
        ],
        "{what}: used ring"
    );
    assert_eq!(h.byte(STATUS), status, "{what}: status byte");
    assert_eq!(h.byte(GOOD_STATUS), VIRTIO_BLK_S_OK, "{what}: good request");
    assert!(h.interrupted(), "{what}: no interrupt");

    let head = h.push_good_read();
    h.process();
    assert_eq!(
        h.take_used(),
        [(u32::from(head), GOOD_LEN + 1)],
        "{what}: read back"
    );
    assert_eq!(h.byte(GOOD_STATUS), VIRTIO_BLK_S_OK, "{what}: read back");
    assert!(h.interrupted(), "{what}: no interrupt for the read back");
    assert!(
        h.good_buffer() == h.expected_disk()[good_range()],
        "{what}: read back the wrong data"
    );
    assert!(
        h.disk_file() == h.expected_disk(),
        "{what}: the disk file changed"
    );
}

type Case = (&'static str, Want, fn(&mut Harness) -> u16);

fn check_all(read_only: bool, cases: &[Case]) {
    for &(what, want, bad) in cases {
        check(read_only, what, want, bad);
    }
}

const IOERR: Want = Want::Status(VIRTIO_BLK_S_IOERR);
const BROKEN: Want = Want::NeedsReset;
const UNSUPP: Want = Want::Status(VIRTIO_BLK_S_UNSUPP);

#[test]
fn a_chain_of_seg_max_data_descriptors_is_served() {
    // The limit itself is fine, direct and indirect: SEG_MAX + 2 descriptors.
    let mut h = Harness::new(false);
    let n = h.seg_max;
    let content: Vec<u8> = (0..n * 512).map(|i| (i % 253) as u8).collect();
    h.mem.write_slice(&content, GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_OUT, 8);
    let head = h.push(&req(&sectors(n, false)));
    h.process();
    assert_eq!(h.take_used(), [(u32::from(head), 1)]);
    assert_eq!(h.byte(STATUS), VIRTIO_BLK_S_OK);

    h.mem
        .write_slice(&vec![0u8; content.len()], GuestAddress(DATA))
        .unwrap();
    h.header(VIRTIO_BLK_T_IN, 8);
    let head = h.push_indirect(&req(&sectors(n, true)));
    h.process();
    assert_eq!(h.take_used(), [(u32::from(head), n * 512 + 1)]);
    assert_eq!(h.byte(STATUS), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; content.len()];
    h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got == content);
    let mut disk = disk_pattern();
    disk[8 * 512..8 * 512 + content.len()].copy_from_slice(&content);
    assert!(h.disk_file() == disk);
}

#[test]
fn chains_longer_than_seg_max_plus_two_break_the_queue() {
    check_all(
        false,
        &[
            ("write, SEG_MAX + 1 data descriptors", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                let chain = req(&sectors(h.seg_max + 1, false));
                assert_eq!(chain.len() as u32, h.seg_max + 3);
                h.push(&chain)
            }),
            ("read, SEG_MAX + 1 data descriptors", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&sectors(h.seg_max + 1, true)))
            }),
            ("write, SEG_MAX + 2 data descriptors", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&sectors(h.seg_max + 2, false)))
            }),
            ("read, SEG_MAX + 2 data descriptors", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&sectors(h.seg_max + 2, true)))
            }),
            (
                "write, indirect, SEG_MAX + 2 data descriptors",
                BROKEN,
                |h| {
                    h.header(VIRTIO_BLK_T_OUT, 0);
                    h.push_indirect(&req(&sectors(h.seg_max + 2, false)))
                },
            ),
            (
                "read, indirect, 1000 data descriptors (more than the queue size)",
                BROKEN,
                |h| {
                    h.header(VIRTIO_BLK_T_IN, 0);
                    h.push_indirect(&req(&sectors(1000, true)))
                },
            ),
        ],
    );
}

#[test]
fn bad_headers_get_ioerr() {
    check_all(
        false,
        &[
            ("header of 15 bytes", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&[r(HDR, 15), r(DATA, 512), w(STATUS, 1)])
            }),
            (
                "header split 8 + 8 (valid framing the device does not take)",
                IOERR,
                |h| {
                    h.header(VIRTIO_BLK_T_OUT, 0);
                    h.push(&[r(HDR, 8), r(HDR + 8, 8), r(DATA, 512), w(STATUS, 1)])
                },
            ),
            ("device-writable header", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&[w(HDR, 16), r(DATA, 512), w(STATUS, 1)])
            }),
            ("header outside guest memory", BROKEN, |h| {
                h.push(&[r(OUTSIDE, 16), r(DATA, 512), w(STATUS, 1)])
            }),
            ("header across the end of guest memory", BROKEN, |h| {
                h.push(&[r(MEM_SIZE - 8, 16), r(DATA, 512), w(STATUS, 1)])
            }),
        ],
    );
}

#[test]
fn chains_without_a_usable_status_byte_are_returned_with_nothing_written() {
    check_all(
        false,
        &[
            ("header alone", Want::NoStatus, |h| {
                h.header(VIRTIO_BLK_T_FLUSH, 0);
                h.push(&[r(HDR, 16)])
            }),
            ("single device-writable descriptor", Want::NoStatus, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&[w(HDR, 16)])
            }),
            ("write without a status descriptor", Want::NoStatus, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&[r(HDR, 16), r(DATA, 512)])
            }),
            ("read-only status descriptor", Want::NoStatus, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&[r(HDR, 16), r(DATA, 512), r(STATUS, 1)])
            }),
            ("zero-length status descriptor", Want::NoStatus, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&[r(HDR, 16), r(DATA, 512), w(STATUS, 0)])
            }),
            ("status outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&[r(HDR, 16), r(DATA, 512), w(OUTSIDE, 1)])
            }),
        ],
    );
}

#[test]
fn read_without_a_status_descriptor_gets_ioerr_in_its_last_byte() {
    // virtio 1.x framing: the status is the last byte of the chain, here of the 512-byte read
    // buffer, which leaves 511 bytes of data: not whole sectors.
    let mut h = Harness::new(false);
    h.header(VIRTIO_BLK_T_IN, 0);
    let head = h.push(&[r(HDR, 16), w(DATA, 512)]);
    h.process();
    assert_eq!(h.take_used(), [(u32::from(head), 1)]);
    assert_eq!(h.byte(DATA + 511), VIRTIO_BLK_S_IOERR);
    assert!((0..511).all(|i| h.byte(DATA + i) == BAD_FILL));
    assert!(h.interrupted());
    assert!(h.disk_file() == disk_pattern());
}

#[test]
fn data_in_the_wrong_direction_gets_ioerr() {
    check_all(
        false,
        &[
            ("read into a device-readable buffer", IOERR, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[r(DATA, 512)]))
            }),
            ("write from a device-writable buffer", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[w(DATA, 512)]))
            }),
            ("write, second buffer device-writable", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, 512), w(DATA + 512, 512)]))
            }),
            ("read, second buffer device-readable", IOERR, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[w(DATA, 512), r(DATA + 512, 512)]))
            }),
            ("GET_ID into a device-readable buffer", IOERR, |h| {
                h.header(VIRTIO_BLK_T_GET_ID, 0);
                h.push(&req(&[r(DATA, 20)]))
            }),
            ("WRITE_ZEROES segment device-writable", IOERR, |h| {
                h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                h.segment(DATA, 0, 8, 0);
                h.push(&req(&[w(DATA, 16)]))
            }),
            ("DISCARD segment device-writable", IOERR, |h| {
                h.header(VIRTIO_BLK_T_DISCARD, 0);
                h.segment(DATA, 0, 8, 0);
                h.push(&req(&[w(DATA, 16)]))
            }),
        ],
    );
}

#[test]
fn data_that_is_not_whole_sectors_gets_ioerr() {
    check_all(
        false,
        &[
            ("write of 100 bytes", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, 100)]))
            }),
            ("read of 511 bytes", IOERR, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[w(DATA, 511)]))
            }),
            ("write of 512 + 100 bytes", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, 512), r(DATA + 512, 100)]))
            }),
            ("write with a zero-length buffer", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, 512), r(DATA + 512, 0), r(DATA + 1024, 512)]))
            }),
            ("write without data", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[]))
            }),
            ("read without data", IOERR, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[]))
            }),
            ("WRITE_ZEROES segment of 8 bytes", IOERR, |h| {
                h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                h.segment(DATA, 0, 8, 0);
                h.push(&req(&[r(DATA, 8)]))
            }),
        ],
    );
}

#[test]
fn ranges_past_the_capacity_get_ioerr() {
    check_all(
        false,
        &[
            ("write across the last sector", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1);
                h.push(&req(&[r(DATA, 1024)]))
            }),
            ("read at the capacity", IOERR, |h| {
                h.header(VIRTIO_BLK_T_IN, DISK_SECTORS);
                h.push(&req(&[w(DATA, 512)]))
            }),
            (
                "write at sector u64::MAX (byte offset overflows)",
                IOERR,
                |h| {
                    h.header(VIRTIO_BLK_T_OUT, u64::MAX);
                    h.push(&req(&[r(DATA, 512)]))
                },
            ),
            ("write whose end overflows", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, u64::MAX / 512);
                h.push(&req(&[r(DATA, 1024)]))
            }),
            ("WRITE_ZEROES past the end", IOERR, |h| {
                h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                h.segment(DATA, DISK_SECTORS - 4, 8, 0);
                h.push(&req(&[r(DATA, 16)]))
            }),
            ("DISCARD past the end", IOERR, |h| {
                h.header(VIRTIO_BLK_T_DISCARD, 0);
                h.segment(DATA, DISK_SECTORS, 1, 0);
                h.push(&req(&[r(DATA, 16)]))
            }),
        ],
    );
}

#[test]
fn a_read_only_disk_refuses_writes_with_ioerr() {
    check_all(
        true,
        &[
            ("write", IOERR, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, 512)]))
            }),
            ("WRITE_ZEROES", IOERR, |h| {
                h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                h.segment(DATA + 512, 0, 8, 0);
                h.push(&req(&[r(DATA + 512, 16)]))
            }),
            ("DISCARD", IOERR, |h| {
                h.header(VIRTIO_BLK_T_DISCARD, 0);
                h.segment(DATA + 512, 0, 8, 0);
                h.push(&req(&[r(DATA + 512, 16)]))
            }),
        ],
    );
}

#[test]
fn unknown_request_types_get_unsupp() {
    check_all(
        false,
        &[
            ("type 2", UNSUPP, |h| {
                h.header(2, 0);
                h.push(&req(&[r(DATA, 512)]))
            }),
            ("type 99 without data", UNSUPP, |h| {
                h.header(99, 0);
                h.push(&req(&[]))
            }),
            ("type u32::MAX with a writable buffer", UNSUPP, |h| {
                h.header(u32::MAX, 0);
                h.push(&req(&[w(DATA, 512)]))
            }),
            ("DISCARD with the unmap flag", UNSUPP, |h| {
                h.header(VIRTIO_BLK_T_DISCARD, 0);
                h.segment(DATA, 0, 8, 1);
                h.push(&req(&[r(DATA, 16)]))
            }),
        ],
    );
}

#[test]
fn data_outside_guest_memory_or_beyond_size_max_breaks_the_queue() {
    check_all(
        false,
        &[
            ("write from outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(OUTSIDE, 512)]))
            }),
            ("write, second buffer outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, 512), r(OUTSIDE, 512)]))
            }),
            (
                "write, buffer across the end of guest memory",
                BROKEN,
                |h| {
                    h.header(VIRTIO_BLK_T_OUT, 0);
                    h.push(&req(&[r(DATA, 512), r(MEM_SIZE - 256, 512)]))
                },
            ),
            ("read into memory outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[w(DATA, 512), w(OUTSIDE, 512)]))
            }),
            ("write of a 4 GiB - 512 descriptor", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, !511)]))
            }),
            ("a 1 GiB data descriptor (beyond SIZE_MAX)", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[w(DATA, 1 << 30)]))
            }),
            ("SIZE_MAX + 512 bytes in one descriptor", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push(&req(&[r(DATA, super::SIZE_MAX + 512)]))
            }),
            ("GET_ID into memory outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_GET_ID, 0);
                h.push(&req(&[w(OUTSIDE, 20)]))
            }),
            ("WRITE_ZEROES segment outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                h.push(&req(&[r(OUTSIDE, 16)]))
            }),
        ],
    );
}

#[test]
fn malformed_indirect_tables_break_the_queue() {
    // The queue's chain walk stops at a bad table without an error; the device sees the chain
    // cut short (its last descriptor still has NEXT, or it has none) and stops.
    fn table(h: &mut Harness, len: u32) -> u16 {
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.write_table(TABLE, &link(&req(&[r(DATA, 512)])));
        h.push_raw(&[Raw {
            addr: TABLE,
            len,
            flags: F_INDIRECT,
            next: 0,
        }])
    }
    check_all(
        false,
        &[
            ("table length not a multiple of 16", BROKEN, |h| {
                table(h, 40)
            }),
            ("empty table", BROKEN, |h| table(h, 0)),
            ("table outside guest memory", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_OUT, 0);
                h.push_raw(&[Raw {
                    addr: OUTSIDE,
                    len: 48,
                    flags: F_INDIRECT,
                    next: 0,
                }])
            }),
            ("indirect descriptor inside a table", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.write_table(TABLE + 0x1000, &link(&[w(DATA, 512), w(STATUS, 1)]));
                let mut t = link(&[r(HDR, 16)]);
                t[0].flags |= F_NEXT;
                t[0].next = 1;
                t.push(Raw {
                    addr: TABLE + 0x1000,
                    len: 32,
                    flags: F_INDIRECT,
                    next: 0,
                });
                h.write_table(TABLE, &t);
                h.push_raw(&[Raw {
                    addr: TABLE,
                    len: 32,
                    flags: F_INDIRECT,
                    next: 0,
                }])
            }),
            ("next index past the end of the table", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                let mut t = link(&req(&[w(DATA, 512)]));
                t[1].next = 7;
                h.write_table(TABLE, &t);
                h.push_raw(&[Raw {
                    addr: TABLE,
                    len: 48,
                    flags: F_INDIRECT,
                    next: 0,
                }])
            }),
            ("loop inside a table", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                let mut t = link(&req(&[w(DATA, 512)]));
                t[1].next = 0;
                h.write_table(TABLE, &t);
                h.push_raw(&[Raw {
                    addr: TABLE,
                    len: 48,
                    flags: F_INDIRECT,
                    next: 0,
                }])
            }),
        ],
    );
}

#[test]
fn chains_cut_short_in_the_descriptor_table_break_the_queue() {
    check_all(
        false,
        &[
            ("loop (cut at the queue size)", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                let mut t = link(&req(&[w(DATA, 512)]));
                t[1].next = 0;
                h.push_raw(&t)
            }),
            ("next index past the queue size", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                let mut t = link(&req(&[w(DATA, 512)]));
                t[1].next = QUEUE_SIZE + 5;
                h.push_raw(&t)
            }),
            ("chain of more than 4 GiB", BROKEN, |h| {
                h.header(VIRTIO_BLK_T_IN, 0);
                h.push(&req(&[w(DATA, 0x8000_0000), w(DATA, 0x8000_0000)]))
            }),
        ],
    );
}

#[test]
fn a_head_index_past_the_queue_size_breaks_the_queue() {
    let mut h = Harness::new(false);
    h.make_available(QUEUE_SIZE + 44);
    h.push_good();
    h.process_guarded();
    h.assert_needs_reset_then_recovers("head index past the queue size");
}

#[test]
fn an_avail_index_more_than_a_queue_ahead_breaks_the_queue_instead_of_spinning() {
    let mut h = Harness::new(false);
    h.push_good();
    h.set_avail_idx(QUEUE_SIZE + 1);
    h.process_guarded();
    h.avail_idx = 1;
    h.assert_needs_reset_then_recovers("avail index ahead");
}

#[test]
fn a_broken_queue_leaves_another_device_working() {
    let mut broken = Harness::new(false);
    let mut healthy = Harness::new(false);
    broken.header(VIRTIO_BLK_T_IN, 0);
    let mut t = link(&req(&[w(DATA, 512)]));
    t[1].next = 0; // a loop
    broken.push_raw(&t);
    broken.process_guarded();
    assert!(broken.interrupt.needs_reset());
    let head = healthy.push_good();
    healthy.process_guarded();
    assert_eq!(healthy.take_used(), [(u32::from(head), 1)]);
    assert_eq!(healthy.byte(GOOD_STATUS), VIRTIO_BLK_S_OK);
    assert!(!healthy.interrupt.needs_reset());
    assert!(healthy.disk_file() == healthy.expected_disk());
}

#[test]
fn a_one_gib_request_is_refused_before_any_io_or_allocation() {
    // A 1 GiB descriptor inside a guest that has 1 GiB and more: the limit, not the address,
    // refuses it, before the disk is touched. (No bounce buffer exists to allocate: data moves
    // straight between the disk and guest memory; `request::read` holds no Vec.)
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, disk_pattern()).unwrap();
    let chain = disk::Chain::open(&path, disk::OpenOptions::default()).unwrap();
    let mut block = Block::new(Box::new(ChainBackend::new(chain)), false, "big").unwrap();
    // Sparse: the host does not back these pages until touched.
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (1usize << 30) + (16 << 20))]).unwrap();
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let queue: Queue = mock.create_queue().unwrap();
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let features = block.features();
    block
        .activate(mem.clone(), interrupt.clone(), vec![queue], features)
        .unwrap();
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(16 << 20, 1 << 30, F_NEXT | F_WRITE, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE, 0)),
    ];
    mock.add_desc_chains(&descs, 0).unwrap();
    block.process_queue();
    assert!(interrupt.needs_reset());
    assert!(block.is_broken());
    let used: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used, 0);
    let probe: u8 = mem.read_obj(GuestAddress(16 << 20)).unwrap();
    assert_eq!(probe, 0, "guest memory was written");
}

/// The harness's device behind a virtio-mmio transport, set up by the driver through the
/// registers on the harness's rings, as in a VM.
struct Transported {
    t: crate::virtio::mmio::MmioTransport,
    dev: Arc<std::sync::Mutex<Block>>,
    mailbox: Arc<crate::virtio::Mailbox>,
    queue_evt: EventFd,
}

fn mmio_resources(
    h: &Harness,
    dev: Arc<std::sync::Mutex<Block>>,
    queue_evt: &EventFd,
) -> (
    crate::virtio::mmio::MmioResources,
    Arc<crate::virtio::Mailbox>,
) {
    let mailbox = crate::virtio::Mailbox::new().unwrap();
    let r = crate::virtio::mmio::MmioResources {
        device: dev,
        mem: h.mem.clone(),
        interrupt: h.interrupt.clone(),
        queue_evts: vec![queue_evt.try_clone().unwrap()],
        mailbox: mailbox.clone(),
    };
    (r, mailbox)
}

fn transported(h: &mut Harness) -> Transported {
    // The harness activated the device directly; take it back, idle.
    let mut block = std::mem::replace(&mut h.block, Harness::spare_block());
    block.reset();
    let queue_evt = block.queue_event().unwrap();
    let dev = Arc::new(std::sync::Mutex::new(block));
    let (r, mailbox) = mmio_resources(h, dev.clone(), &queue_evt);
    let mut t = crate::virtio::mmio::MmioTransport::new(r);
    driver_init(&mut t, h);
    Transported {
        t,
        dev,
        mailbox,
        queue_evt,
    }
}

/// The driver's whole initialisation through the registers, as Linux does it right after
/// writing 0 to Status (no wait): ACKNOWLEDGE, DRIVER, the device's features, FEATURES_OK, the
/// queue on the harness's rings, DRIVER_OK. Returns Status as read after DRIVER_OK.
fn driver_init(t: &mut crate::virtio::mmio::MmioTransport, h: &Harness) -> u32 {
    use crate::bus::BusDevice;
    use crate::virtio::status::*;
    let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(0x070, ACKNOWLEDGE);
    w(0x070, ACKNOWLEDGE | DRIVER);
    let features = h.block_features | (1 << crate::virtio::VIRTIO_F_VERSION_1);
    w(0x024, 0);
    w(0x020, features as u32);
    w(0x024, 1);
    w(0x020, (features >> 32) as u32);
    w(0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    w(0x030, 0);
    w(0x038, u32::from(QUEUE_SIZE));
    for (reg, addr) in [(0x080, h.desc_table), (0x090, h.avail), (0x0a0, h.used)] {
        w(reg, addr as u32);
        w(reg + 4, (addr >> 32) as u32);
    }
    w(0x044, 1);
    w(0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    reg(t, 0x070)
}

/// Reads a transport register.
fn reg(t: &mut crate::virtio::mmio::MmioTransport, off: u64) -> u32 {
    use crate::bus::BusDevice;
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

/// Writes a transport register.
fn set_reg(t: &mut crate::virtio::mmio::MmioTransport, off: u64, v: u32) {
    use crate::bus::BusDevice;
    t.write(off, &v.to_le_bytes());
}

/// Polls `done` with a generous hang guard.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never happened"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_paused_device_touches_nothing_until_resumed() {
    use crate::bus::BusDevice;
    let mut h = Harness::new(false);
    let tr = transported(&mut h);
    let mut t = tr.t;
    let el = crate::virtio::EventLoop::start(
        "blk-pause-test",
        tr.dev.clone(),
        tr.mailbox.clone(),
        Arc::new(|f| panic!("{f}")),
    )
    .unwrap();
    let head = h.push_good();
    t.write(crate::virtio::mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
    eventually("the first request", || {
        h.byte(GOOD_STATUS) == VIRTIO_BLK_S_OK
    });
    assert_eq!(h.take_used(), [(u32::from(head), 1)]);

    el.pause().unwrap();
    // Fill the queue and notify, as a guest whose vCPU ran just before the pause would.
    let head = h.push_good_read();
    let _ = tr.queue_evt.write(1);
    let mut before = vec![0u8; MEM_SIZE as usize];
    h.mem.read_slice(&mut before, GuestAddress(0)).unwrap();
    // However long we look, a parked device does nothing; a short look fails one that is not.
    std::thread::sleep(Duration::from_millis(100));
    let mut after = vec![0u8; MEM_SIZE as usize];
    h.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(
        before == after,
        "guest memory (rings or buffers) changed while paused"
    );

    el.resume().unwrap();
    eventually("the request queued while paused", || {
        h.byte(GOOD_STATUS) == VIRTIO_BLK_S_OK
    });
    assert_eq!(h.take_used(), [(u32::from(head), GOOD_LEN + 1)]);
    assert!(h.good_buffer() == good_data());
    drop(el);
}

#[test]
fn a_device_saved_in_needs_reset_is_restored_stopped_until_the_driver_resets_it() {
    use super::BlockState;
    use crate::virtio::mmio::{MmioState, MmioTransport};
    use snapshot::Persist;
    let mut h = Harness::new(false);
    let tr = transported(&mut h);
    tr.mailbox.deliver(&mut *tr.dev.lock().unwrap());
    let mut mmio: MmioState = tr.t.save();
    let blk: BlockState = tr.dev.lock().unwrap().save();
    drop(tr);
    mmio.needs_reset = true;

    let chain = disk::Chain::open(
        &h.path,
        disk::OpenOptions {
            read_only: false,
            format: Some(disk::Format::Raw),
        },
    )
    .unwrap();
    let resources = super::BlockResources {
        backend: Box::new(ChainBackend::new(chain)),
    };
    let block = Block::restore(resources, &blk).unwrap();
    let queue_evt = block.queue_event().unwrap();
    let dev = Arc::new(std::sync::Mutex::new(block));
    let (r, mailbox) = mmio_resources(&h, dev.clone(), &queue_evt);
    let mut t = MmioTransport::restore(r, &mmio).unwrap();
    mailbox.deliver(&mut *dev.lock().unwrap());

    // The guest sees NEEDS_RESET, and a request is not served.
    let mut status = [0u8; 4];
    crate::bus::BusDevice::read(&mut t, 0x070, &mut status);
    assert_ne!(
        u32::from_le_bytes(status) & crate::virtio::status::DEVICE_NEEDS_RESET,
        0
    );
    h.push_good();
    dev.lock().unwrap().process_queue();
    assert!(
        h.take_used().is_empty(),
        "a device restored in NEEDS_RESET served a request"
    );
    assert!(dev.lock().unwrap().is_broken());
}

#[test]
fn state_round_trips_and_the_restored_device_serves_on_from_the_same_used_index() {
    use super::{BlockResources, BlockState};
    use crate::virtio::mmio::{MmioState, MmioTransport};
    use snapshot::Persist;
    let mut h = Harness::new(false);
    let tr = transported(&mut h);
    tr.mailbox.deliver(&mut *tr.dev.lock().unwrap());
    let head = h.push_good();
    tr.dev.lock().unwrap().process_queue();
    assert_eq!(h.take_used(), [(u32::from(head), 1)]);

    // Save (the device thread is not running here), serialise, and let the old device go.
    let mmio: MmioState = tr.t.save();
    let blk: BlockState = tr.dev.lock().unwrap().save();
    assert!(mmio.active);
    assert_eq!(mmio.queues[0].next_used, 1);
    let json = serde_json::to_string(&(&mmio, &blk)).unwrap();
    let (mmio2, blk2): (MmioState, BlockState) = serde_json::from_str(&json).unwrap();
    drop(tr);

    let path = h.path.clone();
    let open = || {
        let chain = disk::Chain::open(
            &path,
            disk::OpenOptions {
                read_only: false,
                format: Some(disk::Format::Raw),
            },
        )
        .unwrap();
        BlockResources {
            backend: Box::new(ChainBackend::new(chain)),
        }
    };
    let block = Block::restore(open(), &blk2).unwrap();
    assert_eq!(block.save(), blk);
    let queue_evt = block.queue_event().unwrap();
    let dev = Arc::new(std::sync::Mutex::new(block));
    let (r, mailbox) = mmio_resources(&h, dev.clone(), &queue_evt);
    let t = MmioTransport::restore(r, &mmio2).unwrap();
    mailbox.deliver(&mut *dev.lock().unwrap());
    assert_eq!(t.save(), mmio);

    // The restored device goes on where the old one stopped.
    let head = h.push_good_read();
    dev.lock().unwrap().process_queue();
    assert_eq!(h.take_used(), [(u32::from(head), GOOD_LEN + 1)]);
    let used_idx: u16 = h.mem.read_obj(GuestAddress(h.used + 2)).unwrap();
    assert_eq!(used_idx, 2);
    assert!(h.good_buffer() == good_data());

    // Corrupted block states are refused, naming the field.
    drop(t);
    drop(dev);
    type Corruption = (fn(&mut BlockState), &'static str);
    let cases: [Corruption; 3] = [
        (|s| s.capacity += 512, "capacity"),
        (|s| s.id = "x".repeat(21), "id"),
        (|s| s.features ^= 1 << 9, "features"),
    ];
    for (corrupt, field) in cases {
        let mut s = blk.clone();
        corrupt(&mut s);
        let e = Block::restore(open(), &s).err().unwrap();
        assert_eq!(e.field, field, "{e}");
    }
}

// Reset through the transport with the device thread running (virtio 1.2, 4.2.3.1; see
// `mmio`'s module docs): Linux's virtio-mmio driver writes 0 to Status and goes straight on
// with its initialisation, without waiting for Status to read 0.

/// Where a driver lays out its rings after a reset: away from the first ones (at 0), from the
/// requests' buffers and from the indirect tables.
const RINGS2: u64 = 0x70_0000;

impl Harness {
    /// Lays out fresh, zeroed rings at `base` for the driver (not the device: the transport
    /// hands them over).
    fn rings_at(&mut self, base: u64) {
        let qs = u64::from(QUEUE_SIZE);
        self.desc_table = base;
        self.avail = base + 16 * qs;
        self.used = (self.avail + 6 + 2 * qs + 3) & !3;
        let end = self.used + 6 + 8 * qs;
        self.mem
            .write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        (self.next_desc, self.avail_idx, self.used_seen) = (0, 0, 0);
    }

    /// The used index the device wrote on the current rings.
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// A one-sector read of sector 0 into [`DATA`], its status at [`STATUS`].
    fn push_sector_read(&mut self) -> u16 {
        self.header(VIRTIO_BLK_T_IN, 0);
        self.mem.write_obj(UNWRITTEN, GuestAddress(STATUS)).unwrap();
        self.push(&req(&sectors(1, true)))
    }
}

/// A disk in memory whose every I/O call reports itself on `entered` and then blocks until the
/// test sends on (or drops) the other end of `release`: a backend stuck in I/O on demand.
struct Gated {
    data: Vec<u8>,
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gated {
    fn gate(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.entered.send(());
        let _ = self.release.recv();
        let start = offset as usize;
        start..start + len
    }
}

impl super::BlockBackend for Gated {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let range = self.gate(offset, buf.len());
        buf.copy_from_slice(&self.data[range]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let range = self.gate(offset, buf.len());
        self.data[range].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.gate(0, 0);
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        self.gate(0, 0);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let range = self.gate(offset, len as usize);
        self.data[range].fill(0);
        Ok(())
    }
}

/// The test's side of a [`Gated`] disk.
struct Gate {
    entered: mpsc::Receiver<()>,
    release: Option<mpsc::Sender<()>>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    /// Waits (hang guard) until the device is inside a backend call.
    fn wait_entered(&self) {
        self.entered
            .recv_timeout(HANG_GUARD)
            .expect("the device never called its backend");
    }

    /// Lets one blocked call go on.
    fn release_one(&self) {
        self.release.as_ref().unwrap().send(()).unwrap();
    }

    /// Lets every call through from now on.
    fn open(&mut self) {
        self.release = None;
    }

    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A harness whose device is on a [`Gated`] disk, behind a transport the driver set up, served
/// by its own event loop thread.
fn gated() -> (Harness, Transported, crate::virtio::EventLoop, Gate) {
    let mut h = Harness::new(false);
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Gated {
        data: disk_pattern(),
        entered: entered_tx,
        release: release_rx,
        calls: calls.clone(),
    };
    h.block = Block::new(Box::new(backend), false, "blk-gated").unwrap();
    let tr = transported(&mut h);
    let el = crate::virtio::EventLoop::start(
        "blk-gated",
        tr.dev.clone(),
        tr.mailbox.clone(),
        Arc::new(|f| panic!("{f}")),
    )
    .unwrap();
    let gate = Gate {
        entered,
        release: Some(release),
        calls,
    };
    (h, tr, el, gate)
}

const ACTIVE: u32 = crate::virtio::status::ACKNOWLEDGE
    | crate::virtio::status::DRIVER
    | crate::virtio::status::FEATURES_OK
    | crate::virtio::status::DRIVER_OK;

#[test]
fn a_reset_with_the_device_thread_running_reads_0_at_once_and_an_immediate_reinit_serves() {
    let mut h = Harness::new(false);
    let mut tr = transported(&mut h);
    let el = crate::virtio::EventLoop::start(
        "blk-reset-test",
        tr.dev.clone(),
        tr.mailbox.clone(),
        Arc::new(|f| panic!("{f}")),
    )
    .unwrap();
    let t = &mut tr.t;
    assert_eq!(reg(t, 0x070), ACTIVE);
    let head = h.push_good();
    set_reg(t, crate::virtio::mmio::NOTIFY_OFFSET, 0);
    eventually("the first request", || {
        h.byte(GOOD_STATUS) == VIRTIO_BLK_S_OK
    });
    assert_eq!(h.take_used(), [(u32::from(head), 1)]);

    // The bound only as a hang guard: the device thread is idle and answers at once.
    t.set_reset_timeout(HANG_GUARD);
    set_reg(t, 0x070, 0);
    assert_eq!(reg(t, 0x070), 0, "Status right after the reset");
    assert_eq!(reg(t, 0x044), 0, "QueueReady right after the reset");
    assert!(!tr.dev.lock().unwrap().is_active(), "the device let go");

    // Linux's probe, straight away, on new rings.
    h.rings_at(RINGS2);
    assert_eq!(driver_init(t, &h), ACTIVE);
    let head = h.push_good_read();
    set_reg(t, crate::virtio::mmio::NOTIFY_OFFSET, 0);
    eventually("a request after the re-initialisation", || {
        h.byte(GOOD_STATUS) == VIRTIO_BLK_S_OK
    });
    assert_eq!(h.take_used(), [(u32::from(head), GOOD_LEN + 1)]);
    assert!(h.good_buffer() == good_data());
    drop(el);
}

#[test]
fn a_reset_while_the_device_is_stuck_in_its_backend_returns_and_completes_once_it_is_done() {
    let (mut h, tr, el, mut gate) = gated();
    let old_used = h.used;
    // A write the backend holds.
    h.push_good();
    let _ = tr.queue_evt.write(1);
    gate.wait_entered();

    // The vCPU resets the device (with the real bound) while the backend is stuck.
    let (tx, rx) = mpsc::channel();
    let mut t = tr.t;
    std::thread::spawn(move || {
        set_reg(&mut t, 0x070, 0);
        let status = reg(&mut t, 0x070);
        let ready = reg(&mut t, 0x044);
        tx.send((t, status, ready)).unwrap();
    });
    let (mut t, status, ready) = rx
        .recv_timeout(HANG_GUARD)
        .expect("the reset waited for the stuck backend");
    assert_eq!(gate.calls(), 1, "the backend was never released");
    assert_ne!(status, 0, "Status reads non-zero until the device is done");
    assert_eq!(status, crate::virtio::status::DEVICE_NEEDS_RESET);
    assert_eq!(
        ready, 0,
        "QueueReady reads 0: a driver may set the queue up again"
    );
    assert!(t.reset_pending());

    // Linux re-initialises without waiting: its writes are taken, DRIVER_OK too.
    h.rings_at(RINGS2);
    assert_eq!(
        driver_init(&mut t, &h),
        ACTIVE | crate::virtio::status::DEVICE_NEEDS_RESET,
        "features, queue and DRIVER_OK taken while the reset is pending"
    );

    // The backend finishes: the device completes the reset, then the activation behind it.
    gate.open();
    eventually("the device finishing its reset", || !t.reset_pending());
    assert_eq!(reg(&mut t, 0x070), ACTIVE);
    let old_used_idx: u16 = h.mem.read_obj(GuestAddress(old_used + 2)).unwrap();
    assert_eq!(
        old_used_idx, 0,
        "the request given up was returned on the old rings"
    );

    // The device serves the new rings.
    let head = h.push_good_read();
    set_reg(&mut t, crate::virtio::mmio::NOTIFY_OFFSET, 0);
    eventually("a request on the new rings", || {
        h.byte(GOOD_STATUS) == VIRTIO_BLK_S_OK
    });
    assert_eq!(h.take_used(), [(u32::from(head), GOOD_LEN + 1)]);
    assert!(
        h.good_buffer() == good_data(),
        "the stuck write reached the disk"
    );
    assert!(!h.interrupt.needs_reset());
    drop(el);
}

#[test]
fn no_used_ring_write_lands_after_the_reset_was_acknowledged() {
    let (mut h, mut tr, el, mut gate) = gated();
    let old_used = h.used;
    // Two requests: the device takes the first and blocks in the backend; the second waits.
    h.push_good();
    h.push_sector_read();
    let _ = tr.queue_evt.write(1);
    gate.wait_entered();

    // The vCPU resets and waits (the bound is only a hang guard here) ...
    tr.t.set_reset_timeout(HANG_GUARD);
    let (tx, rx) = mpsc::channel();
    let mut t = tr.t;
    std::thread::spawn(move || {
        set_reg(&mut t, 0x070, 0);
        let status = reg(&mut t, 0x070);
        tx.send((t, status)).unwrap();
    });
    // ... and once the reset is posted, the request in hand completes.
    eventually("the reset posted", || h.interrupt.reset_pending());
    gate.release_one();
    let (mut t, status) = rx.recv_timeout(HANG_GUARD).expect("the reset never ended");
    assert_eq!(status, 0, "acknowledged after the request in hand");
    assert_eq!(gate.calls(), 1, "the second request was not started");

    // From here on nothing may change on the old rings, nor in the second request's buffers,
    // whatever the device thread does: notify the old queue, let the backend run freely, and
    // serve a request on new rings (the device thread is past the notification then).
    let ring_len = 6 + 8 * usize::from(QUEUE_SIZE);
    let mut before = vec![0u8; ring_len];
    h.mem
        .read_slice(&mut before, GuestAddress(old_used))
        .unwrap();
    assert_eq!(
        u16::from_le_bytes([before[2], before[3]]),
        0,
        "the request given up was returned"
    );
    gate.open();
    let _ = tr.queue_evt.write(1);
    h.rings_at(RINGS2);
    assert_eq!(driver_init(&mut t, &h), ACTIVE);
    let head = h.push_good_read();
    set_reg(&mut t, crate::virtio::mmio::NOTIFY_OFFSET, 0);
    eventually("a request on the new rings", || {
        h.byte(GOOD_STATUS) == VIRTIO_BLK_S_OK
    });
    assert_eq!(h.take_used(), [(u32::from(head), GOOD_LEN + 1)]);
    assert_eq!(h.used_idx(), 1);
    let mut after = vec![0u8; ring_len];
    h.mem
        .read_slice(&mut after, GuestAddress(old_used))
        .unwrap();
    assert!(before == after, "the old used ring changed after the reset");
    assert_eq!(h.byte(STATUS), UNWRITTEN, "the second request was served");
    assert_eq!(
        gate.calls(),
        2,
        "only the request in hand and the new one ran"
    );
    drop(el);
}
