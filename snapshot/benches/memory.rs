//! Memory-file write benchmark: guests of 512 MiB and 4 GiB of which 256 MiB hold non-zero
//! data (as after the test guest's `fill 256`) are written to a memory file; prints the write
//! rate, the syscalls made, the file's length and its size on disk (`st_blocks`), the cost of
//! the optional checksum and of the fsync, and the time to open and map the file back.
//!
//! `cargo bench -p snapshot --bench memory`. `cargo test` runs it too, without the `--bench`
//! flag: then every case runs once at 1/64 scale (a smoke run that keeps the bench from
//! rotting; its figures mean nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use snapshot::memory::{write_memory, GuestRegion, MemoryFile, WriteOptions};

const MIB: usize = 1 << 20;

/// Anonymous memory standing in for guest RAM, unmapped on drop.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Anon {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Anon {
            ptr: ptr.cast(),
            len,
        }
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, owned by `self`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Fills `mib` MiB from 1 MiB on, each 4 KiB page with one 64-bit value from the page number,
/// like the test guest's `fill`.
fn fill(mem: &mut [u8], mib: usize, seed: u64) {
    let start = MIB;
    for (p, page) in mem[start..start + mib * MIB]
        .chunks_exact_mut(4096)
        .enumerate()
    {
        let v = (seed << 32 | p as u64) | 1;
        for w in page.chunks_exact_mut(8) {
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 64 };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory");
    println!(
        "memory file write{}: {} MiB non-zero (files in {})",
        if full {
            ""
        } else {
            " (smoke run at 1/64 scale)"
        },
        256 / scale,
        dir.path().display()
    );
    for guest_mib in [512usize, 4096] {
        let guest = guest_mib * MIB / scale;
        let filled = 256 / scale;
        for (checksum, skip_unpopulated) in [(false, false), (true, false), (false, true)] {
            // Fresh memory each time: a first scan of never-touched memory faults in zero pages.
            let mut mem = Anon::new(guest);
            fill(mem.slice(), filled, 7);
            let data: &[u8] = mem.slice();
            // Guest RAM as the VMM lays it out: below 640 KiB, then from 1 MiB up.
            let regions = [
                GuestRegion {
                    guest_addr: 0,
                    data: &data[..640 << 10],
                    dirty: None,
                    base: None,
                },
                GuestRegion {
                    guest_addr: MIB as u64,
                    data: &data[MIB..],
                    dirty: None,
                    base: None,
                },
            ];
            let _ = std::fs::remove_file(&path);
            let opts = WriteOptions {
                checksum,
                sync: false,
                incremental: false,
                skip_unpopulated,
            };
            let t = Instant::now();
            let (rec, stats) = write_memory(&path, &regions, opts).unwrap();
            let write = t.elapsed();
            let t = Instant::now();
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
            let sync = t.elapsed();
            let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
            let t = Instant::now();
            let mf = MemoryFile::open(&path, &rec).unwrap();
            let maps: Vec<_> = (0..rec.regions.len()).map(|i| mf.map(i).unwrap()).collect();
            let map = t.elapsed();
            let mb = stats.written as f64 / 1e6;
            println!(
                "  guest {:>5} MiB{}: write {:>7.1} ms ({:>6.0} MB/s of data, {:>7.0} MB/s of guest), \
                 {} pwrites, fsync {:>6.1} ms; file {} MiB long, {:.1} MiB on disk; open+map {:>5} us",
                guest / MIB,
                match (checksum, skip_unpopulated) {
                    (true, _) => " +crc ",
                    (_, true) => " +skip",
                    _ => "      ",
                },
                write.as_secs_f64() * 1e3,
                mb / write.as_secs_f64(),
                guest as f64 / 1e6 / write.as_secs_f64(),
                stats.writes,
                sync.as_secs_f64() * 1e3,
                rec.size >> 20,
                on_disk as f64 / MIB as f64,
                map.as_micros(),
            );
            assert!(on_disk >= stats.written);
            assert!(on_disk < stats.written + 4 * MIB as u64);
            if checksum {
                let t = Instant::now();
                mf.verify().unwrap();
                println!(
                    "  guest {:>5} MiB  verify (SEEK_DATA read + crc): {:.1} ms",
                    guest / MIB,
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            drop(maps);
        }
    }
}
