//! Device-level virtio-blk benchmark: the block device serving a queue that this program fills
//! on (host-allocated) guest memory, as a driver would, compared with direct file I/O of the
//! same requests on the same file. Guest-side timing means nothing on PVM, so the guest is left
//! out: this measures what the device adds.
//!
//! `cargo bench -p devices --bench blk`. `cargo test` runs it too, without the `--bench` flag:
//! then every case runs once on 1/64 of the data (a smoke run that keeps the bench from rotting;
//! its figures mean nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use devices::virtio::block::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use devices::virtio::block::{Block, ChainBackend};
use devices::virtio::{GuestMemory, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QUEUE: u16 = 256;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000 * 4;
const USED: u64 = 0x1000 * 8;
const HEADERS: u64 = 0x10_0000;
const STATUS: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A driver's view of one split queue on guest memory.
struct Driver {
    mem: GuestMemory,
    avail_idx: u16,
}

impl Driver {
    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + u64::from(index) * 16);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Queues `n` requests of `size` bytes of type `kind` at byte offsets from `offset(i)`.
    fn fill(&mut self, n: u16, kind: u32, size: u32, offset: impl Fn(u16) -> u64) {
        for i in 0..n {
            let base = i * 3;
            let hdr = HEADERS + u64::from(i) * 16;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&(offset(i) / 512).to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let data_flags = if kind == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
            self.desc(base, hdr, 16, F_NEXT, base + 1);
            self.desc(
                base + 1,
                DATA + u64::from(i) * u64::from(size),
                size,
                F_NEXT | data_flags,
                base + 2,
            );
            self.desc(base + 2, STATUS + u64::from(i), 1, F_WRITE, 0);
            let slot = AVAIL + 4 + u64::from(self.avail_idx % QUEUE) * 2;
            self.mem.write_obj(base, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }
}

/// Opens `path` (a raw file or the top of a chain) as the device's disk.
fn device(path: &std::path::Path, mem: &GuestMemory) -> Block {
    let chain = disk::Chain::open(path, disk::OpenOptions::default()).unwrap();
    let mut block = Block::new(Box::new(ChainBackend::new(chain)), false, "bench").unwrap();
    let mut q = Queue::new(QUEUE).unwrap();
    q.set_size(QUEUE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    block.activate(mem.clone(), irq, vec![q], 0).unwrap();
    block
}

struct Case {
    name: &'static str,
    kind: u32,
    size: u32,
    random: bool,
}

fn offsets(case: &Case, disk: u64, i: u64) -> u64 {
    let slots = disk / u64::from(case.size);
    let slot = if case.random {
        // A fixed pseudo-random permutation-ish walk.
        (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % slots
    } else {
        i % slots
    };
    slot * u64::from(case.size)
}

fn run_device(case: &Case, path: &std::path::Path, disk: u64, total: u64) -> Duration {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let mut block = device(path, &mem);
    let mut driver = Driver {
        mem: mem.clone(),
        avail_idx: 0,
    };
    let batch: u16 = if case.size >= 1 << 20 { 64 } else { 85 };
    let mut done = 0u64;
    let start = Instant::now();
    while done < total {
        let n = (total - done).min(u64::from(batch)) as u16;
        let first = done;
        driver.fill(n, case.kind, case.size, |i| {
            offsets(case, disk, first + u64::from(i))
        });
        block.process_queue();
        done += u64::from(n);
    }
    let elapsed = start.elapsed();
    for i in 0..u64::from(batch).min(total) {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(status, 0, "request failed");
    }
    elapsed
}

fn run_direct(case: &Case, path: &std::path::Path, disk: u64, total: u64) -> Duration {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0x5au8; case.size as usize];
    let start = Instant::now();
    for i in 0..total {
        let off = offsets(case, disk, i);
        if case.kind == VIRTIO_BLK_T_IN {
            file.read_exact_at(&mut buf, off).unwrap();
        } else {
            file.write_all_at(&buf, off).unwrap();
        }
    }
    start.elapsed()
}

/// By how much a smoke run (`cargo test`, no `--bench` flag) shrinks sizes and counts.
fn scale() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        1
    } else {
        64
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let disk: u64 = (256 << 20) / scale();
    {
        let f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x33u8; 1 << 20];
        for i in 0..disk >> 20 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    let cases = [
        Case {
            name: "seq read 1 MiB",
            kind: VIRTIO_BLK_T_IN,
            size: 1 << 20,
            random: false,
        },
        Case {
            name: "seq write 1 MiB",
            kind: VIRTIO_BLK_T_OUT,
            size: 1 << 20,
            random: false,
        },
        Case {
            name: "rand read 4 KiB",
            kind: VIRTIO_BLK_T_IN,
            size: 4096,
            random: true,
        },
        Case {
            name: "rand write 4 KiB",
            kind: VIRTIO_BLK_T_OUT,
            size: 4096,
            random: true,
        },
    ];
    // A 32-layer chain over a copy of the same data: 31 empty layers and a top that the write
    // cases fill as they go (reads fall through to the base).
    let chain_base = dir.path().join("chain-base.raw");
    std::fs::copy(&path, &chain_base).unwrap();
    let mut parent = chain_base.clone();
    for i in 0..32 {
        let layer = dir.path().join(format!("layer{i:02}.strata"));
        disk::create_layer(&parent, &layer).unwrap();
        parent = layer;
    }
    let top = parent;
    println!(
        "virtio-blk device benchmark: {} MiB, page cache, tmpdir {}",
        disk >> 20,
        dir.path().display()
    );
    println!(
        "{:<18} {:>10} {:>8} {:>10} {:>8} {:>12} {:>8} {:>7} {:>7}",
        "case",
        "raw req/s",
        "MB/s",
        "32L req/s",
        "MB/s",
        "direct req/s",
        "MB/s",
        "raw/dir",
        "32L/dir"
    );
    for case in &cases {
        let total: u64 = (if case.size >= 1 << 20 { 1024 } else { 100_000 }) / scale();
        // Warm the page cache the same way for all.
        let _ = run_direct(case, &path, disk, total.min(256));
        let direct = run_direct(case, &path, disk, total);
        let raw = run_device(case, &path, disk, total);
        let chain = run_device(case, &top, disk, total);
        let rate = |d: Duration| total as f64 / d.as_secs_f64();
        let mbs = |d: Duration| total as f64 * f64::from(case.size) / d.as_secs_f64() / 1e6;
        println!(
            "{:<18} {:>10.0} {:>8.1} {:>10.0} {:>8.1} {:>12.0} {:>8.1} {:>7.2} {:>7.2}",
            case.name,
            rate(raw),
            mbs(raw),
            rate(chain),
            mbs(chain),
            rate(direct),
            mbs(direct),
            rate(raw) / rate(direct),
            rate(chain) / rate(direct)
        );
    }
}
